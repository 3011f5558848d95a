package llmstream

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// recall keeps small values by key for a while: what the handler must
// remember about a request after it ended (where a Responses API answer
// was produced, a request's usage for usage_endpoint). In this process's
// memory (pooled: it survives reloads), or with `store redis` in Redis,
// where every instance sees it.
type recall interface {
	set(ctx context.Context, key, value string, ttl time.Duration) error
	get(ctx context.Context, key string) (string, bool, error)
}

// recallStore returns the recall for one kind of value, its keys
// prefixed with kind.
func (h *Handler) recallStore(kind string) (recall, error) {
	if h.redis != nil {
		return &redisRecall{client: h.redis.Client(), prefix: h.redisPrefix() + kind}, nil
	}
	return share(h, recallPool, kind+h.upstreamSet(), plain(&memoryRecall{values: map[string]recalled{}}))
}

type memoryRecall struct {
	mu     sync.Mutex
	values map[string]recalled
	sets   int
}

type recalled struct {
	value  string
	expiry time.Time
}

func (m *memoryRecall) set(_ context.Context, key, value string, ttl time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	if m.sets++; m.sets%4096 == 0 { // sweep now and then
		for k, v := range m.values {
			if now.After(v.expiry) {
				delete(m.values, k)
			}
		}
	}
	m.values[key] = recalled{value, now.Add(ttl)}
	return nil
}

func (m *memoryRecall) get(_ context.Context, key string) (string, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.values[key]
	if !ok || time.Now().After(v.expiry) {
		return "", false, nil
	}
	return v.value, true, nil
}

type redisRecall struct {
	client redis.UniversalClient
	prefix string
}

func (r *redisRecall) set(ctx context.Context, key, value string, ttl time.Duration) error {
	return r.client.Set(ctx, r.prefix+key, value, ttl).Err()
}

func (r *redisRecall) get(ctx context.Context, key string) (string, bool, error) {
	s, err := r.client.Get(ctx, r.prefix+key).Result()
	if err == redis.Nil {
		return "", false, nil
	}
	return s, err == nil, err
}
