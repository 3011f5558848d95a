package llmstream

import (
	"sync"
	"sync/atomic"
	"time"
)

// routeState is what routing remembers between requests: passive health
// of upstreams and keys resting after 429/401/403.
type routeState interface {
	// usable reports whether an upstream is healthy and has a key that is
	// not resting.
	usable(u *Upstream, now time.Time) bool
	// failed records a failed attempt; after `unhealthy_after` in a row the
	// upstream is out for `unhealthy_cooldown`.
	failed(u *Upstream, now time.Time)
	// succeeded resets the upstream's failure count.
	succeeded(u *Upstream)
	// resting reports whether a key rests.
	resting(k *apiKey, now time.Time) bool
	// rest lets a key rest until the given time.
	rest(k *apiKey, until time.Time)
}

// upstreamHealth is the passive health of one upstream. It lives in a
// process-wide pool keyed by the upstream's provider and URL, so that it
// outlives a config reload that keeps the upstream (see state.go).
type upstreamHealth struct {
	mu        sync.Mutex
	failures  int
	downUntil time.Time
}

// keyRest is when one upstream key may be used again (Unix nanoseconds),
// pooled like upstreamHealth, by upstream and key.
type keyRest struct{ until atomic.Int64 }

func (k *keyRest) resting(now time.Time) bool { return now.UnixNano() < k.until.Load() }

// extend moves the rest's end to until, if that is later.
func (k *keyRest) extend(until int64) {
	for {
		cur := k.until.Load()
		if until <= cur || k.until.CompareAndSwap(cur, until) {
			return
		}
	}
}

// memoryState is the in-process routeState: the handler's thresholds over
// the pooled health and rests of its upstreams and keys.
type memoryState struct {
	after    int
	cooldown time.Duration
}

func newMemoryState(after int, cooldown time.Duration) *memoryState {
	return &memoryState{after: after, cooldown: cooldown}
}

func (s *memoryState) usable(u *Upstream, now time.Time) bool {
	u.health.mu.Lock()
	down := now.Before(u.health.downUntil)
	u.health.mu.Unlock()
	if down {
		return false
	}
	for _, k := range u.keys {
		if !k.rest.resting(now) {
			return true
		}
	}
	return false
}

func (s *memoryState) failed(u *Upstream, now time.Time) {
	hs := u.health
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.failures++
	if hs.failures >= s.after {
		// Out for a cooldown; afterwards one more failure takes it out
		// again (half-open), a success restores it fully.
		hs.downUntil = now.Add(s.cooldown)
		hs.failures = s.after - 1
	}
}

func (s *memoryState) succeeded(u *Upstream) {
	hs := u.health
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.failures, hs.downUntil = 0, time.Time{}
}

func (s *memoryState) resting(k *apiKey, now time.Time) bool { return k.rest.resting(now) }

func (s *memoryState) rest(k *apiKey, until time.Time) { k.rest.extend(until.UnixNano()) }
