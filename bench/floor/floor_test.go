package floor

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy" // the http transport
)

// The floor must relay what it measures: the answer byte for byte, with
// the key sent upstream, or its figures would be of something else.
func TestFloorRelaysTheAnswer(t *testing.T) {
	answer := "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n" + strings.Repeat("data: {\"choices\":[{\"delta\":{\"content\":\"a burst\"}}]}\n\n", 200) + "data: [DONE]\n\n"
	var gotAuth, gotBody, gotPath string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth, gotPath = r.Header.Get("Authorization"), r.URL.RequestURI()
		b, _ := io.ReadAll(r.Body)
		gotBody = string(b)
		w.Header().Set("Content-Type", "text/event-stream")
		for _, part := range strings.SplitAfter(answer, "\n\n") {
			_, _ = io.WriteString(w, part)
			w.(http.Flusher).Flush()
		}
	}))
	defer up.Close()

	f := new(Floor)
	d := caddyfile.NewTestDispenser("bench_floor " + up.URL + " {\n api_key sk-test\n transport http\n}")
	if err := f.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := f.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions?x=1", strings.NewReader(`{"stream":true}`))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	if err := f.ServeHTTP(rec, req, nil); err != nil {
		t.Fatal(err)
	}
	if rec.Body.String() != answer {
		t.Errorf("relayed %q, want %q", rec.Body.String(), answer)
	}
	if gotAuth != "Bearer sk-test" || gotBody != `{"stream":true}` || gotPath != "/v1/chat/completions?x=1" {
		t.Errorf("upstream got auth %q body %q path %q", gotAuth, gotBody, gotPath)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
}
