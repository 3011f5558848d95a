// Package memo remembers the answers of a pure function of a few values
// that come back on every request (a model name's price, a metric's
// labelled child), where a lookup must cost less than a sync.Map's: reads
// are one atomic load and one map access; a new entry copies the map.
// Entries are bounded, since the values may come from clients.
package memo

import (
	"sync"
	"sync/atomic"
)

// Map is a bounded copy-on-write map. The zero value is empty, with room
// for DefaultMax entries.
type Map[K comparable, V any] struct {
	m   atomic.Pointer[map[K]V]
	mu  sync.Mutex // serialises writers
	Max int        // entries kept at most; 0 is DefaultMax
}

// DefaultMax is the default bound: a copy on write stays cheap.
const DefaultMax = 256

// Get returns the value remembered for k.
func (c *Map[K, V]) Get(k K) (V, bool) {
	if m := c.m.Load(); m != nil {
		v, ok := (*m)[k]
		return v, ok
	}
	var zero V
	return zero, false
}

// Put remembers v for k unless the map is full; either way it returns v.
func (c *Map[K, V]) Put(k K, v V) V {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	n := 0
	if old != nil {
		n = len(*old)
	}
	limit := c.Max
	if limit == 0 {
		limit = DefaultMax
	}
	if n >= limit {
		return v
	}
	m := make(map[K]V, n+1)
	if old != nil {
		for ok, ov := range *old {
			m[ok] = ov
		}
	}
	m[k] = v
	c.m.Store(&m)
	return v
}

// Len is the number of entries remembered.
func (c *Map[K, V]) Len() int {
	if m := c.m.Load(); m != nil {
		return len(*m)
	}
	return 0
}
