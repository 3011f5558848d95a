package llmstream

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sort"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/store"
)

// BenchmarkAdmission measures what admission adds to a request: finding
// the caller among 1,000 client keys (constant-time compare against every
// digest) plus the atomic limit check, in memory and with Redis on
// loopback. Settlement after the answer is outside the timing.
func BenchmarkAdmission(b *testing.B) {
	run := func(b *testing.B, st store.Store) {
		h := &Handler{store: st, logger: nopLogger(), inflight: new(syncWaitGroup)}
		for i := 0; i < 1000; i++ {
			k, _ := parseClientKey("sk-client-"+string(rune('a'+i%26))+time.Duration(i).String(), "")
			h.ClientKeys = append(h.ClientKeys, k)
		}
		if err := h.loadClientKeys(); err != nil {
			b.Fatal(err)
		}
		h.limits = store.Limits{Requests: 1 << 40, RequestWindow: time.Minute, Tokens: 1 << 50,
			TokenWindow: time.Minute, Concurrent: 1 << 30, SlotTTL: time.Hour}
		req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
		req.Header.Set("Authorization", "Bearer sk-client-a0s")
		var lat []time.Duration
		for b.Loop() {
			t0 := time.Now()
			id := h.identify(req)
			ad, e := h.admitLimits(context.Background(), id, 500, 0)
			lat = append(lat, time.Since(t0))
			if id == "" || e != nil {
				b.Fatalf("identity %q, %v", id, e)
			}
			b.StopTimer()
			h.settle(ad, &usage{status: usageExact, totalTokens: 100}, 0)
			b.StartTimer()
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
	}
	b.Run("memory", func(b *testing.B) { run(b, store.NewMemory()) })
	b.Run("redis", func(b *testing.B) {
		srv := redistest.Start(b)
		st := mustStoreRedis(b, store.RedisOptions{Addrs: []string{srv.Addr}, Prefix: "bench:"})
		defer st.Close()
		run(b, st)
	})
}

func mustStoreRedis(t testing.TB, o store.RedisOptions) *store.Redis {
	t.Helper()
	r, err := store.NewRedis(o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
