package llmstream

import (
	"context"
	"encoding/json"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// With store redis, what routing learns is shared by every instance: a key
// answered with 429 rests cluster-wide, and an upstream taken out by one
// instance is out for all. Each decision is published on the
// `<prefix>route` channel; every instance (the publisher too) applies it to
// its own pooled state, so requests read nothing from Redis. A rest is also
// kept as a key with the rest's expiry, so an instance that starts later
// learns the rests in force.

// routeMessage is one routing decision.
type routeMessage struct {
	Op    string `json:"op"`    // "rest", "down" or "up"
	Key   string `json:"key"`   // the pool key of the key's rest or the upstream's health
	Until int64  `json:"until"` // Unix nanoseconds
}

// routeBus carries routing decisions between instances. One subscription
// serves every configuration on the same Redis (it is pooled with it).
type routeBus struct {
	client  redis.UniversalClient
	channel string
	prefix  string
	sub     *redis.PubSub
	done    chan struct{}
	logger  *zap.Logger
}

func newRouteBus(client redis.UniversalClient, prefix string, logger *zap.Logger) *routeBus {
	b := &routeBus{client: client, channel: prefix + "route", prefix: prefix, done: make(chan struct{}), logger: logger}
	b.sub = client.Subscribe(context.Background(), b.channel)
	go b.serve()
	return b
}

func (b *routeBus) serve() {
	defer close(b.done)
	for msg := range b.sub.Channel() {
		var m routeMessage
		if json.Unmarshal([]byte(msg.Payload), &m) == nil {
			applyRouteMessage(m)
		}
	}
}

// Close ends the subscription.
func (b *routeBus) Close() error {
	err := b.sub.Close()
	<-b.done
	return err
}

// publish sends a decision to every instance, in the background: routing
// never waits for Redis.
func (b *routeBus) publish(m routeMessage) {
	payload, _ := json.Marshal(m)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := b.client.Publish(ctx, b.channel, payload).Err(); err != nil {
			b.logger.Warn("sharing a routing decision failed", zap.String("op", m.Op), zap.Error(err))
			return
		}
		if m.Op == "rest" {
			if d := time.Until(time.Unix(0, m.Until)); d > 0 {
				_ = b.client.Set(ctx, b.restKey(m.Key), m.Until, d).Err()
			}
		}
	}()
}

func (b *routeBus) restKey(poolKey string) string { return b.prefix + "rest:" + poolKey }

// learnRests reads the rests in force for keys, for an instance that
// starts while other instances let keys rest.
func (b *routeBus) learnRests(keys []*apiKey) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, k := range keys {
		until, err := b.client.Get(ctx, b.restKey(k.stateKey)).Int64()
		if err == nil {
			k.rest.extend(until)
		}
	}
}

// applyRouteMessage applies a decision to this process's pooled state, if
// a loaded configuration uses the key or upstream.
func applyRouteMessage(m routeMessage) {
	switch m.Op {
	case "rest":
		if v, ok := poolValue(restPool, m.Key); ok {
			v.(*pooled[*keyRest]).v.extend(m.Until)
		}
	case "down", "up":
		v, ok := poolValue(healthPool, m.Key)
		if !ok {
			return
		}
		hs := v.(*pooled[*upstreamHealth]).v
		hs.mu.Lock()
		if m.Op == "up" {
			hs.failures, hs.downUntil = 0, time.Time{}
		} else if until := time.Unix(0, m.Until); until.After(hs.downUntil) {
			hs.downUntil = until
		}
		hs.mu.Unlock()
	}
}

// sharedState is the routeState with store redis: the in-process state,
// with every rest and every change of an upstream's health published.
type sharedState struct {
	*memoryState
	bus *routeBus
}

func (s *sharedState) rest(k *apiKey, until time.Time) {
	s.memoryState.rest(k, until)
	s.bus.publish(routeMessage{Op: "rest", Key: k.stateKey, Until: until.UnixNano()})
}

func (s *sharedState) failed(u *Upstream, now time.Time) {
	u.health.mu.Lock()
	wasDown := now.Before(u.health.downUntil)
	u.health.mu.Unlock()
	s.memoryState.failed(u, now)
	u.health.mu.Lock()
	until := u.health.downUntil
	u.health.mu.Unlock()
	if !wasDown && now.Before(until) {
		s.bus.publish(routeMessage{Op: "down", Key: u.stateKey, Until: until.UnixNano()})
	}
}

func (s *sharedState) succeeded(u *Upstream) {
	u.health.mu.Lock()
	wasDown := !u.health.downUntil.IsZero()
	u.health.mu.Unlock()
	s.memoryState.succeeded(u)
	if wasDown {
		s.bus.publish(routeMessage{Op: "up", Key: u.stateKey})
	}
}

// provisionRouteState sets up passive health and key rests: in process, or
// shared through the store's Redis.
func (h *Handler) provisionRouteState() error {
	mem := newMemoryState(h.UnhealthyAfter, time.Duration(h.UnhealthyCooldown))
	h.state = mem
	if h.redis == nil {
		return nil
	}
	client, prefix, logger := h.redis.Client(), h.redisPrefix(), h.logger
	bus, err := share(h, busPool, h.redisSettings, func() (*routeBus, func() error, error) {
		b := newRouteBus(client, prefix, logger)
		return b, b.Close, nil
	})
	if err != nil {
		return err
	}
	h.state = &sharedState{memoryState: mem, bus: bus}
	var keys []*apiKey
	for _, u := range h.ups {
		keys = append(keys, u.keys...)
	}
	go bus.learnRests(keys)
	return nil
}
