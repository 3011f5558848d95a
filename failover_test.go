package llmstream

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// failingUpstream answers every request in one way and counts them.
func failingUpstream(t *testing.T, mode string, calls *atomic.Int32) string {
	if mode == "refused" {
		return "http://127.0.0.1:1"
	}
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch mode {
		case "429":
			w.Header().Set("Retry-After", "30")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(429)
			io.WriteString(w, `{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}`)
		case "500":
			w.WriteHeader(500)
			io.WriteString(w, `{"error":{"message":"boom","type":"server_error","code":null}}`)
		case "processing": // headers and comments, then nothing: a stuck model
			w.Header().Set("Content-Type", "text/event-stream")
			flushWrite(w, ": PROCESSING\n\n")
			<-r.Context().Done()
		case "broken-after-event":
			w.Header().Set("Content-Type", "text/event-stream")
			flushWrite(w, "data: {\"k\":0}\n\n")
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.Close()
		}
	}))
	return srv.URL
}

func TestFailoverBeforeTheFirstByte(t *testing.T) {
	for _, mode := range []string{"429", "500", "refused", "processing"} {
		t.Run(mode, func(t *testing.T) {
			var firstCalls atomic.Int32
			first := failingUpstream(t, mode, &firstCalls)
			const n = 10
			ack := make(chan int)
			second := gatedUpstream(t, n, "text/event-stream", func(k int) string { return fmt.Sprintf("data: {\"k\":%d}\n\n", k) }, ack)
			c := startCaddy(t, `llm_stream {
		upstream `+first+` {
			api_key sk-first-key-0001
			priority 0
		}
		upstream `+second.URL+` {
			api_key sk-second-key-0002
			priority 1
		}
		first_token_timeout 200ms
		heartbeat 50ms
		retry_backoff 10ms 50ms
	}`)
			resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			br := bufio.NewReader(resp.Body)
			for k := 0; k < n; k++ {
				var ev string
				for { // skip heartbeats and upstream comments
					line, err := br.ReadString('\n')
					if err != nil {
						t.Fatalf("event %d: %v", k, err)
					}
					if strings.HasPrefix(line, "data: ") {
						ev = line
						br.ReadString('\n')
						break
					}
				}
				if want := fmt.Sprintf("data: {\"k\":%d}\n", k); ev != want {
					t.Fatalf("event %d: got %q, want %q", k, ev, want)
				}
				select {
				case ack <- k:
				case <-time.After(6 * time.Second):
					t.Fatalf("upstream gave up waiting for event %d", k)
				}
			}
			if mode != "refused" && firstCalls.Load() != 1 {
				t.Errorf("first upstream called %d times, want 1", firstCalls.Load())
			}
		})
	}
}

func TestNoRetryAfterTheAnswerStarted(t *testing.T) {
	var firstCalls, secondCalls atomic.Int32
	first := failingUpstream(t, "broken-after-event", &firstCalls)
	second := failingUpstream(t, "500", &secondCalls)
	c := startCaddy(t, `llm_stream {
		upstream `+first+` {
			priority 0
		}
		upstream `+second+` {
			priority 1
		}
	}`)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(string(body), "data: {\"k\":0}\n\ndata: {\"error\":") || !strings.Contains(string(body), `"code":"stream_broken"`) {
		t.Fatalf("got %q, want the first event then the error event", body)
	}
	if secondCalls.Load() != 0 {
		t.Fatalf("the fallback was called %d times after the answer started", secondCalls.Load())
	}
}

func TestFinalFailureKeepsUpstreamStatus(t *testing.T) {
	var calls atomic.Int32
	up := failingUpstream(t, "500", &calls)
	c := startCaddy(t, `llm_stream {
		upstream `+up+` {
			api_key sk-aaaa-1111 sk-bbbb-2222
		}
		retries 2
		retry_backoff 1ms 5ms
	}`)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 500 || !strings.Contains(string(body), "boom") {
		t.Fatalf("got %d %s, want the upstream's 500", resp.StatusCode, body)
	}
	if calls.Load() != 3 {
		t.Fatalf("upstream called %d times, want 1 + 2 retries", calls.Load())
	}
}

func TestRenameAndProviderStyles(t *testing.T) {
	type seen struct {
		hdr   http.Header
		query string
		body  string
	}
	var mu sync.Mutex
	got := map[string]seen{}
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got[strings.Split(r.URL.Path, "/")[1]] = seen{r.Header.Clone(), r.URL.RawQuery, string(b)}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{}`)
	}))
	c := startCaddy(t, `llm_stream {
		upstream `+up.URL+`/openai {
			models gpt-4o
			rename gpt-4o-fast gpt-4o-2024-08-06
			api_key sk-openai-key-1
		}
		upstream `+up.URL+`/azure {
			provider azure
			models azure-*
			api_key azure-key-1
		}
		upstream `+up.URL+`/anthropic {
			provider anthropic
			models claude-*
			api_key sk-ant-key-1
		}
		upstream `+up.URL+`/gemini {
			provider gemini
			models gemini-*
			api_key AIza-gemini-key-1
		}
		allow_paths /v1/* /v1beta/models*
	}`)
	post := func(path, body string, hdr map[string]string) {
		h := map[string]string{"Authorization": "Bearer client", "X-Api-Key": "client"}
		for k, v := range hdr {
			h[k] = v
		}
		do(t, "POST", c.base()+path, body, h)
	}
	renamed := "{\"model\" :\"gpt-4o-fast\",\"messages\":[{\"role\":\"user\",\"content\":\"say gpt-4o-fast\"}],  \"temperature\":0.0}"
	post("/v1/chat/completions", renamed, nil)
	post("/v1/chat/completions?api-version=2025-01-01", `{"model":"azure-gpt4"}`, nil)
	post("/v1/messages", `{"model":"claude-3-haiku"}`, nil)
	post("/v1beta/models", `{"model":"gemini-2.0-flash"}`, nil)
	post("/v1/chat/completions", `{"model":"azure-other"}`, nil) // default api-version

	want := map[string]struct{ header, value string }{
		"openai":    {"Authorization", "Bearer sk-openai-key-1"},
		"azure":     {"Api-Key", "azure-key-1"},
		"anthropic": {"X-Api-Key", "sk-ant-key-1"},
		"gemini":    {"X-Goog-Api-Key", "AIza-gemini-key-1"},
	}
	for name, w := range want {
		s := got[name]
		if s.hdr.Get(w.header) != w.value {
			t.Errorf("%s: %s = %q, want %q", name, w.header, s.hdr.Get(w.header), w.value)
		}
		for _, cred := range []string{"Authorization", "Api-Key", "X-Api-Key", "X-Goog-Api-Key"} {
			if cred != w.header && s.hdr.Get(cred) != "" {
				t.Errorf("%s: extra credential %s = %q", name, cred, s.hdr.Get(cred))
			}
		}
	}
	if b := got["openai"].body; b != strings.Replace(renamed, `"gpt-4o-fast"`, `"gpt-4o-2024-08-06"`, 1) {
		t.Errorf("rename not byte-exact: %s", b)
	}
	if got["anthropic"].hdr.Get("Anthropic-Version") != "2023-06-01" {
		t.Errorf("anthropic-version default missing")
	}
	if q := got["azure"].query; q != "api-version=2024-10-21" { // the last azure request had none
		t.Errorf("azure default api-version: got %q", q)
	}

	t.Run("unknown model is 404", func(t *testing.T) {
		resp := send(t, "POST", c.base()+"/v1/chat/completions", `{"model":"llama-3"}`, nil)
		checkErrorShape(t, resp, 404, "model_not_found")
	})
	t.Run("models list", func(t *testing.T) {
		_, b := do(t, "GET", c.base()+"/v1/models", "", nil)
		if !strings.Contains(b, `"id":"gpt-4o"`) || !strings.Contains(b, `"id":"gpt-4o-fast"`) || strings.Contains(b, "key") {
			t.Errorf("got %s", b)
		}
	})
}

func TestKeyRestsAfter429(t *testing.T) {
	var mu sync.Mutex
	used := map[string]int{}
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		k := r.Header.Get("Authorization")
		mu.Lock()
		used[k]++
		mu.Unlock()
		if k == "Bearer sk-limited-0001" {
			w.Header().Set("Retry-After", "60")
			w.WriteHeader(429)
			return
		}
		io.WriteString(w, `{}`)
	}))
	c := startCaddy(t, `llm_stream {
		upstream `+up.URL+` {
			api_key sk-limited-0001 sk-free-0002
		}
	}`)
	for i := 0; i < 4; i++ {
		resp := send(t, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
	if used["Bearer sk-limited-0001"] != 1 || used["Bearer sk-free-0002"] != 4 {
		t.Fatalf("key use: %v; the 429 key must rest after its first 429", used)
	}
}
