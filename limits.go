package llmstream

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
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

	// The lease of a concurrency slot: the instance holding it renews it
	// every third of this while the stream lives, so the slot of an
	// instance that crashed or was killed is free within this time.
	// Default: 30s.
	SlotLease caddy.Duration `json:"slot_lease,omitempty"`
}

// defaultSlotLease is how long a concurrency slot outlives an instance
// that died holding it.
const defaultSlotLease = 30 * time.Second

var slotSeq atomic.Uint64

func (h *Handler) provisionLimits() error {
	if h.OnDisconnect == "" {
		h.OnDisconnect = "cancel"
	}
	if h.DrainMax == 0 {
		h.DrainMax = caddy.Duration(30 * time.Second)
	}
	if h.Limit == nil {
		return nil
	}
	l := h.Limit
	if (l.Requests > 0 && l.RequestWindow <= 0) || (l.Tokens > 0 && l.TokenWindow <= 0) {
		return errors.New("limit: a request or token cap needs a window")
	}
	if l.SlotLease == 0 {
		l.SlotLease = caddy.Duration(defaultSlotLease)
	}
	if l.SlotLease < caddy.Duration(time.Second) {
		return errors.New("limit: slot_lease must be at least 1s")
	}
	h.limits = store.Limits{
		Requests: l.Requests, RequestWindow: time.Duration(l.RequestWindow),
		Tokens: l.Tokens, TokenWindow: time.Duration(l.TokenWindow),
		Concurrent: l.Concurrent, SlotTTL: time.Duration(l.SlotLease),
	}
	if h.redis != nil {
		h.store = h.redis
		return nil
	}
	// In memory: counters (per limit definition) and slots (per upstream
	// set) outlive a reload (state.go).
	set := h.upstreamSet()
	slots, err := share(h, slotPool, set, plain(store.NewSlots()))
	if err != nil {
		return err
	}
	h.store, err = share(h, limitPool, limitKey(l, set), func() (*store.Memory, func() error, error) {
		return store.NewMemoryWithSlots(slots), nil, nil
	})
	return err
}

// admission is an admitted request's claim on the limits, settled at the
// end.
type admission struct {
	a       store.Admission
	skipped bool // nothing recorded (no limits, or fail-open)
	lease   *time.Timer
	mu      sync.Mutex
	settled bool
}

// reserve is the stage that claims what the limits allow: a request slot,
// the tokens the request may need (nothing for an answer from the cache)
// and a concurrency slot, settled in finish. It then registers the
// generation with stop_endpoint.
func (h *Handler) reserve(x *exchange) bool {
	tokens := x.in.tokenEstimate()
	if x.cache.serving() {
		tokens = 0 // a cached answer costs no tokens
	}
	ad, aerr := h.admitLimits(x.r.Context(), x.identity, tokens)
	if aerr != nil {
		h.cacheAbandon(x.cache)
		_ = h.reject(x.w, x.in.model, aerr)
		return false
	}
	x.admission = ad
	x.r, x.release = h.stoppable(x.r, x.id, x.owner)
	return true
}

// admitLimits checks the limits for one request. A refusal is returned as
// the error to send.
func (h *Handler) admitLimits(ctx context.Context, identity string, reserve int64) (*admission, *apiError) {
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
	if h.limits.Concurrent > 0 {
		h.renewLease(ad)
	}
	return ad, nil
}

// renewLease keeps an admitted request's concurrency slot while it lives:
// every third of the lease the slot's expiry moves a lease ahead, so a
// crashed instance's slots expire within one lease.
func (h *Handler) renewLease(ad *admission) {
	lease := h.limits.SlotTTL
	ad.mu.Lock() // the callback reads ad.lease under it
	defer ad.mu.Unlock()
	ad.lease = time.AfterFunc(lease/3, func() {
		ctx, cancel := context.WithTimeout(context.Background(), lease/3)
		err := h.store.Renew(ctx, h.limits, ad.a, time.Now().Add(lease))
		cancel()
		if err != nil {
			h.logger.Warn("renewing a concurrency slot failed", zap.String("identity", ad.a.ID), zap.Error(err))
		}
		ad.mu.Lock()
		defer ad.mu.Unlock()
		if !ad.settled {
			ad.lease.Reset(lease / 3)
		}
	})
}

// settle releases the slot and corrects the token reservation with the
// real usage. Usage that could not be read keeps its reservation: it is
// never refunded as zero.
func (h *Handler) settle(ad *admission, u *usage) {
	if ad == nil || ad.skipped {
		return
	}
	defer h.inflight.Done()
	ad.mu.Lock()
	ad.settled = true
	if ad.lease != nil {
		ad.lease.Stop()
	}
	ad.mu.Unlock()
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
