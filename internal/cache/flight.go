package cache

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"
)

// Group runs single flights: while one request for a key is answered by
// the upstream (the leader), identical requests (followers) relay the same
// answer as it arrives instead of calling the upstream themselves.
type Group struct {
	mu sync.Mutex
	m  map[string]*Flight
}

// Join returns the flight for key and whether the caller leads it (and
// must End it).
func (g *Group) Join(key string) (*Flight, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f, ok := g.m[key]; ok {
		f.mu.Lock()
		f.followers++
		f.mu.Unlock()
		return f, false
	}
	if g.m == nil {
		g.m = map[string]*Flight{}
	}
	f := &Flight{g: g, key: key, wake: make(chan struct{})}
	g.m[key] = f
	return f, true
}

// Alone returns a flight for key that no other request joins: a request
// that must not be answered from the cache (Cache-Control: no-cache) still
// has its answer stored through it.
func (g *Group) Alone(key string) *Flight {
	return &Flight{g: g, key: key, wake: make(chan struct{})}
}

// Flight is one upstream answer being shared.
type Flight struct {
	g   *Group
	key string

	mu          sync.Mutex
	started     bool
	streamed    bool
	contentType string
	body        []byte
	reads       []Read
	ended       bool
	complete    bool
	wake        chan struct{} // closed (and replaced) when something changed
	followers   int
	leaderGone  func() // set while the leader's client has left: cancels the upstream
}

// ErrLeaderFailed ends a follower's relay when the shared answer broke.
var ErrLeaderFailed = errors.New("the shared upstream answer broke")

func (f *Flight) signal() {
	close(f.wake)
	f.wake = make(chan struct{})
}

// Start is the leader's: the answer to a request (streamed or not) has
// begun, with this content type.
func (f *Flight) Start(streamed bool, contentType string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.started {
		f.started, f.streamed, f.contentType = true, streamed, contentType
		f.signal()
	}
}

// Append is the leader's: the next bytes read, at that time since the
// request was sent.
func (f *Flight) Append(b []byte, at time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.body = append(f.body, b...)
	f.reads = append(f.reads, Read{End: len(f.body), At: at})
	f.signal()
}

// End is the leader's: the answer is over, complete or not. New requests
// for the key start a new flight from now on. It returns the answer as an
// Entry when it is complete.
func (f *Flight) End(complete bool) *Entry {
	f.g.mu.Lock()
	if f.g.m[f.key] == f {
		delete(f.g.m, f.key)
	}
	f.g.mu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ended, f.complete = true, complete && f.started
	f.signal()
	if !f.complete {
		return nil
	}
	return &Entry{Streamed: f.streamed, ContentType: f.contentType, Body: f.body, Reads: f.reads}
}

// LeaderLeft is the leader's, when its own client left: cancel is called
// at once when no follower is waiting, else when the last one leaves.
func (f *Flight) LeaderLeft(cancel func()) {
	f.mu.Lock()
	if f.followers > 0 {
		f.leaderGone = cancel
		cancel = nil
	}
	f.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// Wait is a follower's: it waits until the answer starts and returns its
// content type and a reader of the answer from its first byte. ok is false
// when the flight ended without an answer (the follower then asks the
// upstream itself). A follower must call Leave when done.
func (f *Flight) Wait(ctx context.Context) (contentType string, r io.Reader, ok bool, err error) {
	for {
		f.mu.Lock()
		started, ended, ch := f.started, f.ended, f.wake
		ct := f.contentType
		f.mu.Unlock()
		switch {
		case started:
			return ct, &follower{f: f, ctx: ctx}, true, nil
		case ended:
			return "", nil, false, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return "", nil, false, ctx.Err()
		}
	}
}

// Leave is a follower's, when it is done (or its client left).
func (f *Flight) Leave() {
	f.mu.Lock()
	f.followers--
	var cancel func()
	if f.followers == 0 && f.leaderGone != nil {
		cancel, f.leaderGone = f.leaderGone, nil
	}
	f.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// follower reads a flight's answer as it grows.
type follower struct {
	f   *Flight
	ctx context.Context
	pos int
}

func (r *follower) Read(p []byte) (int, error) {
	for {
		f := r.f
		f.mu.Lock()
		if r.pos < len(f.body) {
			n := copy(p, f.body[r.pos:])
			r.pos += n
			f.mu.Unlock()
			return n, nil
		}
		ended, complete, ch := f.ended, f.complete, f.wake
		f.mu.Unlock()
		if ended {
			if complete {
				return 0, io.EOF
			}
			return 0, ErrLeaderFailed
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}
