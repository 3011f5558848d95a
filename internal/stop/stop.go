// Package stop finds in-flight generations by request id so that a "stop
// generating" request can cancel them: on this instance through a
// process-wide registry, and on any instance sharing a Redis server through
// pub/sub, with an acknowledgement from the instance that held it.
package stop

import (
	"context"
	"sync"
)

// generation is one in-flight request that may be stopped.
type generation struct {
	owner  string
	cancel func()
}

// The registry is process-wide, not per handler: after a config reload the
// streams of the old configuration still run, and a stop that reaches the
// new one must find them.
var registry = struct {
	sync.Mutex
	m map[string]*generation
}{m: map[string]*generation{}}

// Add registers a generation under id. owner is who may stop it (the
// caller's identity; "" when the endpoint has no authentication). cancel is
// called at most once, by the first Stop that finds it. The returned
// function removes the registration; call it when the request ends.
func Add(id, owner string, cancel func()) (remove func()) {
	g := &generation{owner: owner, cancel: cancel}
	registry.Lock()
	registry.m[id] = g
	registry.Unlock()
	return func() {
		registry.Lock()
		if registry.m[id] == g {
			delete(registry.m, id)
		}
		registry.Unlock()
	}
}

// Local stops the generation id on this instance if it runs here and owner
// may stop it. It reports whether it did.
func Local(id, owner string) bool {
	registry.Lock()
	g, ok := registry.m[id]
	if ok && g.owner == owner {
		delete(registry.m, id)
	}
	registry.Unlock()
	if !ok || g.owner != owner {
		return false
	}
	g.cancel()
	return true
}

// Broadcaster reaches the other instances.
type Broadcaster interface {
	// Stop asks every instance to stop id and reports whether one did.
	Stop(ctx context.Context, id, owner string) (bool, error)
	Close() error
}
