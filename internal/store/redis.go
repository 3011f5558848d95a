package store

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is the Store shared by several Caddy instances. Every admission is
// one Lua script, so all checks and all records happen atomically in one
// round trip; settling is another. The keys of one script share the
// identity's hash tag, so the scripts run on a Redis Cluster too.
type Redis struct {
	client redis.UniversalClient
	prefix string
}

// RedisOptions say how to reach Redis the way operators run it: one server,
// a Cluster, or a master found through Sentinel; with an ACL user, a
// password and TLS.
type RedisOptions struct {
	// Addrs are `host:port` or `redis://[user:password@]host:port/db` and
	// `rediss://…` (TLS) URLs. One address is a single server; several
	// are a Cluster's nodes, or sentinels when MasterName is set.
	Addrs []string
	// MasterName is the Sentinel master name; SentinelPassword the
	// sentinels' own password, when they require one (most set-ups
	// protect only the master).
	MasterName       string
	SentinelPassword string
	// DB, Username and Password override what a URL says when set.
	DB       int
	Username string
	Password string
	// TLS, when set, is used for every connection (a rediss:// URL turns
	// it on too).
	TLS    *tls.Config
	Prefix string
}

// NewRedis connects lazily. Errors never quote an address, which may hold a
// password.
func NewRedis(o RedisOptions) (*Redis, error) {
	if len(o.Addrs) == 0 {
		return nil, errors.New("no address")
	}
	u := &redis.UniversalOptions{
		MasterName:   o.MasterName,
		DialTimeout:  time.Second,
		ReadTimeout:  time.Second,
		WriteTimeout: time.Second,
		MaxRetries:   1,
	}
	for i, a := range o.Addrs {
		if !strings.Contains(a, "://") {
			u.Addrs = append(u.Addrs, a)
			continue
		}
		opt, err := redis.ParseURL(a)
		if err != nil {
			return nil, fmt.Errorf("address %d is not a valid redis:// or rediss:// URL", i+1)
		}
		u.Addrs = append(u.Addrs, opt.Addr)
		if u.Username == "" {
			u.Username = opt.Username
		}
		if u.Password == "" {
			u.Password = opt.Password
		}
		if u.DB == 0 {
			u.DB = opt.DB
		}
		if opt.TLSConfig != nil && u.TLSConfig == nil {
			u.TLSConfig = opt.TLSConfig
		}
	}
	if o.Username != "" {
		u.Username = o.Username
	}
	if o.Password != "" {
		u.Password = o.Password
	}
	if o.DB != 0 {
		u.DB = o.DB
	}
	if o.TLS != nil {
		u.TLSConfig = o.TLS
	}
	if len(u.Addrs) > 1 && u.MasterName == "" && u.DB != 0 {
		return nil, errors.New("a Redis Cluster has only database 0")
	}
	u.SentinelPassword = o.SentinelPassword
	return &Redis{client: redis.NewUniversalClient(u), prefix: o.Prefix}, nil
}

// KEYS: req cur, req prev, tok cur, tok prev, slots, usd cur, usd prev,
// usd reservations
// ARGV: now_ms, req_limit, req_prev_weight, req_ttl_ms, tok_limit,
// tok_prev_weight, tok_ttl_ms, reserve, conc_limit, slot, slot_expiry_ms,
// slot_ttl_ms, spend_limit, spend_prev_weight, spend_reserve, in_flight
var admitScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local reqLimit, reqW = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokLimit, tokW = tonumber(ARGV[5]), tonumber(ARGV[6])
local reserve, concLimit = tonumber(ARGV[8]), tonumber(ARGV[9])
local spendLimit, spendW, spendReserve = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local inFlight = ARGV[16] == '1'
local function n(k) return tonumber(redis.call('GET', k) or '0') end
if reqLimit > 0 and n(KEYS[1]) + n(KEYS[2]) * reqW + 1 > reqLimit then
	return {0, 'requests'}
end
if tokLimit > 0 and n(KEYS[3]) + n(KEYS[4]) * tokW + reserve > tokLimit then
	return {0, 'tokens'}
end
if inFlight then
	-- leases that ran out: their holders died; so do their reservations
	local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
	if #gone > 0 then
		redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
		redis.call('HDEL', KEYS[8], unpack(gone))
	end
end
if concLimit > 0 and redis.call('ZCARD', KEYS[5]) >= concLimit then
	return {0, 'concurrent'}
end
if spendLimit > 0 then
	local held = 0
	for _, v in ipairs(redis.call('HVALS', KEYS[8])) do held = held + tonumber(v) end
	if n(KEYS[6]) + n(KEYS[7]) * spendW + held + spendReserve > spendLimit then
		return {0, 'spend'}
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
if inFlight then
	redis.call('ZADD', KEYS[5], ARGV[11], ARGV[10])
	redis.call('PEXPIRE', KEYS[5], ARGV[12])
end
if spendLimit > 0 then
	redis.call('HSET', KEYS[8], ARGV[10], spendReserve)
	redis.call('PEXPIRE', KEYS[8], ARGV[12])
end
return {1, ''}
`)

// KEYS: slots, tok (of the reservation's window), usd (of the admission's
// window), usd reservations
// ARGV: slot, delta, cost, usd_ttl_ms
var settleScript = redis.NewScript(`
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local d = tonumber(ARGV[2])
if d ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
	redis.call('INCRBY', KEYS[2], d)
end
local c = tonumber(ARGV[3])
if c > 0 then
	redis.call('INCRBY', KEYS[3], c)
	redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return 1
`)

func ms(d time.Duration) int64 { return d.Milliseconds() }

// Admit implements Store.
func (r *Redis) Admit(ctx context.Context, l Limits, a Admission) (Decision, error) {
	ri, rw, rleft := window(a.Now, l.RequestWindow)
	ti, tw, tleft := window(a.Now, l.TokenWindow)
	si, sw, sleft := window(a.Now, l.SpendWindow)
	keys := []string{
		reqKey(r.prefix, a.ID, ri), reqKey(r.prefix, a.ID, ri-1),
		tokKey(r.prefix, a.ID, ti), tokKey(r.prefix, a.ID, ti-1),
		slotKey(r.prefix, a.ID),
		spendKey(r.prefix, a.ID, si), spendKey(r.prefix, a.ID, si-1),
		reservedKey(r.prefix, a.ID),
	}
	now := a.Now.UnixMilli()
	inFlight := "0"
	if l.inFlight() {
		inFlight = "1"
	}
	res, err := admitScript.Run(ctx, r.client, keys,
		now, l.Requests, strconv.FormatFloat(rw, 'f', 6, 64), ms(2*l.RequestWindow)+1,
		l.Tokens, strconv.FormatFloat(tw, 'f', 6, 64), ms(2*l.TokenWindow)+1,
		a.Reserve, l.Concurrent, a.Slot, now+ms(l.SlotTTL), ms(l.SlotTTL)+1,
		l.Spend, strconv.FormatFloat(sw, 'f', 6, 64), a.Spend, inFlight,
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
	case "spend":
		d.RetryAfter = retryAfter(sleft)
	default:
		d.RetryAfter = time.Second
	}
	return d, nil
}

// Settle implements Store.
func (r *Redis) Settle(ctx context.Context, l Limits, a Admission, delta, cost int64) error {
	ti, _, _ := window(a.Now, l.TokenWindow)
	si, _, _ := window(a.Now, l.SpendWindow)
	if l.Spend <= 0 {
		cost = 0
	}
	return settleScript.Run(ctx, r.client,
		[]string{slotKey(r.prefix, a.ID), tokKey(r.prefix, a.ID, ti), spendKey(r.prefix, a.ID, si), reservedKey(r.prefix, a.ID)},
		a.Slot, delta, cost, ms(2*l.SpendWindow)+1).Err()
}

// Close implements Store.
func (r *Redis) Close() error { return r.client.Close() }

// Client is the Redis client, for other state kept on the same server.
func (r *Redis) Client() redis.UniversalClient { return r.client }

// Renew implements Store: each slot's lease (and with it the spend
// reservation) runs until until, if the slot is still held; one pipeline
// for the whole batch.
func (r *Redis) Renew(ctx context.Context, l Limits, as []Admission, until time.Time) error {
	_, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		seen := map[string]bool{}
		for _, a := range as {
			key := slotKey(r.prefix, a.ID)
			p.ZAddXX(ctx, key, redis.Z{Score: float64(until.UnixMilli()), Member: a.Slot})
			if seen[a.ID] {
				continue
			}
			seen[a.ID] = true
			// The keys outlive every lease in them; the lease itself is the
			// score.
			ttl := until.Sub(a.Now) + time.Millisecond
			p.PExpire(ctx, key, ttl)
			if l.Spend > 0 {
				p.PExpire(ctx, reservedKey(r.prefix, a.ID), ttl)
			}
		}
		return nil
	})
	return err
}
