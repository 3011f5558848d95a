package llmstream

import (
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

const testKey = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"

// gatedUpstream sends n events; event k+1 only after the test said the
// client received event k. Any buffering between the two deadlocks.
func gatedUpstream(t *testing.T, n int, contentType string, frame func(k int) string, ack <-chan int) *fakeUpstream {
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(http.StatusOK)
		for k := 0; k < n; k++ {
			flushWrite(w, frame(k))
			select {
			case got := <-ack:
				if got != k {
					t.Errorf("client acknowledged %d, want %d", got, k)
					return
				}
			case <-time.After(5 * time.Second):
				t.Errorf("event %d did not reach the client within 5s: the relay buffers", k)
				return
			case <-r.Context().Done():
				return
			}
		}
	}))
	return srv
}

func TestStreamIsNotBuffered(t *testing.T) {
	sseFrame := func(k int) string { return fmt.Sprintf("data: {\"k\":%d}\n\n", k) }
	ndjsonFrame := func(k int) string { return fmt.Sprintf("{\"k\":%d}\n", k) }
	zstdReader := func(r io.Reader) (io.Reader, error) {
		d, err := zstd.NewReader(r)
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	}
	gzipReader := func(r io.Reader) (io.Reader, error) { return gzip.NewReader(r) }
	tests := []struct {
		name        string
		contentType string
		frame       func(int) string
		encode      string // Accept-Encoding the client sends
		wantEnc     string // Content-Encoding the client must get
		decode      func(io.Reader) (io.Reader, error)
	}{
		{name: "sse identity", contentType: "text/event-stream", frame: sseFrame},
		{name: "sse through encode gzip", contentType: "text/event-stream", frame: sseFrame, encode: "gzip", wantEnc: "gzip", decode: gzipReader},
		{name: "sse through encode zstd", contentType: "text/event-stream", frame: sseFrame, encode: "zstd", wantEnc: "zstd", decode: zstdReader},
		{name: "ndjson through encode", contentType: "application/x-ndjson", frame: ndjsonFrame, encode: "gzip"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const n = 20
			ack := make(chan int)
			up := gatedUpstream(t, n, tc.contentType, tc.frame, ack)
			c := startCaddy(t, `
	encode gzip zstd
	llm_stream `+up.URL+` {
		api_key `+testKey+`
	}`)
			hdr := map[string]string{}
			if tc.encode != "" {
				hdr["Accept-Encoding"] = tc.encode
			}
			resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, hdr)
			defer resp.Body.Close()
			if got := resp.Header.Get("Content-Encoding"); got != tc.wantEnc {
				t.Fatalf("Content-Encoding: got %q, want %q", got, tc.wantEnc)
			}
			for _, h := range []string{"Content-Length", "ETag"} {
				if resp.Header.Get(h) != "" {
					t.Errorf("%s set on a stream", h)
				}
			}
			if got := resp.Header.Get("X-Accel-Buffering"); got != "no" {
				t.Errorf("X-Accel-Buffering: got %q, want no", got)
			}
			if got := resp.Header.Get("Cache-Control"); got != "no-cache" {
				t.Errorf("Cache-Control: got %q, want no-cache", got)
			}
			var body io.Reader = resp.Body
			if tc.decode != nil {
				var err error
				if body, err = tc.decode(body); err != nil {
					t.Fatal(err)
				}
			}
			br := bufio.NewReader(body)
			for k := 0; k < n; k++ {
				want := tc.frame(k)
				got := make([]byte, len(want))
				if _, err := io.ReadFull(br, got); err != nil {
					t.Fatalf("reading event %d: %v", k, err)
				}
				if string(got) != want {
					t.Fatalf("event %d: got %q, want %q", k, got, want)
				}
				select {
				case ack <- k:
				case <-time.After(6 * time.Second):
					t.Fatalf("upstream gave up waiting for event %d", k)
				}
			}
		})
	}
}

// splitUpstream sends the pieces as separate flushed writes, with a pause
// between them so each arrives in its own read.
func splitUpstream(t *testing.T, contentType string, pieces []string) *fakeUpstream {
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		for _, p := range pieces {
			flushWrite(w, p)
			time.Sleep(2 * time.Millisecond)
		}
	}))
	return srv
}

func TestRelayIsByteExact(t *testing.T) {
	long := "data: " + strings.Repeat("零一二三四五六七八九", 10000) + "\n\n" // 300 KB line
	tests := []struct {
		name        string
		contentType string
		pieces      []string
	}{
		{"utf-8 split inside characters", "text/event-stream", []string{"data: {\"c\":\"你", "好\xe4", "\xb8\x96\xe7\x95", "\x8c\"}\n\n", "data: [DONE]\n\n"}},
		{"crlf split", "text/event-stream", []string{"data: a\r", "\n\r", "\ndata: b\r\n\r\n"}},
		{"comments and fields", "text/event-stream", []string{": PROCESSING\n\n", "event: message_start\nid: 1\nretry: 3000\n", "data: {}\n\n", ":x\n\n"}},
		{"300 KB line", "text/event-stream", []string{long[:70000], long[70000:200001], long[200001:]}},
		{"ndjson", "application/x-ndjson", []string{"{\"a\":1}\n{\"b\"", ":2}\n"}},
		{"plain json", "application/json", []string{`{"id":"x","choices":[{"message":{"content":"你好"}}]}`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := splitUpstream(t, tc.contentType, tc.pieces)
			c := startCaddy(t, `llm_stream `+up.URL)
			resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if want := strings.Join(tc.pieces, ""); string(got) != want {
				t.Fatalf("relayed %d bytes, want %d identical bytes (first difference at %d)", len(got), len(want), firstDiff(string(got), want))
			}
		})
	}
}

func firstDiff(a, b string) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// headersUpstream answers `{}` and keeps the headers of the last request
// it got.
func headersUpstream(t *testing.T) (*fakeUpstream, *http.Header) {
	var got http.Header
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Clone()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{}`)
	}))
	return up, &got
}

func TestKeyInjection(t *testing.T) {
	up, seen := headersUpstream(t)
	c := startCaddy(t, `llm_stream {
		upstream `+up.URL+`
		api_key `+testKey+`
		header_up OpenAI-Organization org-demo
		header_up X-Client-Path {http.request.uri.path}
		header_up -X-Debug
		header_up Authorization "Bearer stolen"
	}`)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, map[string]string{
		"Authorization":  "Bearer client-token",
		"X-Api-Key":      "client-x-api-key",
		"Api-Key":        "client-api-key",
		"X-Goog-Api-Key": "client-goog",
		"Cookie":         "session=abc",
		"X-Debug":        "1",
	})
	resp.Body.Close()
	got := *seen
	if want := "Bearer " + testKey; got.Get("Authorization") != want {
		t.Errorf("Authorization: got %q, want %q", got.Get("Authorization"), want)
	}
	for _, h := range []string{"X-Api-Key", "Api-Key", "X-Goog-Api-Key", "Cookie", "X-Debug"} {
		if v := got.Get(h); v != "" {
			t.Errorf("%s reached the upstream: %q", h, v)
		}
	}
	if got.Get("OpenAI-Organization") != "org-demo" || got.Get("X-Client-Path") != "/v1/chat/completions" {
		t.Errorf("header_up not applied: %v", got)
	}
	if got.Get("Accept-Encoding") != "identity" {
		t.Errorf("Accept-Encoding: got %q, want identity", got.Get("Accept-Encoding"))
	}
}

// What the upstream gets of the client's headers, sent raw as a client or a
// proxy in front might: the end-to-end fields, not the hop-by-hop ones
// (listed, or named in the client's Connection header) nor the client's
// credentials; header_up then applies to the copy, never to the client's
// own request (a later handler or the access log still sees what came).
func TestRequestHeadersForTheUpstream(t *testing.T) {
	up, seen := headersUpstream(t)
	// header_up's replace edits values in place; the deferred header
	// reads the client's X-Trace when the response is written, after it.
	c := startCaddy(t, `route {
		header >X-Trace-Seen {http.request.header.X-Trace}
		llm_stream `+up.URL+` {
			api_key `+testKey+`
			header_up X-Trace t1 t1-up
		}
	}`)
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(c.port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`
	_, _ = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n"+
		"Connection: keep-alive, X-Hop-Trace\r\nX-Hop-Trace: 1\r\nKeep-Alive: timeout=5\r\n"+
		"Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\nProxy-Connection: keep-alive\r\nTe: trailers\r\n"+
		"Authorization: Bearer client-token\r\nCookie: session=abc\r\n"+
		"X-Trace: t1\r\nOpenAI-Beta: assistants=v2\r\nAccept: application/json\r\n\r\n%s", len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	got := *seen
	if resp.StatusCode != 200 || got == nil {
		t.Fatalf("status %d; upstream called: %v", resp.StatusCode, got != nil)
	}
	for _, k := range []string{"Connection", "X-Hop-Trace", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Te", "Cookie"} {
		if v, ok := got[k]; ok {
			t.Errorf("%s reached the upstream: %q", k, v)
		}
	}
	if want := "Bearer " + testKey; got.Get("Authorization") != want {
		t.Errorf("Authorization: got %q, want %q", got.Get("Authorization"), want)
	}
	for k, want := range map[string]string{"Openai-Beta": "assistants=v2", "Accept": "application/json", "X-Trace": "t1-up",
		"Content-Type": "application/json", "Accept-Encoding": "identity"} {
		if got.Get(k) != want {
			t.Errorf("%s: got %q, want %q", k, got.Get(k), want)
		}
	}
	if v := resp.Header.Get("X-Trace-Seen"); v != "t1" {
		t.Errorf("the client's own X-Trace after llm_stream: got %q, want t1 (header_up changed the client's request)", v)
	}
}

func TestKeyNeverLeaks(t *testing.T) {
	masked := testKey[:7] + strings.Repeat("*", 20) + testKey[len(testKey)-4:]
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
		fmt.Fprintf(w, `{"error":{"message":"Rate limit for key %s (%s), fragment %s.","type":"requests","code":"rate_limit_exceeded"}}`,
			r.Header.Get("Authorization")[7:], masked, testKey[10:22])
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		api_key `+testKey+`
		retries 0
	}`)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("status: got %d, want 429", resp.StatusCode)
	}
	if resp.Header.Get("Retry-After") != "7" {
		t.Errorf("Retry-After: got %q, want 7", resp.Header.Get("Retry-After"))
	}
	if !strings.Contains(string(body), "[redacted]") || !strings.Contains(string(body), "rate_limit_exceeded") {
		t.Errorf("body: got %s, want the upstream error with the key redacted", body)
	}
	for _, secret := range []string{testKey, masked, testKey[10:22], testKey[len(testKey)-8:]} {
		if strings.Contains(string(body), secret) {
			t.Errorf("client got key material %q in %s", secret, body)
		}
		if strings.Contains(c.logs(), secret) {
			t.Errorf("log has key material %q", secret)
		}
	}
	if !strings.Contains(c.logs(), fingerprint(testKey)) {
		t.Errorf("log lacks the key fingerprint %s", fingerprint(testKey))
	}
}

// checkErrorShape asserts an OpenAI-shaped error with status and code.
func checkErrorShape(t *testing.T, resp *http.Response, status int, code string) {
	t.Helper()
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != status {
		t.Fatalf("status: got %d, want %d (%s)", resp.StatusCode, status, body)
	}
	var e struct {
		Error struct{ Message, Type, Code string } `json:"error"`
	}
	if err := jsonUnmarshal(body, &e); err != nil || e.Error.Message == "" || e.Error.Type == "" || e.Error.Code != code {
		t.Fatalf("body: got %s, want an OpenAI error with code %q", body, code)
	}
	if resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("Content-Type: got %q", resp.Header.Get("Content-Type"))
	}
}

func TestClientErrors(t *testing.T) {
	slow := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(2 * time.Second):
		}
	}))
	c := startCaddy(t, `
	handle /refused/* {
		llm_stream http://127.0.0.1:1 {
			allow_paths /refused/*
		}
	}
	handle /slow/* {
		llm_stream `+slow.URL+` {
			allow_paths /slow/*
			first_byte_timeout 100ms
			retries 0
		}
	}
	handle {
		llm_stream `+slow.URL+` {
			max_request_body 1KB
		}
	}`)
	post := func(path, body string, chunked bool) *http.Response {
		var r io.Reader = strings.NewReader(body)
		if chunked {
			r = io.MultiReader(r) // hides the length: sent chunked
		}
		req, _ := http.NewRequest(http.MethodPost, c.base()+path, r)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	big := `{"x":"` + strings.Repeat("a", 2000) + `"}`
	t.Run("unreachable is 502", func(t *testing.T) {
		checkErrorShape(t, post("/refused/v1/chat/completions", streamBody, false), 502, "upstream_unreachable")
	})
	t.Run("no headers in time is 504", func(t *testing.T) {
		checkErrorShape(t, post("/slow/v1/chat/completions", `{"model":"m"}`, false), 504, "upstream_timeout")
	})
	t.Run("malformed json is 400", func(t *testing.T) {
		checkErrorShape(t, post("/v1/chat/completions", `{"model": "m",`, false), 400, "invalid_json")
	})
	t.Run("stream of the wrong type is 400", func(t *testing.T) {
		checkErrorShape(t, post("/v1/chat/completions", `{"model":"m","stream":"yes"}`, false), 400, "invalid_type")
	})
	t.Run("too large is 413", func(t *testing.T) {
		checkErrorShape(t, post("/v1/chat/completions", big, false), 413, "request_too_large")
	})
	t.Run("too large without length is 413", func(t *testing.T) {
		checkErrorShape(t, post("/v1/chat/completions", big, true), 413, "request_too_large")
	})
}

func TestHeartbeat(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/late-headers":
			<-release // the model thinks before it answers at all
			w.Header().Set("Content-Type", "text/event-stream")
			flushWrite(w, "data: {\"k\":1}\n\n")
		case "/mid-event":
			w.Header().Set("Content-Type", "text/event-stream")
			flushWrite(w, "data: {\"k\":")
			<-release
			flushWrite(w, "1}\n\n")
		}
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		heartbeat 30ms
		allow_paths /late-headers /mid-event
	}`)
	for _, path := range []string{"/late-headers", "/mid-event"} {
		t.Run(path, func(t *testing.T) {
			resp := send(t, "POST", c.base()+path, streamBody, nil)
			defer resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Fatalf("got %d %q, want a 200 event stream", resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			time.Sleep(150 * time.Millisecond)
			release <- struct{}{}
			body, _ := io.ReadAll(resp.Body)
			want := ": keep-alive\n\n: keep-alive\n\n"
			switch path {
			case "/late-headers":
				if !strings.HasPrefix(string(body), want) || !strings.HasSuffix(string(body), "data: {\"k\":1}\n\n") {
					t.Fatalf("got %q, want heartbeats then the event", body)
				}
			case "/mid-event":
				if string(body) != "data: {\"k\":1}\n\n" {
					t.Fatalf("got %q: a heartbeat was inserted inside an event", body)
				}
			}
		})
	}
}

func TestHeartbeatOff(t *testing.T) {
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		flushWrite(w, ": hello\n\n")
		time.Sleep(150 * time.Millisecond)
		flushWrite(w, "data: 1\n\n")
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		heartbeat off
	}`)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != ": hello\n\ndata: 1\n\n" {
		t.Fatalf("got %q, want no heartbeats", body)
	}
}

func TestBrokenStreamsEndWithAnErrorEvent(t *testing.T) {
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		flushWrite(w, "data: {\"k\":0}\n\ndata: {\"k\"")
		switch r.URL.Path {
		case "/stall":
			<-r.Context().Done() // silent until the proxy gives up
		case "/cut":
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.Close()
		}
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /stall /cut
		idle_timeout 100ms
		heartbeat 20ms
	}`)
	for path, code := range map[string]string{"/stall": "upstream_idle_timeout", "/cut": "stream_broken"} {
		t.Run(path, func(t *testing.T) {
			resp := send(t, "POST", c.base()+path, streamBody, nil)
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("the stream did not end cleanly: %v", err)
			}
			want := "data: {\"k\":0}\n\ndata: {\"k\"\n\ndata: {\"error\":{\"message\":"
			if !strings.HasPrefix(string(body), want) || !strings.Contains(string(body), `"code":"`+code+`"}}`+"\n\n") {
				t.Fatalf("got %q, want the events, the cut one closed, then an error event with code %s", body, code)
			}
		})
	}
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	cancelled := make(chan time.Time, 1)
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		flushWrite(w, "data: {\"k\":0}\n\n")
		<-r.Context().Done()
		cancelled <- time.Now()
	}))
	c := startCaddy(t, `llm_stream `+up.URL)
	ctx, cancel := context.WithCancel(context.Background())
	resp := sendCtx(t, ctx, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	br := bufio.NewReader(resp.Body)
	if line, _ := br.ReadString('\n'); line != "data: {\"k\":0}\n" {
		t.Fatalf("got %q", line)
	}
	left := time.Now()
	cancel()
	select {
	case at := <-cancelled:
		if d := at.Sub(left); d > 100*time.Millisecond {
			t.Fatalf("upstream cancelled %v after the client left, want within 100ms", d)
		}
		t.Logf("upstream cancelled %v after the client left", at.Sub(left))
	case <-time.After(2 * time.Second):
		t.Fatal("the upstream request was not cancelled after the client left")
	}
}

func TestReloadKeepsStreamsInFlight(t *testing.T) {
	var served atomic.Int32
	events := func(tag string, n int) string {
		var sb strings.Builder
		for i := 0; i < n; i++ {
			fmt.Fprintf(&sb, "data: {\"from\":%q,\"k\":%d}\n\n", tag, i)
		}
		return sb.String()
	}
	upstream := func(tag string) *fakeUpstream {
		return newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
			served.Add(1)
			w.Header().Set("Content-Type", "text/event-stream")
			for _, ev := range strings.SplitAfter(events(tag, 20), "\n\n") {
				flushWrite(w, ev)
				time.Sleep(15 * time.Millisecond)
			}
		}))
	}
	oldUp, newUp := upstream("old"), upstream("new")
	defer oldUp.Close()
	defer newUp.Close()
	c := startCaddy(t, `llm_stream `+oldUp.URL)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	br := bufio.NewReader(resp.Body)
	first, _ := br.ReadString('\n')
	c.load(`llm_stream ` + newUp.URL) // reload while the old stream is mid-way
	rest, err := io.ReadAll(br)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("old stream cut by the reload: %v", err)
	}
	if got := first + string(rest); got != events("old", 20) {
		t.Fatalf("old stream: got %q, want all 20 old events", got)
	}
	resp = send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != events("new", 20) {
		t.Fatalf("after reload: got %q, want the new upstream's events", body)
	}
}

func TestUpstreamPathJoin(t *testing.T) {
	var got string
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		got = r.URL.RequestURI()
	}))
	c := startCaddy(t, `llm_stream `+up.URL+`/compatible-mode`)
	do(t, "GET", c.base()+"/v1/models?limit=2", "", nil)
	if got != "/compatible-mode/v1/models?limit=2" {
		t.Fatalf("upstream got %q, want /compatible-mode/v1/models?limit=2", got)
	}
}

var _ = net.Dial
