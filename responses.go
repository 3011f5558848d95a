package llmstream

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Responses API follow-ups. A request with previous_response_id only
// works on the provider account that produced that response, so the
// handler remembers which upstream and key (by its fingerprint, never the
// key) answered each response, and sends the follow-up there. With
// `store redis` every instance knows what any of them learnt.

// defaultResponseTTL is how long a response id is remembered: providers
// keep stored responses for 30 days.
const defaultResponseTTL = 30 * 24 * time.Hour

// responseRoute is where a response was produced: the upstream's URL and
// its key's fingerprint.
type responseRoute struct {
	upstream, key string
}

func (r responseRoute) String() string { return r.key + " " + r.upstream }

func parseResponseRoute(s string) (responseRoute, bool) {
	key, up, ok := strings.Cut(s, " ")
	return responseRoute{upstream: up, key: key}, ok
}

// responseRoutes remembers response id → route for a while.
type responseRoutes interface {
	remember(ctx context.Context, id string, r responseRoute, ttl time.Duration) error
	lookup(ctx context.Context, id string) (responseRoute, bool, error)
}

// memoryRoutes keeps the routes in this process (pooled: they survive
// reloads).
type memoryRoutes struct {
	mu      sync.Mutex
	routes  map[string]memoryRoute
	inserts int
}

type memoryRoute struct {
	responseRoute
	expiry time.Time
}

func (m *memoryRoutes) remember(_ context.Context, id string, r responseRoute, ttl time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	if m.inserts++; m.inserts%4096 == 0 {
		for k, v := range m.routes {
			if now.After(v.expiry) {
				delete(m.routes, k)
			}
		}
	}
	m.routes[id] = memoryRoute{r, now.Add(ttl)}
	return nil
}

func (m *memoryRoutes) lookup(_ context.Context, id string) (responseRoute, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.routes[id]
	if !ok || time.Now().After(v.expiry) {
		return responseRoute{}, false, nil
	}
	return v.responseRoute, true, nil
}

// redisRoutes keeps them in Redis, one key per response id.
type redisRoutes struct {
	client redis.UniversalClient
	prefix string
}

func (r *redisRoutes) remember(ctx context.Context, id string, rt responseRoute, ttl time.Duration) error {
	return r.client.Set(ctx, r.prefix+"resp:"+id, rt.String(), ttl).Err()
}

func (r *redisRoutes) lookup(ctx context.Context, id string) (responseRoute, bool, error) {
	s, err := r.client.Get(ctx, r.prefix+"resp:"+id).Result()
	if err == redis.Nil {
		return responseRoute{}, false, nil
	}
	if err != nil {
		return responseRoute{}, false, err
	}
	rt, ok := parseResponseRoute(s)
	return rt, ok, nil
}

// provisionResponseRoutes sets up where routes are kept.
func (h *Handler) provisionResponseRoutes() error {
	if h.ResponseTTL == 0 {
		h.ResponseTTL = caddy.Duration(defaultResponseTTL)
	}
	if h.redis != nil {
		h.responses = &redisRoutes{client: h.redis.Client(), prefix: h.redisPrefix()}
		return nil
	}
	m, err := share(h, responsePool, h.upstreamSet(), plain(&memoryRoutes{routes: map[string]memoryRoute{}}))
	h.responses = m
	return err
}

// followUp pins a Responses API follow-up to the upstream and key that
// produced its previous response, when known and still configured.
func (h *Handler) followUp(x *exchange) *pin {
	if x.in.previousResponse == "" || h.responses == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(x.r.Context(), time.Second)
	defer cancel()
	rt, ok, err := h.responses.lookup(ctx, x.in.previousResponse)
	if err != nil {
		h.logger.Warn("looking up a previous response failed; routing as usual", zap.Error(err))
	}
	if !ok {
		return nil
	}
	for _, u := range x.cands {
		if u.URL != rt.upstream {
			continue
		}
		for _, k := range u.keys {
			if k.id == rt.key {
				return &pin{up: u, key: k}
			}
		}
	}
	return nil
}

// rememberResponse records where a Responses API answer was produced.
func (h *Handler) rememberResponse(x *exchange, snap relaySnapshot) {
	if h.responses == nil || x.at.up == nil || x.at.key == nil || snap.answerID == "" ||
		x.last.cached || x.last.code != http.StatusOK || !strings.HasSuffix(x.r.URL.Path, "/responses") {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	rt := responseRoute{upstream: x.at.up.URL, key: x.at.key.id}
	if err := h.responses.remember(ctx, snap.answerID, rt, time.Duration(h.ResponseTTL)); err != nil {
		h.logger.Warn("remembering a response's upstream failed", zap.Error(err))
	}
}
