package llmstream

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// rawRequest sends a request line exactly as given (no client-side path
// normalisation) and returns the status and body.
func rawRequest(t *testing.T, port int, method, target, body string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req := method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" +
		"Content-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// With allow_paths /v1/chat/*, no spelling of a path outside it reaches
// the upstream (which would resolve /v1/chat/../files to the owner's
// files), and allowed paths arrive exactly as sent.
func TestRawPathsCannotLeaveAllowedPrefix(t *testing.T) {
	var mu sync.Mutex
	var got []string
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.RequestURI)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"chat.completion","choices":[]}`)
	}))
	c := startCaddy(t, `llm_stream `+up.URL+`/compatible-mode {
		allow_paths /v1/chat/*
	}`)
	body := `{"model":"m","messages":[]}`
	for _, target := range []string{
		"/v1/chat/../files",
		"/v1/chat/../../v1/files",
		"/v1/chat/%2e%2e/files",
		"/v1/chat/%2E%2E/files",
		"/v1/chat/.%2e/files",
		"/v1/chat/..%2Ffiles",
		"/v1/chat/x%2F..%2F..%2Ffiles",
		"/v1/chat/x%2f..%2f..%2ffiles",
		"/v1/chat/..\\files",
		"/v1/chat/..%5Cfiles",
		"/v1/chat/..%5cfiles",
		"/v1/chat/completions%00/../../files",
		"/v1/chat/%00",
		"/v1/files",
		"/v1//files",
		"/v1/chat",
	} {
		status, b := rawRequest(t, c.port, "POST", target, body)
		if status != http.StatusNotFound || !strings.Contains(b, `"code":"unknown_url"`) || !strings.Contains(b, `"type":"invalid_request_error"`) {
			t.Errorf("POST %s: got %d %s, want 404 unknown_url", target, status, b)
		}
	}
	mu.Lock()
	if len(got) != 0 {
		t.Fatalf("the upstream was reached by refused paths: %q", got)
	}
	mu.Unlock()

	for _, tc := range []struct{ target, want string }{
		{"/v1/chat/completions", "/compatible-mode/v1/chat/completions"},
		{"/v1/chat/completions?api-version=2024-10-21", "/compatible-mode/v1/chat/completions?api-version=2024-10-21"},
		{"/v1/chat/a%3Ab", "/compatible-mode/v1/chat/a%3Ab"},
		// Dot segments that stay inside the allowed prefix: what is
		// forwarded is the cleaned path that was matched.
		{"/v1/chat/x/../completions", "/compatible-mode/v1/chat/completions"},
		{"/v1//chat/completions", "/compatible-mode/v1/chat/completions"},
	} {
		mu.Lock()
		got = got[:0]
		mu.Unlock()
		if status, b := rawRequest(t, c.port, "POST", tc.target, body); status != http.StatusOK {
			t.Errorf("POST %s: %d %s", tc.target, status, b)
			continue
		}
		mu.Lock()
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("POST %s reached the upstream as %q, want %q", tc.target, got, tc.want)
		}
		mu.Unlock()
	}
}
