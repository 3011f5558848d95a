package store

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is the Store shared by several Caddy instances. Every admission is
// one Lua script, so all checks and all records happen atomically in one
// round trip; settling is another.
type Redis struct {
	client *redis.Client
	prefix string
}

// NewRedis connects lazily to a Redis server.
func NewRedis(addr string, db int, password, prefix string) *Redis {
	return &Redis{
		client: redis.NewClient(&redis.Options{
			Addr:         addr,
			DB:           db,
			Password:     password,
			DialTimeout:  time.Second,
			ReadTimeout:  time.Second,
			WriteTimeout: time.Second,
			MaxRetries:   1,
		}),
		prefix: prefix,
	}
}

// KEYS: req cur, req prev, tok cur, tok prev, slots
// ARGV: now_ms, req_limit, req_prev_weight, req_ttl_ms, tok_limit,
// tok_prev_weight, tok_ttl_ms, reserve, conc_limit, slot, slot_expiry_ms,
// slot_ttl_ms
var admitScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local reqLimit, reqW = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokLimit, tokW = tonumber(ARGV[5]), tonumber(ARGV[6])
local reserve, concLimit = tonumber(ARGV[8]), tonumber(ARGV[9])
local function n(k) return tonumber(redis.call('GET', k) or '0') end
if reqLimit > 0 and n(KEYS[1]) + n(KEYS[2]) * reqW + 1 > reqLimit then
	return {0, 'requests'}
end
if tokLimit > 0 and n(KEYS[3]) + n(KEYS[4]) * tokW + reserve > tokLimit then
	return {0, 'tokens'}
end
if concLimit > 0 then
	redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
	if redis.call('ZCARD', KEYS[5]) >= concLimit then
		return {0, 'concurrent'}
	end
end
if reqLimit > 0 then
	redis.call('INCR', KEYS[1])
	redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if tokLimit > 0 then
	redis.call('INCRBY', KEYS[3], reserve)
	redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
if concLimit > 0 then
	redis.call('ZADD', KEYS[5], ARGV[11], ARGV[10])
	redis.call('PEXPIRE', KEYS[5], ARGV[12])
end
return {1, ''}
`)

// KEYS: slots, tok (of the reservation's window)
// ARGV: slot, delta
var settleScript = redis.NewScript(`
redis.call('ZREM', KEYS[1], ARGV[1])
local d = tonumber(ARGV[2])
if d ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
	redis.call('INCRBY', KEYS[2], d)
end
return 1
`)

func ms(d time.Duration) int64 { return d.Milliseconds() }

// Admit implements Store.
func (r *Redis) Admit(ctx context.Context, l Limits, a Admission) (Decision, error) {
	ri, rw, rleft := window(a.Now, l.RequestWindow)
	ti, tw, tleft := window(a.Now, l.TokenWindow)
	keys := []string{
		reqKey(r.prefix, a.ID, ri), reqKey(r.prefix, a.ID, ri-1),
		tokKey(r.prefix, a.ID, ti), tokKey(r.prefix, a.ID, ti-1),
		slotKey(r.prefix, a.ID),
	}
	now := a.Now.UnixMilli()
	res, err := admitScript.Run(ctx, r.client, keys,
		now, l.Requests, strconv.FormatFloat(rw, 'f', 6, 64), ms(2*l.RequestWindow)+1,
		l.Tokens, strconv.FormatFloat(tw, 'f', 6, 64), ms(2*l.TokenWindow)+1,
		a.Reserve, l.Concurrent, a.Slot, now+ms(l.SlotTTL), ms(l.SlotTTL)+1,
	).Slice()
	if err != nil {
		return Decision{}, err
	}
	if ok, _ := res[0].(int64); ok == 1 {
		return Decision{Allowed: true}, nil
	}
	d := Decision{}
	d.Limit, _ = res[1].(string)
	switch d.Limit {
	case "requests":
		d.RetryAfter = retryAfter(rleft)
	case "tokens":
		d.RetryAfter = retryAfter(tleft)
	default:
		d.RetryAfter = time.Second
	}
	return d, nil
}

// Settle implements Store.
func (r *Redis) Settle(ctx context.Context, l Limits, a Admission, delta int64) error {
	ti, _, _ := window(a.Now, l.TokenWindow)
	return settleScript.Run(ctx, r.client,
		[]string{slotKey(r.prefix, a.ID), tokKey(r.prefix, a.ID, ti)},
		a.Slot, delta).Err()
}

// Close implements Store.
func (r *Redis) Close() error { return r.client.Close() }

// Client is the Redis client, for other state kept on the same server.
func (r *Redis) Client() *redis.Client { return r.client }
