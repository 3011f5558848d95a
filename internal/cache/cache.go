// Package cache keeps complete model answers so that a repeated request can
// be answered without calling the model: in this process's memory (an LRU
// bounded in bytes) or in Redis (shared by several instances). It also runs
// the single flight that lets identical requests in progress share one
// upstream call while it streams.
package cache

import (
	"context"
	"encoding/binary"
	"errors"
	"time"
)

// Entry is one stored answer: the upstream's body as it was read, and when
// each read arrived (for paced replay). An Entry is not changed once stored.
type Entry struct {
	Streamed    bool // the request that stored it asked for a stream
	ContentType string
	Body        []byte
	Reads       []Read
	// Body[UsageFrom:UsageTo] is the event with the usage chunk that
	// include_usage adds, found when the entry is stored, so that a hit
	// can drop it (or read usage from it) without parsing the stream.
	// Equal when there is none.
	UsageFrom, UsageTo int
}

// Read marks that Body[:End] had arrived At after the request was sent.
type Read struct {
	End int
	At  time.Duration
}

// entryOverhead approximates what an entry costs besides its bytes: the
// Entry and its list element, map slot and item.
const entryOverhead = 200

// Size is the memory the entry holds, for the LRU bound.
func (e *Entry) Size() int64 {
	return int64(len(e.Body)+len(e.ContentType)+len(e.Reads)*16) + entryOverhead
}

// Store keeps entries for a time to live.
type Store interface {
	// Get returns the entry under key, or nil when there is none.
	Get(ctx context.Context, key string) (*Entry, error)
	// Set stores e under key for ttl.
	Set(ctx context.Context, key string, e *Entry, ttl time.Duration) error
}

// encode writes an entry as bytes: version, content type, reads (end and
// arrival deltas in microseconds as uvarints), body.
func encode(e *Entry) []byte {
	b := make([]byte, 0, len(e.Body)+len(e.ContentType)+len(e.Reads)*4+16)
	b = append(b, 1)
	if e.Streamed {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(e.ContentType)))
	b = append(b, e.ContentType...)
	b = binary.AppendUvarint(b, uint64(e.UsageFrom))
	b = binary.AppendUvarint(b, uint64(e.UsageTo))
	b = binary.AppendUvarint(b, uint64(len(e.Reads)))
	prevEnd, prevUs := 0, int64(0)
	for _, r := range e.Reads {
		us := max(int64(r.At/time.Microsecond), prevUs)
		b = binary.AppendUvarint(b, uint64(r.End-prevEnd))
		b = binary.AppendUvarint(b, uint64(us-prevUs))
		prevEnd, prevUs = r.End, us
	}
	return append(b, e.Body...)
}

var errCorrupt = errors.New("cache: corrupt entry")

// decode reads what encode wrote.
func decode(b []byte) (*Entry, error) {
	if len(b) < 2 || b[0] != 1 {
		return nil, errCorrupt
	}
	streamed := b[1] == 1
	b = b[2:]
	next := func() (uint64, bool) {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return 0, false
		}
		b = b[n:]
		return v, true
	}
	n, ok := next()
	if !ok || n > uint64(len(b)) {
		return nil, errCorrupt
	}
	e := &Entry{Streamed: streamed, ContentType: string(b[:n])}
	b = b[n:]
	from, ok1 := next()
	to, ok2 := next()
	if !ok1 || !ok2 || from > to {
		return nil, errCorrupt
	}
	e.UsageFrom, e.UsageTo = int(from), int(to)
	count, ok := next()
	if !ok || count > uint64(len(b)) {
		return nil, errCorrupt
	}
	end, at := 0, time.Duration(0)
	e.Reads = make([]Read, 0, count)
	for range count {
		d, ok1 := next()
		t, ok2 := next()
		if !ok1 || !ok2 {
			return nil, errCorrupt
		}
		end += int(d)
		at += time.Duration(t) * time.Microsecond
		e.Reads = append(e.Reads, Read{End: end, At: at})
	}
	e.Body = b
	if end > len(e.Body) || e.UsageTo > len(e.Body) {
		return nil, errCorrupt
	}
	return e, nil
}
