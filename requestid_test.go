package llmstream

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Providers send their own request id on every answer (OpenAI
// x-request-id, Anthropic request-id). The client must still get the
// handler's id, the one stop_endpoint knows, and the provider's id beside
// it.
func TestClientGetsTheHandlersRequestID(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 500, 10*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		stop_endpoint /v1/stop
	}`)
	id, resp, events := startedStream(t, c.base()+"/v1/chat/completions", nil, 3)
	defer resp.Body.Close()
	upID := resp.Header.Get("X-Upstream-Request-Id")
	if !strings.HasPrefix(upID, "req_") {
		t.Fatalf("X-Upstream-Request-Id = %q, want the provider's req_… id", upID)
	}
	if id == upID || strings.HasPrefix(id, "req_") {
		t.Fatalf("X-Request-Id = %q is the provider's id, want the handler's", id)
	}
	if got := resp.Header.Values("X-Request-Id"); len(got) != 1 {
		t.Fatalf("X-Request-Id has %d values %q, want one", len(got), got)
	}

	sent := time.Now()
	if status, body := stopAt(t, c.base()+"/v1/stop/"+id, nil); status != http.StatusOK {
		t.Fatalf("stop with the client's id: %d %s", status, body)
	}
	waitCancelled(t, up, sent)
	restOf(t, events, 2*time.Second)
	logs := c.waitLog(`"request_id":"` + id + `"`)
	line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(logs)
	if !strings.Contains(line, `"upstream_request_id":"`+upID+`"`) {
		t.Errorf("the usage line lacks the provider's id %s: %s", upID, line)
	}
}

func TestUpstreamRequestIDFromAnswerAndErrors(t *testing.T) {
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if strings.Contains(r.URL.Path, "busy") {
			w.Header().Set("x-request-id", "req_busy123")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}`)
			return
		}
		// No id header: the answer's own id is the provider's id.
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"chatcmpl-abc123","object":"chat.completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}`)
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/chat/completions /v1/busy/chat/completions
		retries 0
	}`)

	resp := send(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","messages":[]}`, nil)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	id := resp.Header.Get("X-Request-Id")
	if id == "" || resp.Header.Get("X-Upstream-Request-Id") != "" {
		t.Fatalf("X-Request-Id %q, X-Upstream-Request-Id %q", id, resp.Header.Get("X-Upstream-Request-Id"))
	}
	line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(c.waitLog(`"request_id":"` + id + `"`))
	if !strings.Contains(line, `"upstream_request_id":"chatcmpl-abc123"`) {
		t.Errorf("the usage line lacks the answer's id: %s", line)
	}

	resp = send(t, "POST", c.base()+"/v1/busy/chat/completions", `{"model":"m","messages":[]}`, nil)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("status %d, want the upstream's 429", resp.StatusCode)
	}
	if got := resp.Header.Get("X-Upstream-Request-Id"); got != "req_busy123" {
		t.Errorf("X-Upstream-Request-Id = %q on the error answer, want req_busy123", got)
	}
	if got := resp.Header.Get("X-Request-Id"); got == "" || got == "req_busy123" {
		t.Errorf("X-Request-Id = %q on the error answer, want the handler's", got)
	}
}

func TestAnswerID(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`data: {"id":"chatcmpl-1","object":"chat.completion.chunk"}`, "chatcmpl-1"},
		{`event: message_start` + "\n" + `data: {"type":"message_start","message":{"id":"msg_01X","type":"message"}}`, "msg_01X"},
		{`event: response.created` + "\n" + `data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response"}}`, "resp_9"},
		{`data: {"candidates":[],"responseId":"gem-7"}`, "gem-7"},
		{`data: {"object":"chunk"}`, ""},
		{`{"id":"a\"b"}`, ""},
	} {
		if got := answerID([]byte(tc.in)); got != tc.want {
			t.Errorf("answerID(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
