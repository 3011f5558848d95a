package store

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// stores runs a test against the memory store and a real redis-server.
func stores(t *testing.T, f func(t *testing.T, s Store)) {
	t.Run("memory", func(t *testing.T) { f(t, NewMemory()) })
	t.Run("redis", func(t *testing.T) {
		srv := redistest.Start(t)
		s := mustNewRedis(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: fmt.Sprintf("test%d:", time.Now().UnixNano())})
		t.Cleanup(func() { s.Close() })
		f(t, s)
	})
}

func TestRequestsWindow(t *testing.T) {
	stores(t, func(t *testing.T, s Store) {
		l := Limits{Requests: 3, RequestWindow: time.Minute}
		t0 := time.Unix(6000, 0) // the start of a minute window
		for i := 0; i < 3; i++ {
			d, err := s.Admit(context.Background(), l, Admission{ID: "a", Now: t0.Add(time.Duration(i) * time.Second)})
			if err != nil || !d.Allowed {
				t.Fatalf("request %d: %+v %v", i, d, err)
			}
		}
		d, _ := s.Admit(context.Background(), l, Admission{ID: "a", Now: t0.Add(10 * time.Second)})
		if d.Allowed || d.Limit != "requests" || d.RetryAfter != 50*time.Second {
			t.Fatalf("4th request: got %+v, want refused with Retry-After 50s", d)
		}
		if d, _ := s.Admit(context.Background(), l, Admission{ID: "b", Now: t0}); !d.Allowed {
			t.Fatal("another identity was refused")
		}
		// Sliding: at 1m30s the previous window still counts half: 3*0.5+1 > 3? no → allowed once.
		if d, _ := s.Admit(context.Background(), l, Admission{ID: "a", Now: t0.Add(90 * time.Second)}); !d.Allowed {
			t.Fatalf("half a window later: %+v", d)
		}
		if d, _ := s.Admit(context.Background(), l, Admission{ID: "a", Now: t0.Add(91 * time.Second)}); d.Allowed {
			t.Fatal("the sliding window let too much through")
		}
	})
}

func TestTokensReserveAndSettle(t *testing.T) {
	stores(t, func(t *testing.T, s Store) {
		ctx := context.Background()
		l := Limits{Tokens: 100, TokenWindow: time.Minute}
		t0 := time.Unix(6000, 0)
		if d, _ := s.Admit(ctx, l, Admission{ID: "a", Reserve: 101, Now: t0}); d.Allowed || d.Limit != "tokens" {
			t.Fatalf("an oversized reservation was admitted: %+v", d)
		}
		a := Admission{ID: "a", Reserve: 80, Now: t0}
		if d, _ := s.Admit(ctx, l, a); !d.Allowed {
			t.Fatal("first request refused")
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "a", Reserve: 30, Now: t0.Add(time.Second)}); d.Allowed {
			t.Fatal("reservation not counted")
		}
		// real usage was 20: 60 tokens come back
		if err := s.Settle(ctx, l, a, 20-80, 0); err != nil {
			t.Fatal(err)
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "a", Reserve: 30, Now: t0.Add(2 * time.Second)}); !d.Allowed {
			t.Fatal("settlement did not return the unused reservation")
		}
	})
}

func TestConcurrentSlotsAtomic(t *testing.T) {
	stores(t, func(t *testing.T, s Store) {
		ctx := context.Background()
		l := Limits{Concurrent: 5, SlotTTL: time.Hour, Requests: 1000, RequestWindow: time.Minute}
		now := time.Now()
		var mu sync.Mutex
		var admitted []Admission
		var wg sync.WaitGroup
		for i := 0; i < 40; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				a := Admission{ID: "c", Slot: fmt.Sprint("s", i), Now: now}
				d, err := s.Admit(ctx, l, a)
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					mu.Lock()
					admitted = append(admitted, a)
					mu.Unlock()
				} else if d.Limit != "concurrent" {
					t.Errorf("refused for %s", d.Limit)
				}
			}(i)
		}
		wg.Wait()
		if len(admitted) != 5 {
			t.Fatalf("%d of 40 concurrent admissions passed, want exactly 5", len(admitted))
		}
		sort.Slice(admitted, func(i, j int) bool { return admitted[i].Slot < admitted[j].Slot })
		if err := s.Settle(ctx, l, admitted[0], 0, 0); err != nil {
			t.Fatal(err)
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "c", Slot: "new", Now: now}); !d.Allowed {
			t.Fatal("a released slot was not reusable")
		}
		// a slot whose holder died is reclaimed after SlotTTL
		if d, _ := s.Admit(ctx, l, Admission{ID: "c", Slot: "late", Now: now.Add(2 * time.Hour)}); !d.Allowed {
			t.Fatal("stale slots were not reclaimed")
		}
	})
}

// A budget counts what settled requests cost plus what the requests in
// flight reserved; a reservation whose holder died stops counting when
// its lease runs out; what a request cost counts in its window.
func TestSpendReservationsAndSettlement(t *testing.T) {
	stores(t, func(t *testing.T, s Store) {
		ctx := context.Background()
		l := Limits{Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Minute}
		t0 := time.Unix(36000, 0) // the start of an hour window
		admit := func(slot string, reserve int64, at time.Duration) (Admission, Decision) {
			a := Admission{ID: "a", Slot: slot, Spend: reserve, Now: t0.Add(at)}
			d, err := s.Admit(ctx, l, a)
			if err != nil {
				t.Fatal(err)
			}
			return a, d
		}
		if _, d := admit("big", 1001, 0); d.Allowed || d.Limit != "spend" || d.RetryAfter != time.Hour {
			t.Fatalf("a reservation over the whole budget: %+v", d)
		}
		a1, d := admit("s1", 600, 0)
		if !d.Allowed {
			t.Fatalf("first request refused: %+v", d)
		}
		if _, d := admit("s2", 500, time.Second); d.Allowed {
			t.Fatal("the reservation in flight was not counted")
		}
		// It cost 250: 750 remain.
		if err := s.Settle(ctx, l, a1, 0, 250); err != nil {
			t.Fatal(err)
		}
		a2, d := admit("s2", 500, 2*time.Second)
		if !d.Allowed {
			t.Fatalf("after settling, 750 left for 500: %+v", d)
		}
		if _, d := admit("s3", 300, 3*time.Second); d.Allowed {
			t.Fatal("spent 250 + held 500 + 300 > 1000 was admitted")
		}
		// a2's holder dies: its reservation lapses with its lease.
		_ = a2
		if _, d := admit("s3", 300, 2*time.Second+l.SlotTTL+time.Second); !d.Allowed {
			t.Fatalf("a dead holder's reservation outlived its lease: %+v", d)
		}
		// A renewed lease keeps its reservation.
		a4, _ := admit("s4", 400, 5*time.Minute)
		if err := s.Renew(ctx, l, []Admission{a4}, t0.Add(5*time.Minute+3*l.SlotTTL)); err != nil {
			t.Fatal(err)
		}
		if _, d := admit("s5", 400, 5*time.Minute+2*l.SlotTTL); d.Allowed {
			t.Fatal("a renewed reservation lapsed")
		}
	})
}

func TestRedisDown(t *testing.T) {
	srv := redistest.Start(t)
	s := mustNewRedis(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "down:"})
	defer s.Close()
	srv.Stop()
	if _, err := s.Admit(context.Background(), Limits{Requests: 1, RequestWindow: time.Minute}, Admission{ID: "a", Now: time.Now()}); err == nil {
		t.Fatal("no error with redis down")
	}
}

func BenchmarkAdmit(b *testing.B) {
	run := func(b *testing.B, s Store) {
		l := Limits{Requests: 1 << 40, RequestWindow: time.Minute, Tokens: 1 << 50, TokenWindow: time.Minute, Concurrent: 1 << 30, SlotTTL: time.Hour}
		ctx := context.Background()
		var lat []time.Duration
		i := 0
		for b.Loop() {
			i++
			a := Admission{ID: fmt.Sprint("id", i%100), Reserve: 500, Slot: fmt.Sprint(i), Now: time.Now()}
			t0 := time.Now()
			if d, err := s.Admit(ctx, l, a); err != nil || !d.Allowed {
				b.Fatal(d, err)
			}
			lat = append(lat, time.Since(t0))
			b.StopTimer()
			_ = s.Settle(ctx, l, a, -400, 0)
			b.StartTimer()
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
	}
	b.Run("memory", func(b *testing.B) { run(b, NewMemory()) })
	b.Run("redis", func(b *testing.B) {
		srv := redistest.Start(b)
		s := mustNewRedis(b, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "bench:"})
		defer s.Close()
		run(b, s)
	})
}

func mustNewRedis(t testing.TB, o RedisOptions) *Redis {
	t.Helper()
	r, err := NewRedis(o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
