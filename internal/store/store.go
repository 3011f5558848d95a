// Package store keeps the state that limits share: request and token
// counts in sliding windows and concurrency slots, per identity. Memory
// serves one process; Redis serves several Caddy instances, with every
// admission one atomic script.
package store

import (
	"context"
	"math"
	"time"
)

// Limits are the caps per identity; a zero field is no cap.
type Limits struct {
	Requests      int64
	RequestWindow time.Duration
	Tokens        int64
	TokenWindow   time.Duration
	Concurrent    int64
	// Spend is the money an identity may spend per SpendWindow, in
	// nano-dollars: what settled requests cost plus what the requests in
	// flight reserved.
	Spend       int64
	SpendWindow time.Duration
	// SlotTTL is the lease of what an instance holds in a shared store
	// (its requests' concurrency slots and spend reservations): the store
	// renews it every third of this while the instance holds any, so what
	// an instance that died mid-stream held is free within this time. (The
	// memory store needs no lease: its holders cannot outlive it.)
	SlotTTL time.Duration
}

// Admission asks to admit one request.
type Admission struct {
	ID      string    // the identity
	Reserve int64     // tokens reserved for the request
	Spend   int64     // nano-dollars reserved for the request
	Now     time.Time // the time of the request
}

// Decision is the answer to an Admission.
type Decision struct {
	Allowed    bool
	Limit      string // "requests", "tokens", "concurrent" or "spend" when refused
	RetryAfter time.Duration
}

// Store admits requests and settles them. An admission either passes every
// check and records all of them, or records nothing.
type Store interface {
	Admit(ctx context.Context, l Limits, a Admission) (Decision, error)
	// Settle releases the request's slot and spend reservation, corrects
	// its token reservation by delta (real usage minus reserve) and adds
	// what it cost (nano-dollars) to the spend, both in the windows the
	// request was admitted in.
	Settle(ctx context.Context, l Limits, a Admission, delta, cost int64) error
	Close() error
}

// window locates now in a sliding window: the index of the current fixed
// window and how much of the previous one still counts.
func window(now time.Time, size time.Duration) (idx int64, prevWeight float64, left time.Duration) {
	if size <= 0 {
		return 0, 0, 0
	}
	ns := now.UnixNano()
	idx = ns / int64(size)
	elapsed := time.Duration(ns - idx*int64(size))
	return idx, 1 - float64(elapsed)/float64(size), size - elapsed
}

// retryAfter rounds a wait up to whole seconds, at least one.
func retryAfter(d time.Duration) time.Duration {
	return time.Duration(math.Max(1, math.Ceil(d.Seconds()))) * time.Second
}

// limitsKey is the hash that holds an identity's counts (redis.go); the
// {id} hash tag would keep any other key of the identity in the same
// Redis Cluster slot.
func limitsKey(prefix, id string) string { return prefix + "{" + id + "}:limits" }

// inFlight reports whether admitted requests are held as leased slots:
// for a concurrency cap, or for the spend reservations of a budget.
func (l Limits) inFlight() bool { return l.Concurrent > 0 || l.Spend > 0 }
