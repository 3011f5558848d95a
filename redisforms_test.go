package llmstream

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// limitedBy starts llm_stream in front of up with a `requests 2 1m` limit
// kept in the given store.
func limitedBy(t *testing.T, up *fakeUpstream, store string) *instance {
	t.Helper()
	return startCaddy(t, `llm_stream `+up.URL+` {
		limit {
			requests 2 1m
		}
		`+store+`
	}`)
}

// limitHolds checks through base that a `requests 2 1m` limit is enforced
// for the anonymous caller: two answers, then 429.
func limitHolds(t *testing.T, base string) {
	t.Helper()
	for i, want := range []int{200, 200, 429} {
		resp, got := do(t, "POST", base+"/v1/chat/completions", chatBody, nil)
		if resp.StatusCode != want {
			t.Fatalf("request %d: %d %s, want %d", i+1, resp.StatusCode, got, want)
		}
	}
}

// Managed Redis offerings require an ACL user and a password; both may come
// from placeholders, and neither reaches a log line.
func TestRedisACLUserAndPassword(t *testing.T) {
	const userPW, adminPW = "s3cret-llm-user-pw", "s3cret-admin-pw"
	rds := redistest.StartArgs(t, "--requirepass", adminPW, "--user", "llm", "on", ">"+userPW, "~*", "&*", "+@all")
	up := newUpstream(t)
	t.Setenv("TEST_REDIS_URL", "redis://llm:"+userPW+"@"+rds.Addr+"/0")
	t.Setenv("TEST_REDIS_PW", userPW)
	for _, tc := range []struct{ name, store string }{
		{"url placeholder", `store redis {env.TEST_REDIS_URL}`},
		{"block", `store redis ` + rds.Addr + ` 0 {
			username llm
			password {env.TEST_REDIS_PW}
			prefix block:
		}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := limitedBy(t, up, tc.store)
			limitHolds(t, c.base())
			if strings.Contains(c.logs(), userPW) {
				t.Error("the Redis password reached the log")
			}
		})
	}
	t.Run("wrong password", func(t *testing.T) {
		t.Setenv("TEST_REDIS_URL", "redis://llm:wrong-pw-123@"+rds.Addr)
		c := limitedBy(t, up, `store redis {env.TEST_REDIS_URL}`)
		resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil)
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(got, "limiter_unavailable") {
			t.Fatalf("wrong password, fail closed: %d %s", resp.StatusCode, got)
		}
		if strings.Contains(c.logs(), "wrong-pw-123") || strings.Contains(got, "wrong-pw-123") {
			t.Error("the password reached a log line or the client")
		}
	})
	// The adapted JSON keeps the placeholder, never the value.
	cfg := loadConfig(t, `:8080 {
	llm_stream `+up.URL+` {
		store redis {env.TEST_REDIS_URL} {
			password {env.TEST_REDIS_PW}
		}
	}
}`)
	if strings.Contains(string(cfg), userPW) || !strings.Contains(string(cfg), "{env.TEST_REDIS_URL}") {
		t.Errorf("caddy adapt output: %s", cfg)
	}
}

func TestRedisTLS(t *testing.T) {
	rds := redistest.StartTLS(t)
	up := newUpstream(t)
	for _, tc := range []struct{ name, store string }{
		{"rediss url with ca", `store redis rediss://` + rds.Addr + ` {
			tls {
				ca ` + rds.CAFile + `
			}
		}`},
		{"address with tls", `store redis ` + rds.Addr + ` {
			tls {
				ca ` + rds.CAFile + `
			}
			prefix tls2:
		}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := limitedBy(t, up, tc.store)
			limitHolds(t, c.base())
		})
	}
	t.Run("unknown CA refused", func(t *testing.T) {
		c := limitedBy(t, up, "store redis rediss://"+rds.Addr)
		if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil); resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("a server whose certificate is not trusted: %d %s, want 503", resp.StatusCode, got)
		}
	})
}

// With Sentinel, a forced failover in the middle of a workload: the limit
// keeps holding afterwards, nothing panics, and the window in which
// requests were refused (fail closed) is reported.
func TestRedisSentinelFailover(t *testing.T) {
	for _, mode := range []string{"forced failover", "master killed", "passwords on master and sentinel"} {
		t.Run(mode, func(t *testing.T) { sentinelFailover(t, mode) })
	}
}

func sentinelFailover(t *testing.T, mode string) {
	s, auth := redistest.StartSentinel(t), ""
	if mode == "passwords on master and sentinel" {
		// A protected set-up: the master's password and the sentinels' own.
		s = redistest.StartProtectedSentinel(t, "master-pw-9x", "sentinel-pw-7y")
		auth = "password master-pw-9x\n\t\t\tsentinel_password sentinel-pw-7y"
	}
	up := newUpstream(t)
	// A day's window: the count of the window before weighs in by the time
	// left (a sliding window), so with a minute's window busy would get one
	// request back 3 s after a minute's boundary, and this test takes longer.
	c := startCaddy(t, `llm_stream `+up.URL+` {
		client_key sk-busy busy
		client_key sk-quiet quiet
		limit {
			requests 20 24h
		}
		store redis `+s.Addr+` {
			sentinel `+s.Name+`
			`+auth+`
		}
	}`)
	busy := map[string]string{"Authorization": "Bearer sk-busy"}
	quiet := map[string]string{"Authorization": "Bearer sk-quiet"}
	// Before the failover busy uses all of its 20, quiet 5.
	for i := 0; i < 20; i++ {
		if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, busy); resp.StatusCode != 200 {
			t.Fatalf("before the failover: %d %s", resp.StatusCode, got)
		}
	}
	for i := 0; i < 5; i++ {
		if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, quiet); resp.StatusCode != 200 {
			t.Fatalf("before the failover: %d %s", resp.StatusCode, got)
		}
	}
	// Let the replica catch up with what quiet used (replication is
	// asynchronous; a failover can lose the last writes).
	time.Sleep(200 * time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	failedOver := make(chan struct{})
	go func() {
		defer close(failedOver)
		if mode == "master killed" {
			s.KillMaster(t, ctx)
		} else {
			s.Failover(t, ctx)
		}
	}()
	var refused, ok, limited int
	var firstRefused, lastRefused time.Time
	askBusy := func() {
		resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, busy)
		switch resp.StatusCode {
		case 200:
			ok++
		case 429:
			limited++
		case 503:
			refused++
			if firstRefused.IsZero() {
				firstRefused = time.Now()
			}
			lastRefused = time.Now()
		default:
			t.Fatalf("during the failover: %d", resp.StatusCode)
		}
	}
	start := time.Now()
	for done := false; !done; time.Sleep(20 * time.Millisecond) {
		select {
		case <-failedOver:
			done = true
		default:
		}
		askBusy()
	}
	// Replication is asynchronous: a write the old master takes after the
	// promotion and before the sentinel demotes it is lost (Redis's own
	// property). Let the old master be reconfigured and the client switch,
	// while busy keeps asking.
	for settle := time.Now().Add(2 * time.Second); time.Now().Before(settle); time.Sleep(50 * time.Millisecond) {
		askBusy()
	}
	window := time.Duration(0)
	if !firstRefused.IsZero() {
		window = lastRefused.Sub(firstRefused)
	}
	t.Logf("%s, and 2s after it, %s in all: %d admitted, %d limited, %d refused (fail closed) over %s", mode,
		time.Since(start).Round(time.Millisecond), ok, limited, refused, window.Round(time.Millisecond))
	if ok > 0 {
		t.Errorf("busy, at its limit before the failover, was admitted %d times during and after it", ok)
	}
	// quiet had used 5 of 20 before: 15 more, then 429 — the counts
	// survived the failover.
	for i := 0; i < 15; i++ {
		if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, quiet); resp.StatusCode != 200 {
			t.Fatalf("quiet's request %d after the failover: %d %s", i+6, resp.StatusCode, got)
		}
	}
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, quiet); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("quiet's 21st request: %d, want 429: the limit did not hold across the failover", resp.StatusCode)
	}
	if logs := c.logs(); strings.Contains(logs, "master-pw-9x") || strings.Contains(logs, "sentinel-pw-7y") {
		t.Error("a Redis password reached the log")
	}
}

// A 3-node Redis Cluster enforces one limit for two Caddy instances: the
// admission script's keys share the identity's hash tag.
func TestRedisClusterSharedLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	cl := redistest.StartCluster(t)
	up := newUpstream(t)
	directives := `llm_stream ` + up.URL + ` {
		client_key sk-a a
		client_key sk-b b
		client_key sk-c c
		limit {
			requests 6 1m
			concurrent 2
		}
		stop_endpoint /v1/stop
		cache 1m {
			store redis
		}
		store redis ` + strings.Join(cl.Addrs, " ") + `
	}`
	other := startProcess(t, directives)
	c := startCaddy(t, directives)
	for _, key := range []string{"sk-a", "sk-b", "sk-c"} {
		hdr := map[string]string{"Authorization": "Bearer " + key}
		ok := 0
		for i := 0; i < 10; i++ {
			base := c.base()
			if i%2 == 1 {
				base = other
			}
			resp, got := do(t, "POST", base+"/v1/chat/completions", chatBody, hdr)
			switch resp.StatusCode {
			case 200:
				ok++
			case 429:
			default:
				t.Fatalf("%s request %d: %d %s", key, i, resp.StatusCode, got)
			}
		}
		if ok != 6 {
			t.Errorf("%s: %d of 10 admitted across two instances on a Cluster, want 6", key, ok)
		}
	}
	if strings.Contains(c.logs(), "CROSSSLOT") {
		t.Error("a script touched keys of several slots")
	}
}
