package store

import (
	"context"
	"sync"
	"time"
)

// Memory is the in-process Store.
type Memory struct {
	mu       sync.Mutex
	counters map[string]counter
	slots    *Slots
	admits   int
}

// Slots are the concurrency slots held per identity. They may be shared by
// several Memory stores (one per limit definition), so that streams
// admitted under one definition count against the next.
type Slots struct {
	mu   sync.Mutex
	held map[string]map[string]time.Time // identity → slot → expiry
}

// NewSlots returns an empty set of slots.
func NewSlots() *Slots { return &Slots{held: map[string]map[string]time.Time{}} }

type counter struct {
	v   int64
	exp time.Time
}

// NewMemory returns an empty in-memory store with slots of its own.
func NewMemory() *Memory { return NewMemoryWithSlots(NewSlots()) }

// NewMemoryWithSlots returns an empty in-memory store that keeps its
// concurrency slots in slots.
func NewMemoryWithSlots(slots *Slots) *Memory {
	return &Memory{counters: map[string]counter{}, slots: slots}
}

func (m *Memory) get(k string, now time.Time) int64 {
	c, ok := m.counters[k]
	if !ok || now.After(c.exp) {
		return 0
	}
	return c.v
}

func (m *Memory) add(k string, v int64, now time.Time, ttl time.Duration) {
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
	if l.Requests > 0 {
		est := float64(m.get(reqKey("", a.ID, ri), a.Now)) + float64(m.get(reqKey("", a.ID, ri-1), a.Now))*rw
		if est+1 > float64(l.Requests) {
			return Decision{Limit: "requests", RetryAfter: retryAfter(rleft)}, nil
		}
	}
	if l.Tokens > 0 {
		est := float64(m.get(tokKey("", a.ID, ti), a.Now)) + float64(m.get(tokKey("", a.ID, ti-1), a.Now))*tw
		if est+float64(a.Reserve) > float64(l.Tokens) {
			return Decision{Limit: "tokens", RetryAfter: retryAfter(tleft)}, nil
		}
	}
	if l.Concurrent > 0 {
		m.slots.mu.Lock()
		defer m.slots.mu.Unlock()
		held := m.slots.held[a.ID]
		for s, exp := range held {
			if a.Now.After(exp) {
				delete(held, s)
			}
		}
		if int64(len(held)) >= l.Concurrent {
			return Decision{Limit: "concurrent", RetryAfter: time.Second}, nil
		}
	}
	if l.Requests > 0 {
		m.add(reqKey("", a.ID, ri), 1, a.Now, 2*l.RequestWindow)
	}
	if l.Tokens > 0 {
		m.add(tokKey("", a.ID, ti), a.Reserve, a.Now, 2*l.TokenWindow)
	}
	if l.Concurrent > 0 {
		if m.slots.held[a.ID] == nil {
			m.slots.held[a.ID] = map[string]time.Time{}
		}
		m.slots.held[a.ID][a.Slot] = a.Now.Add(l.SlotTTL)
	}
	return Decision{Allowed: true}, nil
}

// Settle implements Store.
func (m *Memory) Settle(_ context.Context, l Limits, a Admission, delta int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l.Concurrent > 0 {
		m.slots.mu.Lock()
		delete(m.slots.held[a.ID], a.Slot)
		if len(m.slots.held[a.ID]) == 0 {
			delete(m.slots.held, a.ID)
		}
		m.slots.mu.Unlock()
	}
	if l.Tokens > 0 && delta != 0 {
		ti, _, _ := window(a.Now, l.TokenWindow)
		k := tokKey("", a.ID, ti)
		if c, ok := m.counters[k]; ok {
			c.v += delta
			m.counters[k] = c
		}
	}
	return nil
}

// Renew implements Store.
func (m *Memory) Renew(_ context.Context, _ Limits, a Admission, until time.Time) error {
	m.slots.mu.Lock()
	defer m.slots.mu.Unlock()
	if held := m.slots.held[a.ID]; held != nil {
		if _, ok := held[a.Slot]; ok {
			held[a.Slot] = until
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
}

// Close implements Store.
func (m *Memory) Close() error { return nil }
