package llmstream

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/store"
)

// Limits caps what each identity may use.
type Limits struct {
	// Requests per RequestWindow (a sliding window).
	Requests      int64          `json:"requests,omitempty"`
	RequestWindow caddy.Duration `json:"request_window,omitempty"`

	// Prompt plus completion tokens per TokenWindow, from the real usage
	// the upstream reports. At admission an estimate (request size / 3 plus
	// `max_tokens` when given) is reserved; a request that cannot fit is
	// refused; the reservation is corrected with the real usage at the end.
	Tokens      int64          `json:"tokens,omitempty"`
	TokenWindow caddy.Duration `json:"token_window,omitempty"`

	// Open requests (streams) at once. A slot is held until the answer
	// really ended.
	Concurrent int64 `json:"concurrent,omitempty"`
}

// StoreConfig says where limit state lives.
type StoreConfig struct {
	// Address of a Redis server (`host:port`) shared by all instances.
	Redis string `json:"redis,omitempty"`

	// Redis database number. Default: 0.
	DB int `json:"db,omitempty"`

	// Redis password; placeholders such as `{env.REDIS_PASSWORD}` allowed.
	Password string `json:"password,omitempty"`

	// Prefix of every key this module writes. Default: `llm_stream:`.
	Prefix string `json:"prefix,omitempty"`

	// When Redis cannot be reached: false (the default) refuses requests
	// with 503 (fail closed); true admits them without limits (fail open).
	// Either way it is logged.
	FailOpen bool `json:"fail_open,omitempty"`
}

// slotTTL reclaims concurrency slots of an instance that died mid-stream.
const slotTTL = time.Hour

var slotSeq atomic.Uint64

func (h *Handler) provisionLimits() error {
	if h.OnDisconnect == "" {
		h.OnDisconnect = "cancel"
	}
	if h.DrainMax == 0 {
		h.DrainMax = caddy.Duration(30 * time.Second)
	}
	if h.Store != nil && h.Store.Redis != "" && (h.Limit != nil || h.StopEndpoint != "" || (h.Cache != nil && h.Cache.Store == "redis")) {
		pw, err := resolveSecret(h.Store.Password)
		if err != nil {
			return fmt.Errorf("store: password: %w", err)
		}
		h.redis = store.NewRedis(h.Store.Redis, h.Store.DB, pw, h.redisPrefix())
	}
	if h.Limit == nil {
		return nil
	}
	l := h.Limit
	if (l.Requests > 0 && l.RequestWindow <= 0) || (l.Tokens > 0 && l.TokenWindow <= 0) {
		return errors.New("limit: a request or token cap needs a window")
	}
	h.limits = store.Limits{
		Requests: l.Requests, RequestWindow: time.Duration(l.RequestWindow),
		Tokens: l.Tokens, TokenWindow: time.Duration(l.TokenWindow),
		Concurrent: l.Concurrent, SlotTTL: slotTTL,
	}
	if h.redis != nil {
		h.store = h.redis
	} else {
		h.store = store.NewMemory()
	}
	return nil
}

// redisPrefix is the prefix of every Redis key this module writes.
func (h *Handler) redisPrefix() string {
	if h.Store != nil && h.Store.Prefix != "" {
		return h.Store.Prefix
	}
	return "llm_stream:"
}

// admission is an admitted request's claim on the limits, settled at the
// end.
type admission struct {
	a       store.Admission
	skipped bool // nothing recorded (no limits, or fail-open)
}

// admit checks the limits for one request. A refusal is returned as the
// error to send.
func (h *Handler) admit(ctx context.Context, identity string, reserve int64) (*admission, *apiError) {
	if h.store == nil {
		return &admission{skipped: true}, nil
	}
	ad := &admission{a: store.Admission{
		ID:      identity,
		Reserve: reserve,
		Slot:    strconv.FormatUint(slotSeq.Add(1), 36) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36),
		Now:     time.Now(),
	}}
	d, err := h.store.Admit(ctx, h.limits, ad.a)
	if err != nil {
		h.logger.Error("limit store unavailable", zap.Bool("fail_open", h.Store != nil && h.Store.FailOpen), zap.Error(err))
		if h.Store != nil && h.Store.FailOpen {
			return &admission{skipped: true}, nil
		}
		return nil, &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "limiter_unavailable",
			Message: "the rate limiter is unavailable; try again later"}
	}
	if !d.Allowed {
		metrics.limitRejects.WithLabelValues(d.Limit).Inc()
		msg := fmt.Sprintf("%s limit reached for %s", d.Limit, identity)
		if d.Limit == "tokens" && reserve > h.limits.Tokens {
			msg = fmt.Sprintf("this request may need %d tokens, more than the limit of %d", reserve, h.limits.Tokens)
		}
		e := &apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_exceeded", Code: d.Limit + "_limit_exceeded", Message: msg}
		e.retryAfter = d.RetryAfter
		return nil, e
	}
	h.inflight.Add(1)
	return ad, nil
}

// settle releases the slot and corrects the token reservation with the
// real usage. Usage that could not be read keeps its reservation: it is
// never refunded as zero.
func (h *Handler) settle(ad *admission, u *usage) {
	if ad == nil || ad.skipped {
		return
	}
	defer h.inflight.Done()
	var delta int64
	if u.status != usageAbsent && u.status != usageCached {
		delta = u.total() - ad.a.Reserve
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := h.store.Settle(ctx, h.limits, ad.a, delta); err != nil {
		h.logger.Error("settling limits failed", zap.String("identity", ad.a.ID), zap.Error(err))
	}
}
