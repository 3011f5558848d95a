package store

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is the Store shared by several Caddy instances. Every admission is
// one Lua script on one hash per identity, so all checks and all records
// happen atomically in one round trip (and on a Redis Cluster too).
//
// What a request settles (its real usage and cost, the end of its
// reservation) is written with the identity's next admission on this
// instance, or at most flushDelay later: the answer's end waits for no
// round trip. Until then the request's reservation, never less than what
// it may cost, stays counted, so a budget is never overrun by waiting.
// Under a concurrency cap the slot is freed at once instead, so that a
// client's next request finds it free.
type Redis struct {
	client redis.UniversalClient
	prefix string
	// instance names this store in the hashes: each instance keeps its own
	// requests in flight there, in one leased field per identity.
	instance string

	mu       sync.Mutex
	local    map[string]*ownPart // identity → this instance's part
	flushAt  *time.Timer         // armed while settlements wait
	closed   bool
	renewing time.Duration // how often the parts' leases are renewed (0: not yet)
	shorter  chan struct{} // the period shrank: wake the renewals
	done     chan struct{} // ends the renewals
}

// ownPart is what this instance holds for one identity: its requests in
// flight, what they reserved, and settlements not yet written.
type ownPart struct {
	mu           sync.Mutex // guards the fields below; never held over a round trip
	gone         bool       // dropped from local: look it up again
	writing      int        // writes in flight: it must stay in local
	count, spend int64      // this instance's requests in flight, and what they reserved
	// what ended since the part was last written: written as changes
	dCount, dSpend int64
	settled        []settlement
	waiting        time.Time // when the oldest of them ended (zero: none waits)
	l              Limits    // the limits of the last request, for the flush
	last           time.Time // the last admission: the time of writes without one
}

// waits reports whether anything waits to be written.
func (me *ownPart) waits() bool { return len(me.settled) > 0 || me.dCount != 0 || me.dSpend != 0 }

// leaseEnd is when the lease of a part written without an admission ends:
// one lease from now (or from the last admission, if that is later).
func (me *ownPart) leaseEnd() time.Time {
	now := time.Now()
	if me.last.After(now) {
		now = me.last
	}
	return now.Add(me.l.SlotTTL)
}

// settlement is what requests that ended settle, to be counted in their
// admissions' windows.
type settlement struct {
	tokIdx, delta, spendIdx, cost int64
}

// settle adds a settlement to those waiting: requests admitted in the same
// windows are summed, so what waits (and the script's arguments) does not
// grow with the requests that ended.
func (me *ownPart) settle(s settlement) {
	for i := range me.settled {
		if st := &me.settled[i]; st.tokIdx == s.tokIdx && st.spendIdx == s.spendIdx {
			st.delta += s.delta
			st.cost += s.cost
			return
		}
	}
	me.settled = append(me.settled, s)
}

// flushDelay is the longest a settlement waits for the identity's next
// admission before it is written on its own.
const flushDelay = 20 * time.Millisecond

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
	var id [6]byte
	_, _ = rand.Read(id[:])
	return &Redis{client: redis.NewUniversalClient(u), prefix: o.Prefix, instance: hex.EncodeToString(id[:]),
		local: map[string]*ownPart{}, shorter: make(chan struct{}, 1), done: make(chan struct{})}, nil
}

// Everything an identity's limits keep in Redis is one hash, so an
// admission reads it with one HMGET and records with one HSET, whatever
// limits apply (each Redis call from a script costs microseconds):
//
//	rw rc rp   request window: index, count in it, count in the one before
//	tw tc tp   token window, likewise
//	sw sc sp   spend window (nano-dollars), likewise
//	n held     requests in flight, and what they reserved, in all
//	i:<inst>   one instance's part of them: "<count> <reserved> <lease end ms>"
//	a          the last write (ms): the hash exists
//	e          when the hash expires (ms, by the writers' clocks)
//
// An instance that stops renewing its part (it died) loses it when the
// lease ends: parts are swept only when a concurrency or spend check would
// refuse, so the usual admission never walks them.

// KEYS: the identity's hash
// ARGV: 1 now_ms (the clock), 2 admit (1, or 0 to write this instance's part only),
// 3 req_limit, 4 req_idx, 5 req_prev_weight (the weights in millionths), 6 tok_limit, 7 tok_idx,
// 8 tok_prev_weight, 9 reserve, 10 conc_limit, 11 spend_limit,
// 12 spend_idx, 13 spend_prev_weight, 14 spend_reserve, 15 instance,
// 16 its count, 17 its reserved spend (both as this instance knows them),
// 18 lease_end_ms, 19 key_ttl_ms, 20 in_flight, 21 count change,
// 22 reserved change (what ended since this instance last wrote), 23 tokens
// and 24 cost settled by requests admitted in this admission's windows
// (the usual case: two arguments however many ended); then settlements of
// earlier windows: tok_idx, delta, spend_idx, cost ...
var admitScript = redis.NewScript(`
-- (x + 0 turns a string into a number with one strtod, tonumber with two)
local key, now, admit = KEYS[1], ARGV[1] + 0, ARGV[2] == '1'
local rl, ri, rw = ARGV[3] + 0, ARGV[4] + 0, ARGV[5] / 1e6
local tl, ti, tw, reserve = ARGV[6] + 0, ARGV[7] + 0, ARGV[8] / 1e6, ARGV[9] + 0
local cl = ARGV[10] + 0
local sl, si, sw, spend = ARGV[11] + 0, ARGV[12] + 0, ARGV[13] / 1e6, ARGV[14] + 0
local me, myCount, myHeld = 'i:' .. ARGV[15], ARGV[16] + 0, ARGV[17] + 0
local inFlight = ARGV[20] == '1'
local v = redis.call('HMGET', key, 'rw', 'rc', 'rp', 'tw', 'tc', 'tp', 'sw', 'sc', 'sp', 'n', 'held', me, 'e')
-- a window's index and counts as of idx, and whether the window is the one
-- stored; a newer window another instance (its clock a little ahead)
-- started is the current one
local function win(o, idx)
	local w = v[o]
	if not w then return idx, 0, 0 end
	w = w + 0
	local c, p = (v[o+1] or 0) + 0, (v[o+2] or 0) + 0
	if w >= idx then return w, c, p, true end
	if w == idx - 1 then return idx, 0, c end
	return idx, 0, 0
end
local rIdx, rc, rp, rSame = win(1, ri)
local tIdx, tc, tp, tSame = win(4, ti)
local sIdx, sc, sp, sSame = win(7, si)
local tp0, sp0 = tp, sp -- a settlement of an earlier window may change them
-- this instance's part changes by what ended since it last wrote (writes
-- of one instance may pass each other: changes add up in any order); a
-- part swept while its instance lived is written again whole
local n, held, lease = (v[10] or 0) + 0, (v[11] or 0) + 0, ARGV[18] + 0
local dCount, dHeld = ARGV[21] + 0, ARGV[22] + 0
if v[12] then
	local c, h, l = string.match(v[12], '^(%d+) (%d+) (%d+)')
	myCount, myHeld, l = c + dCount, h + dHeld, l + 0
	n, held = n + dCount, held + dHeld
	-- (comparisons, not math.max: a library call costs more here)
	if myCount < 0 then myCount = 0 end
	if myHeld < 0 then myHeld = 0 end
	if n < 0 then n = 0 end
	if held < 0 then held = 0 end
	if l > lease then lease = l end
else
	n, held = n + myCount, held + myHeld
end
-- what ended since counts in its admissions' windows: first what was
-- admitted in this admission's windows (summed), then in earlier ones
local dt, ds = ARGV[23] + 0, ARGV[24] + 0
if tIdx == ti then tc = tc + dt elseif tIdx == ti + 1 then tp = tp + dt end
if sIdx == si then sc = sc + ds elseif sIdx == si + 1 then sp = sp + ds end
for k = 25, #ARGV, 4 do
	local t, d, s, c = ARGV[k] + 0, ARGV[k+1] + 0, ARGV[k+2] + 0, ARGV[k+3] + 0
	if tIdx == t then tc = tc + d elseif tIdx == t + 1 then tp = tp + d end
	if sIdx == s then sc = sc + c elseif sIdx == s + 1 then sp = sp + c end
end
local why = nil
if admit then
	if rl > 0 and rc + rp * rw + 1 > rl then
		why = 'requests'
	elseif tl > 0 and tc + tp * tw + reserve > tl then
		why = 'tokens'
	elseif inFlight and ((cl > 0 and n >= cl) or (sl > 0 and sc + sp * sw + held + spend > sl)) then
		-- parts whose lease ran out: their instances died
		local all, gone = redis.call('HGETALL', key), {}
		for i = 1, #all, 2 do
			if string.sub(all[i], 1, 2) == 'i:' and all[i] ~= me then
				local c, h, lease = string.match(all[i+1], '^(%d+) (%d+) (%d+)$')
				if lease + 0 <= now then
					gone[#gone+1] = all[i]
					n, held = math.max(n - c, 0), math.max(held - h, 0)
				end
			end
		end
		if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
		if cl > 0 and n >= cl then
			why = 'concurrent'
		elseif sl > 0 and sc + sp * sw + held + spend > sl then
			why = 'spend'
		end
	end
	if not why then
		if rl > 0 then rc = rc + 1 end
		if tl > 0 then tc = tc + reserve end
		if inFlight then
			n, held, myCount, myHeld = n + 1, held + spend, myCount + 1, myHeld + spend
		end
	end
end
-- the hash outlives its last write by key_ttl at least: its expiry is
-- pushed to twice that only when less than one and a half is left (a
-- PEXPIRE per write would cost as much as the rest of the writing)
local ttl, expires = ARGV[19] + 0, v[13]
if expires then expires = expires + 0 end
local extend = not expires or expires - now < ttl * 1.5
if extend then expires = now + 2 * ttl end
-- what did not change is written back as it was read: a string passes
-- through, a number costs Redis a conversion (several microseconds for
-- a write's worth of timestamps and nano-dollars)
redis.call('HSET', key, 'a', ARGV[1], 'rw', rSame and v[1] or rIdx, 'rc', rc, 'rp', rSame and v[3] or rp,
	'tw', tSame and v[4] or tIdx, 'tc', tc, 'tp', (tSame and tp == tp0) and v[6] or tp,
	'sw', sSame and v[7] or sIdx, 'sc', sc, 'sp', (sSame and sp == sp0) and v[9] or sp,
	'n', n, 'held', held, me, string.format('%d %d %d', myCount, myHeld, lease), 'e', extend and expires or v[13])
if extend then redis.call('PEXPIRE', key, 2 * ttl) end
if why then return {0, why} end
return {1, ''}
`)

func ms(d time.Duration) int64 { return d.Milliseconds() }

// keyTTL is the least an identity's hash outlives its last write (at most
// twice that; see the script): two of its longest window, or a lease.
func keyTTL(l Limits) int64 {
	return ms(max(2*l.RequestWindow, 2*l.TokenWindow, 2*l.SpendWindow, l.SlotTTL)) + 1
}

// Admit implements Store.
func (r *Redis) Admit(ctx context.Context, l Limits, a Admission) (Decision, error) {
	ok, why, err := r.write(ctx, l, a, true, a.Now.Add(l.SlotTTL))
	if err != nil || ok {
		return Decision{Allowed: ok}, err
	}
	_, _, rleft := window(a.Now, l.RequestWindow)
	_, _, tleft := window(a.Now, l.TokenWindow)
	_, _, sleft := window(a.Now, l.SpendWindow)
	d := Decision{Limit: why}
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

// part is this instance's part of an identity, locked.
func (r *Redis) part(id string, create bool) *ownPart {
	for {
		r.mu.Lock()
		me := r.local[id]
		if me == nil && create {
			me = &ownPart{}
			r.local[id] = me
		}
		r.mu.Unlock()
		if me == nil {
			return nil
		}
		me.mu.Lock()
		if !me.gone {
			return me
		}
		me.mu.Unlock()
	}
}

// write runs the script for one identity: with admit, it admits a's
// request; either way it writes this instance's part and the settlements
// waiting. The part is locked only to take what waits, not over the round
// trip: an identity's requests are admitted in parallel.
func (r *Redis) write(ctx context.Context, l Limits, a Admission, admit bool, leaseEnd time.Time) (bool, string, error) {
	me := r.part(a.ID, true)
	now := a.Now.UnixMilli() // the clock: the hash's last write and expiry
	if !admit {
		// windows as of the last admission (what it settles counts there),
		// the clock as it is (a renewal must push the expiry back)
		a.Now, now = me.last, time.Now().UnixMilli()
	}
	settled, dCount, dSpend, waiting := me.settled, me.dCount, me.dSpend, me.waiting
	me.settled, me.dCount, me.dSpend, me.waiting = nil, 0, 0, time.Time{}
	count, spendHeld := me.count, me.spend
	me.writing++
	me.mu.Unlock()

	ri, rw, _ := window(a.Now, l.RequestWindow)
	ti, tw, _ := window(a.Now, l.TokenWindow)
	si, sw, _ := window(a.Now, l.SpendWindow)
	admitArg, inFlight := "0", "0"
	if admit {
		admitArg = "1"
	}
	if l.inFlight() {
		inFlight = "1"
	}
	spend := int64(0)
	if l.Spend > 0 {
		spend = a.Spend
	}
	args := make([]any, 0, 24+4*len(settled))
	args = append(args, now, admitArg, l.Requests, ri, weightArg(rw), l.Tokens, ti, weightArg(tw), a.Reserve, l.Concurrent,
		l.Spend, si, weightArg(sw), spend, r.instance, count, spendHeld, leaseEnd.UnixMilli(), keyTTL(l), inFlight, dCount, dSpend, 0, 0)
	for _, st := range settled {
		if st.tokIdx == ti && st.spendIdx == si { // settled holds one per pair of windows
			args[22], args[23] = st.delta, st.cost
			continue
		}
		args = append(args, st.tokIdx, st.delta, st.spendIdx, st.cost)
	}
	res, err := admitScript.Run(ctx, r.client, []string{limitsKey(r.prefix, a.ID)}, args...).Slice()

	me.mu.Lock() // not gone while writing
	defer me.mu.Unlock()
	me.writing--
	me.l = l
	if err != nil {
		// written nothing: what was taken waits for the next write
		for _, st := range settled {
			me.settle(st)
		}
		me.dCount += dCount
		me.dSpend += dSpend
		if !waiting.IsZero() && (me.waiting.IsZero() || waiting.Before(me.waiting)) {
			me.waiting = waiting
		}
		return false, "", err
	}
	if ok, _ := res[0].(int64); ok != 1 {
		why, _ := res[1].(string)
		return false, why, nil
	}
	if admit {
		if l.inFlight() {
			me.count++
			me.spend += spend
			r.renewEvery(l.SlotTTL / 3)
		}
		if a.Now.After(me.last) {
			me.last = a.Now
		}
	}
	return true, "", nil
}

func weightArg(w float64) int64 { return int64(math.Round(w * 1e6)) }

// Settle implements Store: the settlement waits for the identity's next
// admission (or flushDelay), except under a concurrency cap.
func (r *Redis) Settle(ctx context.Context, l Limits, a Admission, delta, cost int64) error {
	if l.Tokens <= 0 {
		delta = 0
	}
	if l.Spend <= 0 {
		cost = 0
	}
	if !l.inFlight() && delta == 0 && cost == 0 {
		return nil // nothing lasts past the admission
	}
	me := r.part(a.ID, true)
	if l.inFlight() && me.count > 0 {
		reserved := int64(0)
		if l.Spend > 0 {
			reserved = min(a.Spend, me.spend)
		}
		me.count--
		me.spend -= reserved
		me.dCount--
		me.dSpend -= reserved
	}
	ti, _, _ := window(a.Now, l.TokenWindow)
	si, _, _ := window(a.Now, l.SpendWindow)
	if delta != 0 || cost != 0 {
		me.settle(settlement{ti, delta, si, cost})
	}
	me.l = l
	if me.waiting.IsZero() && me.waits() {
		me.waiting = time.Now()
	}
	if l.Concurrent > 0 {
		// the slot is free now, not at the next admission
		lease := me.leaseEnd()
		me.mu.Unlock()
		if _, _, err := r.write(ctx, l, Admission{ID: a.ID}, false, lease); err != nil {
			r.flushLater() // it waits, and is tried again until Redis answers
			return err
		}
		return nil
	}
	me.mu.Unlock()
	r.flushLater()
	return nil
}

// flushLater writes what waits within flushDelay of its end, unless an
// admission of its identity took it first (under steady traffic nothing
// is written on its own); while Redis cannot be reached, it tries again
// every second.
func (r *Redis) flushLater() { r.flushIn(flushDelay) }

func (r *Redis) flushIn(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.flushAt != nil || r.closed {
		return
	}
	r.flushAt = time.AfterFunc(d, func() {
		r.mu.Lock()
		r.flushAt = nil
		r.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		next, err := r.flush(ctx, time.Now().Add(-flushDelay))
		switch {
		case err != nil:
			r.flushIn(time.Second)
		case !next.IsZero():
			r.flushIn(time.Until(next))
		}
	})
}

// Flush writes everything waiting (Close calls it too) and forgets the
// identities this instance holds nothing of.
func (r *Redis) Flush(ctx context.Context) error {
	_, err := r.flush(ctx, time.Time{})
	return err
}

// flush writes what has waited since due or longer (everything, if due is
// zero) and reports when what it left waiting is due.
func (r *Redis) flush(ctx context.Context, due time.Time) (next time.Time, err error) {
	var errs []error
	for _, id := range r.identities() {
		me := r.part(id, false)
		if me == nil {
			continue
		}
		if !me.waits() {
			if me.count == 0 && me.writing == 0 {
				r.mu.Lock()
				delete(r.local, id)
				r.mu.Unlock()
				me.gone = true
			}
			me.mu.Unlock()
			continue
		}
		if !due.IsZero() && me.waiting.After(due) {
			if at := me.waiting.Add(flushDelay); next.IsZero() || at.Before(next) {
				next = at
			}
			me.mu.Unlock()
			continue
		}
		l, lease := me.l, me.leaseEnd()
		me.mu.Unlock()
		if _, _, err := r.write(ctx, l, Admission{ID: id}, false, lease); err != nil {
			errs = append(errs, err)
		}
	}
	return next, errors.Join(errs...)
}

// identities are those this instance holds a part of.
func (r *Redis) identities() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.local))
	for id := range r.local {
		ids = append(ids, id)
	}
	return ids
}

// Close implements Store: what waits is written first.
func (r *Redis) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r.mu.Lock()
	if !r.closed {
		close(r.done)
	}
	r.closed = true
	if r.flushAt != nil {
		r.flushAt.Stop()
		r.flushAt = nil
	}
	r.mu.Unlock()
	ferr := r.Flush(ctx)
	return errors.Join(ferr, r.client.Close())
}

// Client is the Redis client, for other state kept on the same server.
func (r *Redis) Client() redis.UniversalClient { return r.client }

// renewEvery makes sure this instance's parts are renewed at least every
// period while it holds requests in flight (called with the part locked,
// so it takes only r.mu).
func (r *Redis) renewEvery(period time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || (r.renewing > 0 && r.renewing <= period) {
		return
	}
	first := r.renewing == 0
	r.renewing = period
	if first {
		go r.renewLoop()
		return
	}
	select { // a config with a shorter lease (a reload): renew now
	case r.shorter <- struct{}{}:
	default:
	}
}

// renewLoop renews the lease of every part that holds requests in flight,
// one script per identity, until Close: an instance that dies stops
// renewing, and what it held lapses within one lease.
func (r *Redis) renewLoop() {
	for {
		r.mu.Lock()
		period := r.renewing
		r.mu.Unlock()
		select {
		case <-r.done:
			return
		case <-r.shorter:
		case <-time.After(period):
		}
		for _, id := range r.identities() {
			me := r.part(id, false)
			if me == nil {
				continue
			}
			holds, l, lease := me.count > 0, me.l, me.leaseEnd()
			me.mu.Unlock()
			if !holds {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), period)
			_, _, _ = r.write(ctx, l, Admission{ID: id}, false, lease) // a failure: the next round tries again
			cancel()
		}
	}
}
