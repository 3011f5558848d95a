package llmstream

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// State that survives a config reload. `caddy reload` provisions a new
// handler before the old one is cleaned up; what the handler remembers
// between requests lives in process-wide usage pools (as reverse_proxy's
// hosts do), keyed by what defines it, so an unchanged upstream, key, limit
// or cache keeps its state and a changed one starts fresh. A handler holds
// a reference to each entry it uses and releases them in Cleanup, once the
// requests it admitted have ended.
var (
	healthPool = caddy.NewUsagePool() // provider+URL → *upstreamHealth
	restPool   = caddy.NewUsagePool() // URL+key digest → *keyRest
	limitPool  = caddy.NewUsagePool() // limit definition and upstream set → *store.Memory
	slotPool   = caddy.NewUsagePool() // upstream set → *store.Slots
	cachePool  = caddy.NewUsagePool() // cache bound and upstream set → *cache.Memory
	redisPool  = caddy.NewUsagePool() // connection settings → *store.Redis
	busPool    = caddy.NewUsagePool() // connection settings → *routeBus
	// kind and upstream set → *memoryRecall (recall.go)
	recallPool = caddy.NewUsagePool()
)

// poolValue looks a pool's value up without taking a reference.
func poolValue(pool *caddy.UsagePool, key string) (any, bool) {
	var found any
	pool.Range(func(k, v any) bool {
		if k == key {
			found = v
			return false
		}
		return true
	})
	return found, found != nil
}

// pooled wraps a value kept in a usage pool; destruct runs when the last
// config that used it is gone.
type pooled[T any] struct {
	v        T
	destruct func() error
}

// Destruct implements caddy.Destructor.
func (p *pooled[T]) Destruct() error {
	if p.destruct == nil {
		return nil
	}
	return p.destruct()
}

// poolRef is one entry a handler holds.
type poolRef struct {
	pool *caddy.UsagePool
	key  string
}

// share returns the pool's value for key, making it with newValue when no
// loaded config holds one, and records the reference for Cleanup.
func share[T any](h *Handler, pool *caddy.UsagePool, key string, newValue func() (T, func() error, error)) (T, error) {
	v, _, err := pool.LoadOrNew(key, func() (caddy.Destructor, error) {
		v, destruct, err := newValue()
		if err != nil {
			return nil, err
		}
		return &pooled[T]{v: v, destruct: destruct}, nil
	})
	if err != nil {
		var zero T
		return zero, err
	}
	h.held = append(h.held, poolRef{pool, key})
	return v.(*pooled[T]).v, nil
}

// plain is newValue for a value that needs no closing.
func plain[T any](v T) func() (T, func() error, error) {
	return func() (T, func() error, error) { return v, nil, nil }
}

// releasePools drops the handler's references, the last taken first: what
// uses the Redis client goes before the client.
func (h *Handler) releasePools() {
	for i := len(h.held) - 1; i >= 0; i-- {
		_, _ = h.held[i].pool.Delete(h.held[i].key)
	}
	h.held = nil
}

// shareRouteState attaches pooled health to each upstream and a pooled rest
// to each key.
func (h *Handler) shareRouteState(u *Upstream) error {
	var err error
	u.stateKey = u.Provider + " " + u.URL
	if u.health, err = share(h, healthPool, u.stateKey, plain(new(upstreamHealth))); err != nil {
		return err
	}
	for _, k := range u.keys {
		// The full digest: two keys must never share a rest.
		sum := sha256.Sum256([]byte(k.secret))
		k.stateKey = u.URL + " " + hex.EncodeToString(sum[:])
		if k.rest, err = share(h, restPool, k.stateKey, plain(new(keyRest))); err != nil {
			return err
		}
	}
	return nil
}

// upstreamSet names what a handler fronts: its upstreams, sorted. The
// in-memory limits and cache are kept per upstream set, so two sites in
// front of different APIs never share counters or answers.
func (h *Handler) upstreamSet() string {
	names := make([]string, 0, len(h.ups))
	for _, u := range h.ups {
		names = append(names, u.Provider+" "+u.URL)
	}
	slices.Sort(names)
	return strings.Join(names, " ")
}

// limitKey names a limit definition: the caps and windows of requests and
// tokens, for an upstream set. (Concurrency slots are kept per upstream
// set, whatever the definition: streams admitted under an old config count
// against the new one.)
func limitKey(l *Limits, upstreams string) string {
	return "requests " + strconv.FormatInt(l.Requests, 10) + "/" + strconv.FormatInt(int64(l.RequestWindow), 10) +
		" tokens " + strconv.FormatInt(l.Tokens, 10) + "/" + strconv.FormatInt(int64(l.TokenWindow), 10) +
		" for " + upstreams
}
