package store

import (
	"context"
	"sync"
	"time"
)

// Memory is the in-process Store.
type Memory struct {
	mu       sync.Mutex
	counters map[counterKey]counter
	slots    *Slots
	admits   int
}

// Slots are the requests in flight per identity: their concurrency slots
// and spend reservations. They may be shared by several Memory stores (one
// per limit definition), so that streams admitted under one definition
// count against the next.
type Slots struct {
	mu   sync.Mutex
	held map[string]*held // identity → what its requests in flight hold
}

// held is what an identity's requests in flight hold: a request that ends
// gives back its own slot and reservation.
type held struct {
	n     int64 // requests
	spend int64 // nano-dollars reserved
}

// NewSlots returns an empty set of slots.
func NewSlots() *Slots { return &Slots{held: map[string]*held{}} }

// counterKey names one window's count of one kind for one identity.
type counterKey struct {
	kind byte // 'r' requests, 't' tokens, '$' spend
	id   string
	idx  int64
}

type counter struct {
	v   int64
	exp time.Time
}

// NewMemory returns an empty in-memory store with slots of its own.
func NewMemory() *Memory { return NewMemoryWithSlots(NewSlots()) }

// NewMemoryWithSlots returns an empty in-memory store that keeps its
// concurrency slots in slots.
func NewMemoryWithSlots(slots *Slots) *Memory {
	return &Memory{counters: map[counterKey]counter{}, slots: slots}
}

func (m *Memory) get(k counterKey, now time.Time) int64 {
	c, ok := m.counters[k]
	if !ok || now.After(c.exp) {
		return 0
	}
	return c.v
}

func (m *Memory) add(k counterKey, v int64, now time.Time, ttl time.Duration) {
	c := m.counters[k]
	if now.After(c.exp) {
		c.v = 0
	}
	c.v += v
	c.exp = now.Add(ttl)
	m.counters[k] = c
}

// Admit implements Store.
func (m *Memory) Admit(_ context.Context, l Limits, a Admission) (Decision, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sweep(a.Now)
	ri, rw, rleft := window(a.Now, l.RequestWindow)
	ti, tw, tleft := window(a.Now, l.TokenWindow)
	si, sw, sleft := window(a.Now, l.SpendWindow)
	if l.Requests > 0 {
		est := float64(m.get(counterKey{'r', a.ID, ri}, a.Now)) + float64(m.get(counterKey{'r', a.ID, ri - 1}, a.Now))*rw
		if est+1 > float64(l.Requests) {
			return Decision{Limit: "requests", RetryAfter: retryAfter(rleft)}, nil
		}
	}
	if l.Tokens > 0 {
		est := float64(m.get(counterKey{'t', a.ID, ti}, a.Now)) + float64(m.get(counterKey{'t', a.ID, ti - 1}, a.Now))*tw
		if est+float64(a.Reserve) > float64(l.Tokens) {
			return Decision{Limit: "tokens", RetryAfter: retryAfter(tleft)}, nil
		}
	}
	var h *held
	if l.inFlight() {
		m.slots.mu.Lock()
		defer m.slots.mu.Unlock()
		if h = m.slots.held[a.ID]; h == nil {
			h = &held{}
			m.slots.held[a.ID] = h
		}
		if l.Concurrent > 0 && h.n >= l.Concurrent {
			return Decision{Limit: "concurrent", RetryAfter: time.Second}, nil
		}
		if l.Spend > 0 {
			spent := float64(m.get(counterKey{'$', a.ID, si}, a.Now)) + float64(m.get(counterKey{'$', a.ID, si - 1}, a.Now))*sw
			if spent+float64(h.spend+a.Spend) > float64(l.Spend) {
				return Decision{Limit: "spend", RetryAfter: retryAfter(sleft)}, nil
			}
		}
	}
	if l.Requests > 0 {
		m.add(counterKey{'r', a.ID, ri}, 1, a.Now, 2*l.RequestWindow)
	}
	if l.Tokens > 0 {
		m.add(counterKey{'t', a.ID, ti}, a.Reserve, a.Now, 2*l.TokenWindow)
	}
	if h != nil {
		h.n++
		if l.Spend > 0 {
			h.spend += a.Spend
		}
	}
	return Decision{Allowed: true}, nil
}

// Settle implements Store.
func (m *Memory) Settle(_ context.Context, l Limits, a Admission, delta, cost int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l.Spend > 0 && cost > 0 {
		si, _, _ := window(a.Now, l.SpendWindow)
		m.add(counterKey{'$', a.ID, si}, cost, time.Now(), 2*l.SpendWindow)
	}
	if l.inFlight() {
		m.slots.mu.Lock()
		if h := m.slots.held[a.ID]; h != nil && h.n > 0 { // an empty one stays for the next request; sweep drops it
			h.n--
			if l.Spend > 0 {
				h.spend = max(h.spend-a.Spend, 0)
			}
		}
		m.slots.mu.Unlock()
	}
	if l.Tokens > 0 && delta != 0 {
		ti, _, _ := window(a.Now, l.TokenWindow)
		k := counterKey{'t', a.ID, ti}
		if c, ok := m.counters[k]; ok {
			c.v += delta
			m.counters[k] = c
		}
	}
	return nil
}

// sweep drops expired counters now and then, so identities that went
// away do not pile up.
func (m *Memory) sweep(now time.Time) {
	m.admits++
	if m.admits%1024 != 0 {
		return
	}
	for k, c := range m.counters {
		if now.After(c.exp) {
			delete(m.counters, k)
		}
	}
	m.slots.mu.Lock()
	for id, h := range m.slots.held {
		if h.n == 0 {
			delete(m.slots.held, id)
		}
	}
	m.slots.mu.Unlock()
}

// Close implements Store.
func (m *Memory) Close() error { return nil }
