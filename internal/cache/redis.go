package cache

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is the Store shared by several instances: one key per entry, with
// Redis expiring it.
type Redis struct {
	client redis.UniversalClient
	prefix string
}

// NewRedis uses client, with keys under prefix.
func NewRedis(client redis.UniversalClient, prefix string) *Redis {
	return &Redis{client: client, prefix: prefix + "cache:"}
}

// Get implements Store.
func (r *Redis) Get(ctx context.Context, key string) (*Entry, error) {
	b, err := r.client.Get(ctx, r.prefix+key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return decode(b)
}

// Set implements Store.
func (r *Redis) Set(ctx context.Context, key string, e *Entry, ttl time.Duration) error {
	return r.client.Set(ctx, r.prefix+key, encode(e), ttl).Err()
}
