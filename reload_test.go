package llmstream

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// A `caddy reload` during the working day (through the admin API, with a
// change elsewhere in the config) keeps what the handler remembers: callers
// at their limit stay limited, a key resting after a 429 stays resting, an
// unchanged cache keeps its entries; a changed limit starts fresh.
func TestReloadKeepsState(t *testing.T) {
	up := newBusyKeyUpstream(t)
	restingCalls := &up.busyCalls
	config := func(limit, extra string) string {
		return `llm_stream {
		upstream ` + up.URL + ` {
			api_key sk-busy sk-free
		}
		limit {
			` + limit + `
		}
		cache 10m
		` + extra + `
	}`
	}
	c := startCaddyAdmin(t, config("requests 4 1m", ""))
	body := `{"model":"m","temperature":0,"messages":[{"role":"user","content":"cache me"}]}`
	post := func() *http.Response {
		resp := send(t, "POST", c.base()+"/v1/chat/completions", body, nil)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	// Two distinct requests (the second misses the cache) until the busy
	// key has been tried once.
	if resp := post(); resp.StatusCode != http.StatusOK || resp.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("first: %d %s", resp.StatusCode, resp.Header.Get("X-Cache"))
	}
	body = `{"model":"m","temperature":0,"messages":[{"role":"user","content":"another"}]}`
	if resp := post(); resp.StatusCode != http.StatusOK {
		t.Fatalf("second: %d", resp.StatusCode)
	}
	if restingCalls.Load() != 1 {
		t.Fatalf("the busy key was called %d times, want once (round robin over two keys)", restingCalls.Load())
	}

	c.reload(config("requests 4 1m", "header_up X-Reloaded yes"))

	// The cache kept the first answer (a hit still counts as a request).
	body = `{"model":"m","temperature":0,"messages":[{"role":"user","content":"cache me"}]}`
	if resp := post(); resp.StatusCode != http.StatusOK || resp.Header.Get("X-Cache") != "HIT" {
		t.Fatalf("after the reload: %d X-Cache %q, want a hit kept across the reload", resp.StatusCode, resp.Header.Get("X-Cache"))
	}
	// One request left of four.
	body = `{"model":"m","temperature":0,"messages":[{"role":"user","content":"third"}]}`
	if resp := post(); resp.StatusCode != http.StatusOK {
		t.Fatalf("third request: %d", resp.StatusCode)
	}
	if resp := post(); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("fourth request after the reload: %d, want 429: the limit was reset by the reload", resp.StatusCode)
	}
	if n := restingCalls.Load(); n != 1 {
		t.Errorf("the key resting after a 429 was called %d more times after the reload", n-1)
	}

	// A changed limit starts fresh.
	c.reload(config("requests 5 1m", "header_up X-Reloaded yes"))
	body = `{"model":"m","temperature":0,"messages":[{"role":"user","content":"fresh"}]}`
	if resp := post(); resp.StatusCode != http.StatusOK {
		t.Fatalf("after changing the limit: %d, want a fresh count", resp.StatusCode)
	}
	if n := restingCalls.Load(); n != 1 {
		t.Errorf("the resting key was called again after the second reload")
	}
	if !strings.Contains(c.logs(), "llm usage") {
		t.Error("no usage lines")
	}
}

// A WebSocket opened before a reload outlives the old configuration: its
// messages keep meeting working limits in Redis (the client is pooled and
// released only after the socket closed), counted with the new config's.
func TestWebSocketAcrossReloadWithRedis(t *testing.T) {
	rds := redistest.Start(t)
	up := newUpstream(t, modelAnswers(t, 3, time.Millisecond))
	config := func(extra string) string {
		return `llm_stream ` + up.URL + ` {
		websocket
		client_key sk-client-1 team
		limit {
			requests 3 1m
		}
		store redis ` + rds.Addr + `
		` + extra + `
	}`
	}
	c := startCaddyAdmin(t, config(""))
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), http.Header{"Authorization": {"Bearer sk-client-1"}})
	ask := `{"model":"mock-1","messages":[{"role":"user","content":"x"}]}`
	if msgs := wsAsk(t, conn, ask); len(msgs) != 6 {
		t.Fatalf("before the reload: %q", msgs)
	}
	c.reload(config("header_up X-Reloaded yes"))
	time.Sleep(100 * time.Millisecond) // the old config's cleanup has run
	for i := 0; i < 2; i++ {
		if msgs := wsAsk(t, conn, ask); len(msgs) != 6 {
			t.Fatalf("message %d after the reload: %q", i+2, msgs)
		}
	}
	msgs := wsAsk(t, conn, ask)
	if len(msgs) != 2 || !strings.Contains(msgs[0], `"code":"requests_limit_exceeded"`) {
		t.Fatalf("fourth message: %q, want the request limit", msgs)
	}
	// The new configuration counts the same requests.
	resp, got := do(t, "POST", c.base()+"/v1/chat/completions", ask, map[string]string{"Authorization": "Bearer sk-client-1"})
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("an HTTP request under the new config: %d %s", resp.StatusCode, got)
	}
}

// busyKeyUpstream answers like OpenAI: 429 with Retry-After 600 for the key
// sk-busy, a chat completion for any other key.
type busyKeyUpstream struct {
	*fakeUpstream
	busyCalls, otherCalls atomic.Int32
}

func newBusyKeyUpstream(t *testing.T) *busyKeyUpstream {
	u := &busyKeyUpstream{}
	u.fakeUpstream = newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("x-request-id", "req_"+newID())
		w.Header().Set("Content-Type", "application/json")
		if r.Header.Get("Authorization") == "Bearer sk-busy" {
			u.busyCalls.Add(1)
			w.Header().Set("Retry-After", "600")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}`)
			return
		}
		u.otherCalls.Add(1)
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}`)
	}))
	return u
}

// Streams admitted under the old configuration keep counting against the
// new one until they end, also when the limit changed (its counters start
// fresh, the open streams' slots do not).
func TestSlotsOutliveAReload(t *testing.T) {
	release := make(chan struct{})
	up := holdUpstream(t, release)
	config := func(requests string) string {
		return `llm_stream ` + up.URL + ` {
		allow_paths /v1/*
		limit {
			requests ` + requests + ` 1m
			concurrent 1
		}
	}`
	}
	c := startCaddyAdmin(t, config("100"))
	held := send(t, "POST", c.base()+"/v1/hold/chat/completions", streamBody, nil)
	defer held.Body.Close()
	br := bufio.NewReader(held.Body)
	br.ReadString('\n')

	c.reload(config("200")) // a changed limit: fresh counters
	if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil); resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(got, "concurrent") {
		t.Fatalf("while a stream admitted before the reload is open: %d %s, want 429 concurrent", resp.StatusCode, got)
	}
	close(release)
	io.Copy(io.Discard, br)
	deadline := time.Now().Add(2 * time.Second)
	for {
		resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil)
		if resp.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the old stream ended: %d", resp.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
