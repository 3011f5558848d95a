package llmstream

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// TestMockThroughRelay checks llm_mock's wire formats end to end through
// llm_stream: OpenAI chunks ending in [DONE] with a usage chunk, the JSON
// form, Anthropic named events and the model list.
func TestMockThroughRelay(t *testing.T) {
	mockPort := freePort(t)
	c := startCaddy(t, `llm_stream http://127.0.0.1:`+strconv.Itoa(mockPort)+`
}
http://127.0.0.1:`+strconv.Itoa(mockPort)+` {
	llm_mock {
		text "one two three"
		tokens 5
		interval 1ms
		models mock-1 mock-2
	}`)
	post := func(path, body string) *http.Response {
		return send(t, "POST", c.base()+path, body, nil)
	}

	t.Run("provider headers", func(t *testing.T) {
		// The provider's own headers reach the client, its edge's cookies
		// do not, and its request id comes as X-Upstream-Request-Id beside
		// ours.
		resp := post("/v1/chat/completions", `{"model":"mock-1","messages":[{"role":"user","content":"hi"}]}`)
		resp.Body.Close()
		for _, k := range []string{"Openai-Organization", "Openai-Processing-Ms", "X-Ratelimit-Remaining-Tokens", "Cf-Ray", "Strict-Transport-Security"} {
			if resp.Header.Get(k) == "" {
				t.Errorf("%s did not reach the client: %v", k, resp.Header)
			}
		}
		if c := resp.Header.Values("Set-Cookie"); len(c) != 0 {
			t.Errorf("the provider's cookies reached the client: %q", c)
		}
		if up, id := resp.Header.Get("X-Upstream-Request-Id"), resp.Header.Get("X-Request-Id"); !strings.HasPrefix(up, "req_") || id == "" || id == up {
			t.Errorf("request ids: ours %q, the provider's %q", id, up)
		}
	})

	t.Run("openai stream with usage", func(t *testing.T) {
		resp := post("/v1/chat/completions", `{"model":"mock-2","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi there"}]}`)
		defer resp.Body.Close()
		var content strings.Builder
		var datas []string
		for ev := range readEvents(bufio.NewReader(resp.Body)) {
			datas = append(datas, strings.TrimSuffix(strings.TrimPrefix(ev, "data: "), "\n\n"))
		}
		if len(datas) != 9 || datas[len(datas)-1] != "[DONE]" {
			t.Fatalf("got %d events ending %q, want role + 5 tokens + finish + usage + [DONE]", len(datas), datas[len(datas)-1])
		}
		for i, d := range datas[:len(datas)-1] {
			var ch struct {
				Object  string `json:"object"`
				Model   string `json:"model"`
				Choices []struct {
					Delta        struct{ Content string } `json:"delta"`
					FinishReason *string                  `json:"finish_reason"`
				} `json:"choices"`
				Usage *struct {
					PromptTokens     int `json:"prompt_tokens"`
					CompletionTokens int `json:"completion_tokens"`
					TotalTokens      int `json:"total_tokens"`
				} `json:"usage"`
			}
			if err := json.Unmarshal([]byte(d), &ch); err != nil {
				t.Fatalf("event %d is not JSON: %q", i, d)
			}
			if ch.Object != "chat.completion.chunk" || ch.Model != "mock-2" {
				t.Fatalf("event %d: %q", i, d)
			}
			if i == 7 {
				if len(ch.Choices) != 0 || ch.Usage == nil || ch.Usage.CompletionTokens != 5 || ch.Usage.TotalTokens != ch.Usage.PromptTokens+5 {
					t.Fatalf("usage chunk: %q", d)
				}
				continue
			}
			content.WriteString(ch.Choices[0].Delta.Content)
		}
		if content.String() != "one two three one two" {
			t.Fatalf("content: got %q", content.String())
		}
	})

	t.Run("openai json", func(t *testing.T) {
		resp := post("/v1/chat/completions", `{"model":"mock-1","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}`)
		var out struct {
			Object  string
			Choices []struct{ Message struct{ Content string } }
			Usage   struct {
				CompletionTokens int `json:"completion_tokens"`
			}
		}
		err := json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if err != nil || out.Object != "chat.completion" || out.Choices[0].Message.Content != "one two" || out.Usage.CompletionTokens != 2 {
			t.Fatalf("got %+v (%v)", out, err)
		}
	})

	t.Run("anthropic events", func(t *testing.T) {
		resp := post("/v1/messages", `{"model":"mock-1","stream":true,"max_tokens":3,"messages":[{"role":"user","content":"hi"}]}`)
		defer resp.Body.Close()
		var names []string
		for ev := range readEvents(bufio.NewReader(resp.Body)) {
			name, _, _ := strings.Cut(strings.TrimPrefix(ev, "event: "), "\n")
			names = append(names, name)
		}
		want := "message_start content_block_start ping content_block_delta content_block_delta content_block_delta content_block_stop message_delta message_stop"
		if strings.Join(names, " ") != want {
			t.Fatalf("got %v", names)
		}
	})

	t.Run("models", func(t *testing.T) {
		resp, err := http.Get(c.base() + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), `"id":"mock-1"`) || !strings.Contains(string(b), `"id":"mock-2"`) {
			t.Fatalf("got %s", b)
		}
	})
}
