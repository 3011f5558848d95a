package store

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// stores runs a test against the memory store and a real redis-server.
func stores(t *testing.T, f func(t *testing.T, s Store)) {
	instances(t, func(t *testing.T, s, _ Store) { f(t, s) })
}

// instances runs a test with two instances sharing one store: one memory
// store for both (one process), or two Redis stores on one server.
func instances(t *testing.T, f func(t *testing.T, s, peer Store)) {
	t.Run("memory", func(t *testing.T) {
		m := NewMemory()
		f(t, m, m)
	})
	t.Run("redis", func(t *testing.T) {
		srv := redistest.Start(t)
		s, peer := redisPair(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: fmt.Sprintf("test%d:", time.Now().UnixNano())})
		f(t, s, peer)
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
	instances(t, func(t *testing.T, s, peer Store) {
		ctx := context.Background()
		l := Limits{Concurrent: 5, SlotTTL: time.Hour, Requests: 1000, RequestWindow: time.Minute}
		now := time.Now()
		type admittedBy struct {
			a  Admission
			by Store
		}
		var mu sync.Mutex
		var admitted []admittedBy
		var wg sync.WaitGroup
		for i := 0; i < 40; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				a := Admission{ID: "c", Now: now}
				by := s
				if i%2 == 1 {
					by = peer // two instances admit at once
				}
				d, err := by.Admit(ctx, l, a)
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					mu.Lock()
					admitted = append(admitted, admittedBy{a, by})
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
		if err := admitted[0].by.Settle(ctx, l, admitted[0].a, 0, 0); err != nil {
			t.Fatal(err)
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "c", Now: now}); !d.Allowed {
			t.Fatal("a released slot was not reusable")
		}

		// The slots of an instance that died are reclaimed when their lease
		// ends, not before. (In memory, nothing outlives the process.)
		if s == peer {
			return
		}
		for i := range 5 {
			if d, _ := peer.Admit(ctx, l, Admission{ID: "d", Now: now}); !d.Allowed {
				t.Fatalf("admission %d of 5 refused", i)
			}
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "d", Now: now.Add(time.Minute)}); d.Allowed {
			t.Fatal("a sixth request was admitted while the lease of five lasts")
		}
		if d, _ := s.Admit(ctx, l, Admission{ID: "d", Now: now.Add(2 * time.Hour)}); !d.Allowed {
			t.Fatal("stale slots were not reclaimed")
		}
	})
}

// A budget counts what settled requests cost plus what the requests in
// flight reserved; a reservation whose holder died stops counting when
// its lease runs out; what a request cost counts in its window.
func TestSpendReservationsAndSettlement(t *testing.T) {
	instances(t, func(t *testing.T, s, peer Store) {
		ctx := context.Background()
		l := Limits{Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Minute}
		t0 := time.Unix(36000, 0) // the start of an hour window
		admit := func(by Store, id string, reserve int64, at time.Duration) (Admission, Decision) {
			a := Admission{ID: id, Spend: reserve, Now: t0.Add(at)}
			d, err := by.Admit(ctx, l, a)
			if err != nil {
				t.Fatal(err)
			}
			return a, d
		}
		if _, d := admit(s, "a", 1001, 0); d.Allowed || d.Limit != "spend" || d.RetryAfter != time.Hour {
			t.Fatalf("a reservation over the whole budget: %+v", d)
		}
		a1, d := admit(s, "a", 600, 0)
		if !d.Allowed {
			t.Fatalf("first request refused: %+v", d)
		}
		if _, d := admit(s, "a", 500, time.Second); d.Allowed {
			t.Fatal("the reservation in flight was not counted")
		}
		// It cost 250: 750 remain.
		if err := s.Settle(ctx, l, a1, 0, 250); err != nil {
			t.Fatal(err)
		}
		if _, d := admit(s, "a", 400, 2*time.Second); !d.Allowed {
			t.Fatalf("after settling, 750 left for 400: %+v", d)
		}
		// Another instance counts both: 250 spent, 400 held, 300 more fits.
		if _, d := admit(peer, "a", 300, 3*time.Second); !d.Allowed {
			t.Fatalf("the other instance: 250 + 400 + 300 refused: %+v", d)
		}
		if _, d := admit(s, "a", 100, 4*time.Second); d.Allowed {
			t.Fatal("spent 250 + held 700 + 100 > 1000 was admitted")
		}
		// The other instance dies: what it reserved lapses with its lease.
		// (In memory, nothing outlives the process.)
		if s == peer {
			return
		}
		if _, d := admit(s, "a", 100, 3*time.Second+l.SlotTTL+time.Second); !d.Allowed {
			t.Fatalf("a dead instance's reservation outlived its lease: %+v", d)
		}
	})
}

// What a request cost counts in the window it was admitted in, also when
// it settles after a later request has started the next window.
func TestSettlementCountsInItsWindow(t *testing.T) {
	stores(t, func(t *testing.T, s Store) {
		ctx := context.Background()
		l := Limits{Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Minute}
		t0 := time.Unix(36000+59*60, 0) // a minute before an hour window ends
		admit := func(reserve int64, at time.Duration) (Admission, Decision) {
			a := Admission{ID: "a", Spend: reserve, Now: t0.Add(at)}
			d, err := s.Admit(ctx, l, a)
			if err != nil {
				t.Fatal(err)
			}
			return a, d
		}
		a1, d1 := admit(100, 0)
		_, d2 := admit(10, 2*time.Minute) // the next window; stays in flight
		if !d1.Allowed || !d2.Allowed {
			t.Fatalf("refused: %+v %+v", d1, d2)
		}
		if err := s.Settle(ctx, l, a1, 0, 900); err != nil { // it cost 900, in the window before
			t.Fatal(err)
		}
		// 61 s into the window, the one before weighs 0.983: 885 + 10 held
		if _, d := admit(10, 2*time.Minute+time.Second); !d.Allowed {
			t.Fatalf("885 + 10 + 10 refused: %+v", d)
		}
		if _, d := admit(100, 2*time.Minute+2*time.Second); d.Allowed || d.Limit != "spend" {
			t.Fatalf("885 + 20 + 100 > 1000 was admitted: the cost settled in the window before was lost: %+v", d)
		}
	})
}

// A shorter lease configured later (a reload) is renewed in time, though
// the instance was renewing at the longer lease's pace.
func TestShorterLeaseAfterReload(t *testing.T) {
	srv := redistest.Start(t)
	o := RedisOptions{Addrs: []string{srv.Addr}, Prefix: "reload:"}
	ctx := context.Background()
	s, peer := mustNewRedis(t, o), mustNewRedis(t, o)
	defer s.Close()
	defer peer.Close()
	long := Limits{Concurrent: 1, SlotTTL: 30 * time.Second}
	short := Limits{Concurrent: 1, SlotTTL: time.Second}
	if d, err := peer.Admit(ctx, long, Admission{ID: "x", Now: time.Now()}); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	time.Sleep(100 * time.Millisecond) // renewing every 10 s now
	if d, err := peer.Admit(ctx, short, Admission{ID: "y", Now: time.Now()}); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	time.Sleep(3 * short.SlotTTL)
	if d, _ := s.Admit(ctx, short, Admission{ID: "y", Now: time.Now()}); d.Allowed {
		t.Fatal("the request under the shorter lease lost its slot: renewed too late")
	}
}

// An instance renews the lease of what it holds while its requests live,
// and what it held lapses once it stops (it died).
func TestLeasesRenewWhileHeld(t *testing.T) {
	srv := redistest.Start(t)
	o := RedisOptions{Addrs: []string{srv.Addr}, Prefix: "lease:"}
	ctx := context.Background()
	l := Limits{Concurrent: 1, Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Second}
	s, peer := mustNewRedis(t, o), mustNewRedis(t, o)
	defer s.Close()
	if d, err := peer.Admit(ctx, l, Admission{ID: "r", Spend: 900, Now: time.Now()}); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	time.Sleep(3 * l.SlotTTL) // three leases: renewed, or lapsed
	if d, _ := s.Admit(ctx, l, Admission{ID: "r", Spend: 200, Now: time.Now()}); d.Allowed {
		t.Fatal("a live instance's request lost its slot and reservation")
	}
	// The instance stops without its request ending, as a killed one does.
	peer.mu.Lock()
	close(peer.done)
	peer.closed = true
	peer.mu.Unlock()
	if d, err := admittedWithin(s, l, Admission{ID: "r", Spend: 200}, 5*l.SlotTTL); !d.Allowed {
		t.Fatalf("what a dead instance held outlived its lease: %+v %v", d, err)
	}
}

// A settlement reaches the other instances without another admission on
// the instance that made it (Redis writes it within flushDelay).
func TestSettlementReachesOtherInstances(t *testing.T) {
	instances(t, func(t *testing.T, s, peer Store) {
		ctx := context.Background()
		l := Limits{Spend: 1000, SpendWindow: time.Hour, Tokens: 100, TokenWindow: time.Hour, SlotTTL: time.Minute}
		a := Admission{ID: "x", Spend: 900, Reserve: 90, Now: time.Now()}
		if d, err := s.Admit(ctx, l, a); err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
		// it used 10 tokens and cost 100: 900 dollars and 90 tokens are free
		if err := s.Settle(ctx, l, a, -80, 100); err != nil {
			t.Fatal(err)
		}
		if d, err := admittedWithin(peer, l, Admission{ID: "x", Spend: 850, Reserve: 85}, 2*time.Second); !d.Allowed {
			t.Fatalf("the settlement never reached the other instance: %+v %v", d, err)
		}
	})
}

// Closing the store (Caddy stopping) writes the settlements that were
// waiting: the next instance counts what the last requests cost.
func TestCloseWritesSettlements(t *testing.T) {
	srv := redistest.Start(t)
	o := RedisOptions{Addrs: []string{srv.Addr}, Prefix: "close:"}
	ctx := context.Background()
	l := Limits{Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Minute}
	s := mustNewRedis(t, o)
	a := Admission{ID: "z", Spend: 500, Now: time.Now()}
	if d, err := s.Admit(ctx, l, a); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	if err := s.Settle(ctx, l, a, 0, 800); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // before the flush is due
		t.Fatal(err)
	}
	next := mustNewRedis(t, o)
	defer next.Close()
	if d, _ := next.Admit(ctx, l, Admission{ID: "z", Spend: 300, Now: time.Now()}); d.Allowed {
		t.Fatal("800 spent + 300 fit a budget of 1000: the settlement was lost on close")
	}
	if d, _ := next.Admit(ctx, l, Admission{ID: "z", Spend: 200, Now: time.Now()}); !d.Allowed {
		t.Fatalf("800 spent + 200 refused: %+v", d)
	}
}

// Requests of one identity admitted and settled in parallel on two
// instances leave nothing counted in flight when they have all ended:
// writes of one instance may pass each other, and their changes add up.
func TestParallelRequestsLeaveNothingHeld(t *testing.T) {
	srv := redistest.Start(t)
	a, b := redisPair(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "par:"})
	ctx := context.Background()
	l := Limits{Concurrent: 8, Spend: 1 << 40, SpendWindow: time.Hour, Tokens: 1 << 40, TokenWindow: time.Hour, SlotTTL: time.Minute}
	var wg sync.WaitGroup
	var admitted sync.Map
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := a
			if i%2 == 1 {
				s = b
			}
			ad := Admission{ID: "p", Reserve: 100, Spend: 1000, Now: time.Now()}
			d, err := s.Admit(ctx, l, ad)
			if err != nil {
				t.Error(err)
				return
			}
			if d.Allowed {
				admitted.Store(i, true)
				if err := s.Settle(ctx, l, ad, -50, 400); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(a.Flush(ctx), b.Flush(ctx)); err != nil {
		t.Fatal(err)
	}
	n := 0
	admitted.Range(func(any, any) bool { n++; return true })
	all, err := a.Client().HGetAll(ctx, limitsKey("par:", "p")).Result()
	if err != nil {
		t.Fatal(err)
	}
	if all["n"] != "0" || all["held"] != "0" {
		t.Errorf("after every request ended: n=%s held=%s", all["n"], all["held"])
	}
	for f, v := range all {
		if strings.HasPrefix(f, "i:") && !strings.HasPrefix(v, "0 0 ") {
			t.Errorf("an instance still holds %s", v)
		}
	}
	if want := strconv.Itoa(400 * n); all["sc"] != want {
		t.Errorf("spent %s, want %s for %d requests", all["sc"], want, n)
	}
	if want := strconv.Itoa(50 * n); all["tc"] != want {
		t.Errorf("tokens %s, want %s for %d requests", all["tc"], want, n)
	}
	if n < 8 {
		t.Errorf("only %d of 200 admitted under a cap of 8 in flight", n)
	}
}

// A settlement made while Redis cannot be reached waits, and is written
// when Redis answers again, without another request.
func TestSettlementOutlivesAnOutage(t *testing.T) {
	srv := redistest.Start(t)
	s, peer := redisPair(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "outage:"})
	ctx := context.Background()
	l := Limits{Spend: 1000, SpendWindow: time.Hour, SlotTTL: time.Minute}
	a := Admission{ID: "o", Spend: 500, Now: time.Now()}
	if d, err := s.Admit(ctx, l, a); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	srv.Stop()
	if err := s.Settle(ctx, l, a, 0, 800); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the first flush fails, and the client's own retry too
	redistest.StartOn(t, srv.Addr)
	deadline := time.Now().Add(6 * time.Second)
	for i := 0; ; i++ {
		b := Admission{ID: "o", Spend: 300, Now: time.Now()}
		d, err := peer.Admit(ctx, l, b)
		if err == nil && !d.Allowed {
			return // 800 spent: 300 more does not fit
		}
		if d.Allowed { // it ends at once, costing nothing
			if err := peer.Settle(ctx, l, b, 0, 0); err != nil {
				t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the settlement never reached Redis after the outage: %+v %v", d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A concurrency slot whose release failed (Redis did not answer) is
// released as soon as Redis answers again, not a lease later.
func TestFailedReleaseIsTriedAgain(t *testing.T) {
	srv := redistest.Start(t)
	s, peer := redisPair(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "release:"})
	ctx := context.Background()
	l := Limits{Concurrent: 1, SlotTTL: time.Minute}
	a := Admission{ID: "c", Now: time.Now()}
	if d, err := s.Admit(ctx, l, a); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	// Redis stops answering (its data kept) for longer than the client's
	// timeout and retry.
	if err := s.client.Do(ctx, "CLIENT", "PAUSE", "3000", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.Settle(ctx, l, a, 0, 0); err == nil {
		t.Fatal("the release was written while Redis was paused")
	}
	if d, err := admittedWithin(peer, l, Admission{ID: "c"}, 6*time.Second); !d.Allowed {
		t.Fatalf("the slot was still held 3 s after Redis answered again: %+v %v", d, err)
	}
}

// Under steady traffic a settlement rides with its identity's next
// admission: the store writes nothing on its own (one script per request,
// not one more every flushDelay). When the traffic stops, what waits is
// still written on its own, where another instance sees it.
func TestSteadyTrafficWritesNoFlush(t *testing.T) {
	srv := redistest.Start(t)
	s, peer := redisPair(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "steady:"})
	ctx := context.Background()
	scripts := func() int {
		info, err := s.client.Info(ctx, "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		calls := 0
		for _, line := range strings.Split(info, "\n") {
			// cmdstat_evalsha:calls=N,usec=...
			if cmd, stats, _ := strings.Cut(line, ":calls="); cmd == "cmdstat_evalsha" || cmd == "cmdstat_eval" {
				n, _ := strconv.Atoi(stats[:strings.IndexByte(stats, ',')])
				calls += n
			}
		}
		return calls
	}
	l := Limits{Spend: 1e12, SpendWindow: time.Hour, SlotTTL: time.Minute}
	before := scripts()
	const requests = 100 // 2 ms apart: ten flushDelays and more
	var last Admission
	for range requests {
		last = Admission{ID: "a", Spend: 1000, Now: time.Now()}
		if d, err := s.Admit(ctx, l, last); err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
		if err := s.Settle(ctx, l, last, 0, 7); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	// A scheduler's hiccup of more than flushDelay between two requests
	// may flush once; a flush every flushDelay would be ten and more.
	if extra := scripts() - before - requests; extra > 3 {
		t.Errorf("%d requests ran %d scripts more than one each", requests, extra)
	}
	// The last settlement reaches the peer: 700 spent, nothing held, so a
	// reservation of the rest of the budget fits (not while the last
	// request's 1000 are still held).
	if d, err := admittedWithin(peer, l, Admission{ID: "a", Spend: 1e12 - 700}, 2*time.Second); !d.Allowed {
		t.Fatalf("the last settlement never reached the other instance: %+v %v", d, err)
	}
}

// An identity's hash lives as long as its counts matter (two of its
// longest window after its last write) and then goes: its expiry is
// pushed back by the writes that need it, not by each write.
func TestRedisHashExpires(t *testing.T) {
	srv := redistest.Start(t)
	s := mustNewRedis(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "exp:"})
	defer s.Close()
	l := Limits{Requests: 1000, RequestWindow: 500 * time.Millisecond}
	ctx, key, ttl := context.Background(), limitsKey("exp:", "a"), time.Duration(keyTTL(l))*time.Millisecond
	for end := time.Now().Add(4 * ttl); time.Now().Before(end); time.Sleep(ttl / 10) {
		if d, err := s.Admit(ctx, l, Admission{ID: "a", Now: time.Now()}); err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
		left, err := s.client.PTTL(ctx, key).Result()
		if err != nil || left < ttl-50*time.Millisecond || left > 2*ttl {
			t.Fatalf("after a write the hash expires in %v (%v), want between %v and %v", left, err, ttl, 2*ttl)
		}
	}
	time.Sleep(2*ttl + 100*time.Millisecond)
	if n, err := s.client.Exists(ctx, key).Result(); err != nil || n != 0 {
		t.Fatalf("the hash outlived two of its TTL after the last write: exists %d, %v", n, err)
	}
}

// A stream that outlives its admission by many of the hash's TTLs keeps
// the hash alive through its lease renewals: what it holds never goes
// missing between two renewals.
func TestRenewalsKeepTheHash(t *testing.T) {
	srv := redistest.Start(t)
	s := mustNewRedis(t, RedisOptions{Addrs: []string{srv.Addr}, Prefix: "long:"})
	defer s.Close()
	// renewals every 200 ms; the hash's TTL 651 ms (two request windows),
	// so an expiry not pushed back by them would leave gaps of ~100 ms
	l := Limits{Concurrent: 2, SlotTTL: 600 * time.Millisecond, Requests: 1000, RequestWindow: 325 * time.Millisecond}
	ctx, key := context.Background(), limitsKey("long:", "a")
	if d, err := s.Admit(ctx, l, Admission{ID: "a", Now: time.Now()}); err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if n, err := s.client.HGet(ctx, key, "n").Result(); err != nil || n != "1" {
			t.Fatalf("%v after the admission the stream's hash holds n=%q (%v)", time.Since(end.Add(-3*time.Second)), n, err)
		}
	}
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
			a := Admission{ID: fmt.Sprint("id", i%100), Reserve: 500, Now: time.Now()}
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

// admittedWithin asks s to admit a (at the time of asking) until it does,
// for at most within, and returns the last answer.
func admittedWithin(s Store, l Limits, a Admission, within time.Duration) (Decision, error) {
	deadline := time.Now().Add(within)
	for {
		a.Now = time.Now()
		d, err := s.Admit(context.Background(), l, a)
		if err != nil {
			d = Decision{} // not admitted
		}
		if d.Allowed || time.Now().After(deadline) {
			return d, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// redisPair is two instances' stores on one server, closed with the test.
func redisPair(t testing.TB, o RedisOptions) (*Redis, *Redis) {
	a, b := mustNewRedis(t, o), mustNewRedis(t, o)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func mustNewRedis(t testing.TB, o RedisOptions) *Redis {
	t.Helper()
	r, err := NewRedis(o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
