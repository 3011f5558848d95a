package llmmock

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// post sends a JSON body and returns the response and its body.
func post(t *testing.T, url, body string) (*http.Response, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// llm_mock behaves like a provider: its own request id on every answer,
// and 404 model_not_found for a model it does not serve when models is set.
func TestAnswersLikeAProvider(t *testing.T) {
	m := &Mock{Models: []string{"mock-1"}, Interval: -1}
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _ = m.ServeHTTP(w, r, nil) }))
	defer srv.Close()
	resp, body := post(t, srv.URL+"/v1/chat/completions", `{"model":"gpt-4o","messages":[]}`)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(body, `"code":"model_not_found"`) {
		t.Errorf("an unknown model: %d %s", resp.StatusCode, body)
	}
	resp, _ = post(t, srv.URL+"/v1/chat/completions", `{"model":"mock-1","messages":[]}`)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("X-Request-Id"), "req_") || resp.Header.Get("X-Ratelimit-Remaining-Requests") == "" {
		t.Errorf("a served model: %d %v", resp.StatusCode, resp.Header)
	}
	// as many headers as the hosted API sends, its edge's included
	if n := len(resp.Header); n < 20 || len(resp.Header.Values("Set-Cookie")) != 2 || resp.Header.Get("Cf-Ray") == "" || resp.Header.Get("Openai-Organization") == "" {
		t.Errorf("OpenAI's %d headers: %v", n, resp.Header)
	}
	resp, _ = post(t, srv.URL+"/v1/messages", `{"model":"mock-1","max_tokens":5,"messages":[]}`)
	if !strings.HasPrefix(resp.Header.Get("Request-Id"), "req_") || resp.Header.Get("Anthropic-Ratelimit-Requests-Limit") == "" {
		t.Errorf("Anthropic style: %v", resp.Header)
	}
}
