package llmstream

import (
	"bufio"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// An instance killed (OOM, kill -9) while it holds what limits a caller
// — a concurrency slot, or a spend reservation — must not lock the
// caller out: both are leases the holder renews, free within the lease.
func TestKilledInstanceFreesWhatItHeldWithinTheLease(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	const lease = 3 * time.Second
	for _, tc := range []struct {
		name, limit, body string
		refused           int
		code              string
	}{
		{"concurrency slot", "concurrent 1", chatBody, http.StatusTooManyRequests, "concurrent_limit_exceeded"},
		// max_tokens 1000 at $8/M reserves $0.008 of the $0.01.
		{"spend reservation", "spend 0.01 1h", `{"model":"m","stream":true,"max_tokens":1000,"messages":[]}`, http.StatusPaymentRequired, "spend_limit_exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rds := redistest.Start(t)
			release := make(chan struct{})
			defer close(release)
			up := holdUpstream(t, release)
			directives := `llm_stream ` + up.URL + ` {
		allow_paths /v1/*
		price m input 1 output 8
		limit {
			` + tc.limit + `
			slot_lease 3s
		}
		store redis ` + rds.Addr + `
	}`
			a, proc := startProcessCmd(t, directives)
			c := startCaddy(t, directives)
			held := send(t, "POST", a+"/v1/hold/chat/completions", tc.body, nil)
			defer held.Body.Close()
			if held.StatusCode != http.StatusOK {
				t.Fatalf("the stream on the first instance: %d", held.StatusCode)
			}
			bufio.NewReader(held.Body).ReadString('\n')
			// Longer than a lease: the holder renews it while the stream lives.
			time.Sleep(lease + time.Second)
			if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", tc.body, nil); resp.StatusCode != tc.refused || !strings.Contains(got, tc.code) {
				t.Fatalf("while the first instance streams (past one lease): %d %s, want %d %s", resp.StatusCode, got, tc.refused, tc.code)
			}
			took := killUntilAdmitted(t, proc, c.base()+"/v1/chat/completions", tc.body, lease)
			t.Logf("%s of the killed instance free %s after kill -9 (lease %s)", tc.name, took.Round(time.Millisecond), lease)
		})
	}
}

// killUntilAdmitted kills proc (SIGKILL: no cleanup runs) and posts body
// to url until it is admitted, failing past the lease. It returns how long
// after the kill that was.
func killUntilAdmitted(t *testing.T, proc *exec.Cmd, url, body string, lease time.Duration) time.Duration {
	t.Helper()
	if err := proc.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	proc.Wait()
	for {
		if resp, _ := do(t, "POST", url, body, nil); resp.StatusCode == http.StatusOK {
			break
		}
		if time.Since(killed) > lease+2*time.Second {
			t.Fatalf("what the killed instance held still counts %s after the kill (lease %s)", time.Since(killed), lease)
		}
		time.Sleep(50 * time.Millisecond)
	}
	took := time.Since(killed)
	if took > lease+500*time.Millisecond {
		t.Errorf("freed after %s, want within the lease (%s)", took, lease)
	}
	return took
}

// Three instances on one Redis, 300 concurrent requests from one cold
// identity: the request limit admits exactly its count, and the token limit
// admits no more than its budget in reservations.
func TestThreeInstancesShareExactLimits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two more Caddy processes")
	}
	rds := redistest.Start(t)
	// The upstream holds every answer until all 300 requests were decided,
	// so no settlement refunds a reservation while admissions race.
	var calls atomic.Int32
	gate := make(chan struct{})
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		calls.Add(1)
		<-gate
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}`)
	}))
	var gateOnce sync.Once
	t.Cleanup(func() { gateOnce.Do(func() { close(gate) }) })
	body := `{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`
	reserve := len(body)/3 + 100 // the documented estimate: size / 3 + max_tokens
	for _, tc := range []struct {
		name, limit, prefix string
		want                int
	}{
		// Day-long windows: past a window's boundary the window before
		// counts less by the second (a sliding window), and at 5000 tokens
		// a minute's window would take one reservation more 24 ms after it.
		{"requests", "requests 50 24h", "req:", 50},
		{"tokens", "tokens 5000 24h", "tok:", 5000 / reserve},
	} {
		t.Run(tc.name, func(t *testing.T) {
			directives := `llm_stream ` + up.URL + ` {
		limit {
			` + tc.limit + `
		}
		store redis ` + rds.Addr + ` {
			prefix ` + tc.prefix + `
		}
	}`
			bases := []string{startProcess(t, directives), startProcess(t, directives), startCaddy(t, directives).base()}
			var ok, refused atomic.Int32
			var wg sync.WaitGroup
			start := make(chan struct{})
			client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 0, MaxIdleConnsPerHost: 100}}
			for i := 0; i < 300; i++ {
				wg.Add(1)
				go func(base string) {
					defer wg.Done()
					<-start
					resp, err := client.Post(base+"/v1/chat/completions", "application/json", strings.NewReader(body))
					if err != nil {
						t.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					switch resp.StatusCode {
					case http.StatusOK:
						ok.Add(1)
					case http.StatusTooManyRequests:
						refused.Add(1)
					default:
						t.Errorf("status %d", resp.StatusCode)
					}
				}(bases[i%3])
			}
			gate = make(chan struct{})
			gateOnce = sync.Once{}
			calls.Store(0)
			close(start)
			deadline := time.Now().Add(20 * time.Second)
			for int(calls.Load())+int(refused.Load()) < 300 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			admitted := calls.Load()
			gateOnce.Do(func() { close(gate) })
			wg.Wait()
			if int(ok.Load()) > tc.want || int(ok.Load())+int(refused.Load()) != 300 {
				t.Fatalf("admitted %d, refused %d of 300; want at most %d admitted", ok.Load(), refused.Load(), tc.want)
			}
			if admitted != ok.Load() {
				t.Errorf("the upstream got %d calls for %d admitted requests", admitted, ok.Load())
			}
			if int(ok.Load()) != tc.want {
				t.Errorf("admitted %d, want exactly %d (%s)", ok.Load(), tc.want, tc.limit)
			}
			t.Logf("%s: %d admitted of 300 across three instances (limit allows %d)", tc.name, ok.Load(), tc.want)
		})
	}
}

// With store redis, what one instance learns about keys and upstreams holds
// for all: a key answered with 429 on one instance is not called by the
// other while it rests, and an upstream one instance took out is out for
// the other.
func TestRestsAndHealthSharedThroughRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	rds := redistest.Start(t)
	var brokenCalls atomic.Int32
	up := newBusyKeyUpstream(t)
	busyCalls := &up.busyCalls
	broken := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		brokenCalls.Add(1)
		w.WriteHeader(http.StatusBadGateway)
	}))
	directives := `llm_stream {
		upstream ` + up.URL + ` {
			api_key sk-busy sk-free
			models gpt-4o
		}
		upstream ` + broken.URL + ` {
			models mini
		}
		upstream ` + up.URL + `/fallback {
			api_key sk-free
			models mini
			priority 1
		}
		unhealthy_after 1 10m
		store redis ` + rds.Addr + `
	}`
	b := startProcess(t, directives)
	a := startCaddy(t, directives).base()
	gpt := `{"model":"gpt-4o","messages":[]}`
	mini := `{"model":"mini","messages":[]}`

	// On a: round robin over two keys meets the busy key within two
	// requests; the broken upstream fails once and is out.
	for i := 0; i < 2; i++ {
		if resp, got := do(t, "POST", a+"/v1/chat/completions", gpt, nil); resp.StatusCode != 200 {
			t.Fatalf("a: %d %s", resp.StatusCode, got)
		}
	}
	if resp, got := do(t, "POST", a+"/v1/chat/completions", mini, nil); resp.StatusCode != 200 {
		t.Fatalf("a, mini: %d %s", resp.StatusCode, got)
	}
	if busyCalls.Load() != 1 || brokenCalls.Load() != 1 {
		t.Fatalf("a called the busy key %d times and the broken upstream %d times, want once each", busyCalls.Load(), brokenCalls.Load())
	}
	time.Sleep(500 * time.Millisecond) // the decisions reach b through Redis pub/sub

	for i := 0; i < 6; i++ {
		if resp, got := do(t, "POST", b+"/v1/chat/completions", gpt, nil); resp.StatusCode != 200 {
			t.Fatalf("b: %d %s", resp.StatusCode, got)
		}
		if resp, got := do(t, "POST", b+"/v1/chat/completions", mini, nil); resp.StatusCode != 200 {
			t.Fatalf("b, mini: %d %s", resp.StatusCode, got)
		}
	}
	if n := busyCalls.Load(); n != 1 {
		t.Errorf("b called the key resting after a 429 on a %d times", n-1)
	}
	if n := brokenCalls.Load(); n != 1 {
		t.Errorf("b called the upstream a took out %d times", n-1)
	}

	// An instance that starts now learns the rest in force.
	c := startProcess(t, directives)
	time.Sleep(500 * time.Millisecond) // it reads the rests in force in the background
	for i := 0; i < 4; i++ {
		if resp, got := do(t, "POST", c+"/v1/chat/completions", gpt, nil); resp.StatusCode != 200 {
			t.Fatalf("c: %d %s", resp.StatusCode, got)
		}
	}
	if n := busyCalls.Load(); n != 1 {
		t.Errorf("an instance started later called the resting key %d times", n-1)
	}
}
