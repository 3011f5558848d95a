package llmstream

import (
	"bytes"
	"context"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	llmmock "github.com/caddy-llm-stream/caddy-llm-stream/mock"
)

// This file holds the tests' two fixtures: the one fake model API
// (newUpstream) and the one way to call the handler (send, do). Named
// upstreams elsewhere (holdUpstream, gatedUpstream, …) are answers given
// to newUpstream.

// fakeUpstream stands in for a model API: a real HTTP server that answers
// with the handler it was given and remembers every request it got, and
// whether each call ran to its end or was cancelled.
type fakeUpstream struct {
	*httptest.Server
	// caFile holds the server's certificate in PEM, for tls_trust_pool
	// (overTLS only).
	caFile string

	calls       atomic.Int64 // POST requests received
	finished    atomic.Int64 // calls whose answer ran to its end
	cancelled   atomic.Int64 // calls the handler cancelled
	cancelledAt chan time.Time

	mu   sync.Mutex
	seen []seenRequest
}

// seenRequest is one request as the upstream got it.
type seenRequest struct {
	Method, Proto string
	Path          string // r.URL.Path
	URI           string // r.RequestURI, as sent
	Header        http.Header
	Body          string
}

type upstreamConfig struct {
	answer   http.Handler
	tls      bool
	unrecord bool
}

// upstreamOption configures newUpstream.
type upstreamOption func(*upstreamConfig)

// answering makes the upstream answer with h (the request body has been
// read for the record and is given to h again).
func answering(h http.HandlerFunc) upstreamOption {
	return func(c *upstreamConfig) { c.answer = h }
}

// modelAnswers makes the upstream llm_mock, streaming tokens words
// interval apart (0: as fast as it can).
func modelAnswers(t testing.TB, tokens int, interval time.Duration) upstreamOption {
	m := &llmmock.Mock{Tokens: tokens, Interval: caddy.Duration(interval)}
	if interval == 0 {
		m.Interval = -1
	}
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	return answering(func(w http.ResponseWriter, r *http.Request) { _ = m.ServeHTTP(w, r, nil) })
}

// overTLS serves HTTP/2 over TLS (ALPN h2), as every hosted model API
// does; the certificate is in caFile.
func overTLS() upstreamOption { return func(c *upstreamConfig) { c.tls = true } }

// unrecorded keeps no record of the requests (their bodies and headers),
// for benchmarks that measure the handler's allocations.
func unrecorded() upstreamOption { return func(c *upstreamConfig) { c.unrecord = true } }

// newUpstream starts a fake model API, closed when the test ends. Without
// an answer it replies like a chat model with a small usage.
func newUpstream(t testing.TB, opts ...upstreamOption) *fakeUpstream {
	t.Helper()
	cfg := upstreamConfig{answer: http.HandlerFunc(chatAnswer)}
	for _, o := range opts {
		o(&cfg)
	}
	u := &fakeUpstream{cancelledAt: make(chan time.Time, 256)}
	u.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			u.calls.Add(1)
		}
		if !cfg.unrecord {
			b, _ := io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(b))
			u.mu.Lock()
			u.seen = append(u.seen, seenRequest{Method: r.Method, Proto: r.Proto, Path: r.URL.Path,
				URI: r.RequestURI, Header: r.Header.Clone(), Body: string(b)})
			u.mu.Unlock()
		}
		cfg.answer.ServeHTTP(w, r)
		if r.Context().Err() == nil {
			u.finished.Add(1)
			return
		}
		u.cancelled.Add(1)
		select {
		case u.cancelledAt <- time.Now():
		default:
		}
	}))
	if cfg.tls {
		u.EnableHTTP2 = true
		u.StartTLS()
		u.caFile = filepath.Join(t.TempDir(), "upstream-ca.pem")
		if err := os.WriteFile(u.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: u.Certificate().Raw}), 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		u.Start()
	}
	t.Cleanup(u.Close)
	return u
}

// requests returns what the upstream got so far.
func (u *fakeUpstream) requests() []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenRequest(nil), u.seen...)
}

// chatAnswer is a plain OpenAI chat completion with usage 3+4.
func chatAnswer(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}`)
}

// flushWrite writes s and flushes it to the proxy.
func flushWrite(w http.ResponseWriter, s string) {
	_, _ = w.Write([]byte(s))
	_ = http.NewResponseController(w).Flush()
}

// noCompressClient leaves Accept-Encoding and decoding to the test, the
// way a streaming client that wants bytes as they come does. Each request
// has a connection of its own: a connection a stream ended on, kept for
// the next request, may be one a server that is shutting down (a reload)
// is about to close, and a POST on it fails.
var noCompressClient = &http.Client{Transport: &http.Transport{DisableCompression: true, DisableKeepAlives: true}}

// send makes one request as a client would and returns the response with
// its body unread. A body is sent as JSON.
func send(t testing.TB, method, url, body string, hdr map[string]string) *http.Response {
	t.Helper()
	return sendCtx(t, context.Background(), method, url, body, hdr)
}

// sendCtx is send with a context, to hang up as a client closing its tab.
func sendCtx(t testing.TB, ctx context.Context, method, url, body string, hdr map[string]string) *http.Response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := noCompressClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// do is send with the body read.
func do(t testing.TB, method, url, body string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	resp := send(t, method, url, body, hdr)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

const streamBody = `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
