package llmstream

import (
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// BenchmarkPlainRequest sends one non-streamed chat completion through a
// real Caddy server to Caddy's reverse_proxy and to llm_stream, side by
// side, against the same loopback upstream, and directly to the upstream:
// minus direct, what each proxy costs per request (the client, the server
// and the upstream are the same for both). Compare instruction counts
// (valgrind --tool=callgrind) rather than wall time on a shared machine.
func BenchmarkPlainRequest(b *testing.B) {
	up := newUpstream(b, unrecorded(), answering(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}`)
	}))
	u, _ := url.Parse(up.URL)
	c := startCaddy(b, `
	handle_path /rp/* {
		reverse_proxy `+u.Host+` {
			header_up Authorization "Bearer sk-bench"
		}
	}
	handle_path /ls/* {
		llm_stream `+up.URL+` {
			api_key sk-bench
		}
	}`)
	client := &http.Client{Transport: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 4}}
	body := `{"model":"gpt-4o","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`
	for _, name := range []string{"direct", "reverse_proxy", "llm_stream"} {
		url := map[string]string{"direct": up.URL, "reverse_proxy": c.base() + "/rp", "llm_stream": c.base() + "/ls"}[name] + "/v1/chat/completions"
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Post(url, "application/json", strings.NewReader(body))
				if err != nil {
					b.Fatal(err)
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || !strings.Contains(string(got), "chat.completion") {
					b.Fatalf("status %d: %s", resp.StatusCode, got)
				}
			}
		})
	}
}
