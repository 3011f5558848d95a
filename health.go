package llmstream

import (
	"sync"
	"time"
)

// routeState is what routing remembers between requests: passive health
// of upstreams and keys resting after 429/401/403. It is per process for
// now, behind this interface so that a shared store can replace it.
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
	resting(keyID string, now time.Time) bool
	// rest lets a key rest until the given time.
	rest(keyID string, until time.Time)
}

// memoryState is the in-process routeState.
type memoryState struct {
	after    int
	cooldown time.Duration

	mu        sync.Mutex
	failures  map[*Upstream]int
	downUntil map[*Upstream]time.Time
	restUntil map[string]time.Time
}

func newMemoryState(after int, cooldown time.Duration) *memoryState {
	return &memoryState{
		after:     after,
		cooldown:  cooldown,
		failures:  map[*Upstream]int{},
		downUntil: map[*Upstream]time.Time{},
		restUntil: map[string]time.Time{},
	}
}

func (s *memoryState) usable(u *Upstream, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now.Before(s.downUntil[u]) {
		return false
	}
	for _, k := range u.keys {
		if !now.Before(s.restUntil[k.id]) {
			return true
		}
	}
	return false
}

func (s *memoryState) failed(u *Upstream, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failures[u]++
	if s.failures[u] >= s.after {
		// Out for a cooldown; afterwards one more failure takes it out
		// again (half-open), a success restores it fully.
		s.downUntil[u] = now.Add(s.cooldown)
		s.failures[u] = s.after - 1
	}
}

func (s *memoryState) succeeded(u *Upstream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failures[u] != 0 {
		delete(s.failures, u)
		delete(s.downUntil, u)
	}
}

func (s *memoryState) resting(keyID string, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return now.Before(s.restUntil[keyID])
}

func (s *memoryState) rest(keyID string, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if until.After(s.restUntil[keyID]) {
		s.restUntil[keyID] = until
	}
}
