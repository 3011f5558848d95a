// Package store keeps the state that limits share: request and token
// counts in sliding windows and concurrency slots, per identity. Memory
// serves one process; Redis serves several Caddy instances, with every
// admission one atomic script.
package store

import (
	"context"
	"math"
	"strconv"
	"time"
)

// Limits are the caps per identity; a zero field is no cap.
type Limits struct {
	Requests      int64
	RequestWindow time.Duration
	Tokens        int64
	TokenWindow   time.Duration
	Concurrent    int64
	// SlotTTL is the lease of a concurrency slot: the holder renews it
	// while its stream lives, so the slot of an instance that died
	// mid-stream is free within this time.
	SlotTTL time.Duration
}

// Admission asks to admit one request.
type Admission struct {
	ID      string    // the identity
	Reserve int64     // tokens reserved for the request
	Slot    string    // a unique id for its concurrency slot
	Now     time.Time // the time of the request
}

// Decision is the answer to an Admission.
type Decision struct {
	Allowed    bool
	Limit      string // "requests", "tokens" or "concurrent" when refused
	RetryAfter time.Duration
}

// Store admits requests and settles them. An admission either passes every
// check and records all of them, or records nothing.
type Store interface {
	Admit(ctx context.Context, l Limits, a Admission) (Decision, error)
	// Settle releases the request's slot and corrects its token reservation
	// by delta (real usage minus reserve) in the window it was made in.
	Settle(ctx context.Context, l Limits, a Admission, delta int64) error
	// Renew extends the lease of the request's slot until the given time.
	Renew(ctx context.Context, l Limits, a Admission, until time.Time) error
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

// keys for one identity; the {id} hash tag keeps them in one Redis Cluster
// slot, so one script can touch them all.
func reqKey(prefix, id string, idx int64) string {
	return prefix + "{" + id + "}:req:" + strconv.FormatInt(idx, 10)
}

func tokKey(prefix, id string, idx int64) string {
	return prefix + "{" + id + "}:tok:" + strconv.FormatInt(idx, 10)
}

func slotKey(prefix, id string) string { return prefix + "{" + id + "}:slots" }
