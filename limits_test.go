package llmstream

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

func TestTokenLimitFromStreamedUsage(t *testing.T) {
	var bodies []string
	var mu sync.Mutex
	up := usageStream(t, &bodies, &mu) // 60 tokens an answer
	c := startCaddy(t, `llm_stream `+up.URL+` {
		limit {
			tokens 150 1m
		}
	}`)
	body := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	if est := (&inbound{body: withIncludeUsage([]byte(body))}).tokenEstimate(); 3*est > 150 || 120+est <= 150 {
		t.Fatalf("estimate %d breaks the test's arithmetic", est)
	}
	for i, want := range []int{200, 200, 429} {
		// Reservations alone (3 × 38) would fit 150; the real usage
		// (60+60, settled after each stream) leaves no room for the third.
		resp, got := do(t, "POST", c.base()+"/v1/chat/completions", body, nil)
		if resp.StatusCode != want {
			t.Fatalf("request %d: got %d %s, want %d", i+1, resp.StatusCode, got, want)
		}
		if want == 429 && (!strings.Contains(got, `"type":"rate_limit_exceeded"`) || resp.Header.Get("Retry-After") == "") {
			t.Fatalf("refusal: %s, Retry-After %q", got, resp.Header.Get("Retry-After"))
		}
	}
	// A request whose own cap cannot fit is refused before any upstream call.
	calls := len(bodies)
	resp, got := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"gpt-4o","max_tokens":500,"messages":[]}`, map[string]string{"X-Forwarded-For": "1.2.3.4"})
	if resp.StatusCode != 429 || !strings.Contains(got, "more than the limit") || len(bodies) != calls {
		t.Fatalf("oversized reservation: %d %s, upstream calls %d→%d", resp.StatusCode, got, calls, len(bodies))
	}
}

// limitedProxy is llm_stream with two client keys limited to 2 requests
// a minute and one stream at a time, before an upstream that holds paths
// with "hold" until release is closed.
func limitedProxy(t *testing.T, release <-chan struct{}) *instance {
	up := holdUpstream(t, release)
	return startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		client_key sk-one one
		client_key sk-two two
		limit {
			requests 2 1m
			concurrent 1
		}
	}`)
}

// The request past the window's count gets a 429 with Retry-After.
func TestRequestLimit(t *testing.T) {
	c := limitedProxy(t, nil)
	one := map[string]string{"Authorization": "Bearer sk-one"}
	for i, want := range []int{200, 200, 429} {
		resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, one)
		if resp.StatusCode != want {
			t.Fatalf("requests: %d got %d %s", i, resp.StatusCode, got)
		}
		if want == 429 {
			ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			if ra < 1 || ra > 60 || !strings.Contains(got, `"code":"requests_limit_exceeded"`) {
				t.Fatalf("Retry-After %q, body %s", resp.Header.Get("Retry-After"), got)
			}
		}
	}
}

// A stream's slot is held until the stream really ends.
func TestConcurrencyLimit(t *testing.T) {
	release := make(chan struct{})
	c := limitedProxy(t, release)
	two := map[string]string{"Authorization": "Bearer sk-two"}
	held := send(t, "POST", c.base()+"/v1/hold/chat/completions", streamBody, two)
	br := bufio.NewReader(held.Body)
	if line, _ := br.ReadString('\n'); !strings.HasPrefix(line, "data:") {
		t.Fatalf("held stream: %q", line)
	}
	resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, two)
	if resp.StatusCode != 429 || !strings.Contains(got, "concurrent") {
		t.Fatalf("second stream while one is open: %d %s", resp.StatusCode, got)
	}
	close(release)
	io.Copy(io.Discard, br)
	held.Body.Close()
	time.Sleep(50 * time.Millisecond) // the handler settles after the last byte
	if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, two); resp.StatusCode != 200 {
		t.Fatalf("after the stream ended: %d %s", resp.StatusCode, got)
	}
}

// holdUpstream sends one event, and on paths containing "hold" waits for
// release before it ends the stream.
func holdUpstream(t *testing.T, release <-chan struct{}) *fakeUpstream {
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		flushWrite(w, "data: {\"k\":0}\n\n")
		if strings.Contains(r.URL.Path, "hold") {
			<-release
		}
		flushWrite(w, "data: [DONE]\n\n")
	}))
	return srv
}

// slowUsageUpstream streams 10 chunks 30 ms apart, then usage, and says
// whether it was cancelled or ran to the end.
func slowUsageUpstream(t *testing.T, ended chan<- string) *fakeUpstream {
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 0; i < 10; i++ {
			flushWrite(w, "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n")
			select {
			case <-r.Context().Done():
				ended <- "cancelled"
				return
			case <-time.After(30 * time.Millisecond):
			}
		}
		flushWrite(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":10,\"total_tokens\":17}}\n\ndata: [DONE]\n\n")
		ended <- "completed"
	}))
	return srv
}

func TestOnDisconnectDrainAndCancel(t *testing.T) {
	for _, mode := range []string{"cancel", "drain 5s"} {
		t.Run(mode, func(t *testing.T) {
			ended := make(chan string, 1)
			up := slowUsageUpstream(t, ended)
			c := startCaddy(t, `llm_stream `+up.URL+` {
		on_disconnect `+mode+`
	}`)
			ctx, cancel := context.WithCancel(context.Background())
			resp := sendCtx(t, ctx, "POST", c.base()+"/v1/chat/completions", streamBody, nil)
			bufio.NewReader(resp.Body).ReadString('\n')
			cancel() // the user closed the tab
			want, status := "cancelled", `"usage_status":"absent"`
			if mode != "cancel" {
				want, status = "completed", `"prompt_tokens":7,"completion_tokens":10,"total_tokens":17,"usage_status":"exact"`
			}
			select {
			case got := <-ended:
				if got != want {
					t.Fatalf("upstream %s, want %s", got, want)
				}
			case <-time.After(3 * time.Second):
				t.Fatal("upstream neither cancelled nor completed")
			}
			deadline := time.Now().Add(2 * time.Second)
			for !strings.Contains(c.logs(), status) {
				if time.Now().After(deadline) {
					t.Fatalf("no usage record with %s", status)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// caddyBinary builds cmd/caddy once for tests that need a second Caddy
// process (Caddy runs one configuration per process).
var caddyBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "llmstream-caddy")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "caddy")
	out, err := exec.Command("go", "build", "-o", bin, "./cmd/caddy").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building cmd/caddy: %v\n%s", err, out)
	}
	return bin, nil
})

// startProcess runs a second Caddy instance with the given site directives.
func startProcess(t *testing.T, directives string) string {
	t.Helper()
	url, _ := startProcessCmd(t, directives)
	return url
}

// startProcessCmd is startProcess, also returning the process (to kill it).
func startProcessCmd(t *testing.T, directives string) (string, *exec.Cmd) {
	t.Helper()
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	cfg := filepath.Join(t.TempDir(), "Caddyfile")
	os.WriteFile(cfg, []byte(`{
	admin off
	auto_https off
	persist_config off
}
http://127.0.0.1:`+strconv.Itoa(port)+` {
`+directives+`
}
`), 0o600)
	cmd := exec.Command(bin, "run", "--config", cfg, "--adapter", "caddyfile")
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListening(t, port)
	return "http://127.0.0.1:" + strconv.Itoa(port), cmd
}

func TestLimitsSharedThroughRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	rds := redistest.Start(t)
	release := make(chan struct{})
	up := holdUpstream(t, release)
	directives := `llm_stream ` + up.URL + ` {
		allow_paths /v1/*
		client_key sk-team-a a
		client_key sk-team-b b
		limit {
			requests 10 1m
			concurrent 1
		}
		store redis ` + rds.Addr + `
	}`
	b := startProcess(t, directives)
	c := startCaddy(t, directives)
	a := c.base()
	teamA := map[string]string{"Authorization": "Bearer sk-team-a"}
	teamB := map[string]string{"Authorization": "Bearer sk-team-b"}

	ok := 0
	for i := 0; i < 16; i++ {
		base := a
		if i%2 == 1 {
			base = b
		}
		resp, got := do(t, "POST", base+"/v1/chat/completions", chatBody, teamA)
		switch resp.StatusCode {
		case 200:
			ok++
		case 429:
		default:
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, got)
		}
	}
	if ok != 10 {
		t.Fatalf("%d of 16 requests passed across two instances, want exactly 10", ok)
	}

	held := send(t, "POST", a+"/v1/hold/chat/completions", streamBody, teamB)
	br := bufio.NewReader(held.Body)
	br.ReadString('\n')
	if resp, got := do(t, "POST", b+"/v1/chat/completions", chatBody, teamB); resp.StatusCode != 429 || !strings.Contains(got, "concurrent") {
		t.Fatalf("a second stream on the other instance: %d %s", resp.StatusCode, got)
	}
	close(release)
	io.Copy(io.Discard, br)
	held.Body.Close()
	time.Sleep(50 * time.Millisecond)
	if resp, got := do(t, "POST", b+"/v1/chat/completions", chatBody, teamB); resp.StatusCode != 200 {
		t.Fatalf("after the stream on the first instance ended: %d %s", resp.StatusCode, got)
	}
}

func TestRedisDownAndBack(t *testing.T) {
	rds := redistest.Start(t)
	addr := rds.Addr
	rds.Stop()
	up := newUpstream(t)
	cfg := func(fail string) string {
		return `llm_stream ` + up.URL + ` {
		limit {
			requests 100 1m
		}
		store redis ` + addr + ` {
			fail ` + fail + `
		}
	}`
	}
	c := startCaddy(t, cfg("closed"))
	resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil)
	if resp.StatusCode != 503 || !strings.Contains(got, `"code":"limiter_unavailable"`) || up.calls.Load() != 0 {
		t.Fatalf("redis down, fail closed: %d %s", resp.StatusCode, got)
	}
	if !strings.Contains(c.logs(), "limit store unavailable") {
		t.Error("the outage is not logged")
	}
	c.load(cfg("open"))
	if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil); resp.StatusCode != 200 {
		t.Fatalf("redis down, fail open: %d %s", resp.StatusCode, got)
	}
	c.load(cfg("closed"))
	redistest.StartOn(t, addr) // Redis is back on the same address
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Post(c.base()+"/v1/chat/completions", "application/json", strings.NewReader(chatBody))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after Redis came back: %v %v", resp, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
