package cache

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// Memory is the in-process Store: least recently used entries go first
// once the entries' sizes reach the bound.
type Memory struct {
	mu   sync.Mutex
	max  int64
	size int64
	ll   list.List // front: most recently used
	m    map[string]*list.Element
	now  func() time.Time
}

type item struct {
	key     string
	e       *Entry
	expires time.Time
	size    int64
}

// NewMemory returns a Memory store holding at most maxBytes.
func NewMemory(maxBytes int64) *Memory {
	return &Memory{max: maxBytes, m: map[string]*list.Element{}, now: time.Now}
}

// Get implements Store.
func (c *Memory) Get(_ context.Context, key string) (*Entry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.m[key]
	if !ok {
		return nil, nil
	}
	it := el.Value.(*item)
	if !c.now().Before(it.expires) {
		c.remove(el)
		return nil, nil
	}
	c.ll.MoveToFront(el)
	return it.e, nil
}

// Set implements Store. An entry larger than the whole bound is not kept.
func (c *Memory) Set(_ context.Context, key string, e *Entry, ttl time.Duration) error {
	size := e.Size() + int64(len(key))
	if size > c.max {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.m[key]; ok {
		c.remove(el)
	}
	for c.size+size > c.max {
		c.remove(c.ll.Back())
	}
	c.m[key] = c.ll.PushFront(&item{key: key, e: e, expires: c.now().Add(ttl), size: size})
	c.size += size
	return nil
}

// Len and Size report the number of entries and the bytes they hold.
func (c *Memory) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}

// Size reports the bytes the entries hold, by Entry.Size.
func (c *Memory) Size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size
}

func (c *Memory) remove(el *list.Element) {
	it := c.ll.Remove(el).(*item)
	delete(c.m, it.key)
	c.size -= it.size
}
