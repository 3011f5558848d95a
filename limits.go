package llmstream

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
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

	// US dollars per SpendWindow, from what each answer cost at the
	// configured prices (`price`, `prices_file`). At admission the most a
	// request may cost is reserved (its prompt at the input price and its
	// max_tokens, or 4096 tokens, at the output price); a request that
	// cannot fit gets 402 `spend_limit_exceeded`; the reservation is
	// replaced by the real cost at the end, and lapses with the request's
	// lease if its instance dies. A model without a price is refused (403
	// `model_not_priced`) while a spend limit applies.
	Spend       float64        `json:"spend,omitempty"`
	SpendWindow caddy.Duration `json:"spend_window,omitempty"`

	// With `store redis`, the lease of what an instance holds (its
	// requests' concurrency slots and spend reservations): the instance
	// renews it every third of this while it holds any, so what an instance
	// that crashed or was killed held is free within this time. Default:
	// 30s.
	SlotLease caddy.Duration `json:"slot_lease,omitempty"`
}

// defaultSlotLease is how long a concurrency slot outlives an instance
// that died holding it.
const defaultSlotLease = 30 * time.Second

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
	if (l.Requests > 0 && l.RequestWindow <= 0) || (l.Tokens > 0 && l.TokenWindow <= 0) || (l.Spend > 0 && l.SpendWindow <= 0) {
		return errors.New("limit: a request, token or spend cap needs a window")
	}
	if l.Spend > 0 && h.prices == nil {
		return errors.New("limit spend: no prices configured (price or prices_file)")
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
		Spend: int64(math.Round(l.Spend * nanoUSD)), SpendWindow: time.Duration(l.SpendWindow),
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
}

// reserve is the stage that claims what the limits allow: a request slot,
// the tokens the request may need (nothing for an answer from the cache)
// and a concurrency slot, settled in finish. It then registers the
// generation with stop_endpoint.
func (h *Handler) reserve(x *exchange) bool {
	tokens := x.in.tokenEstimate()
	var spend int64
	if h.limits.Spend > 0 && x.in.model != "" { // no model (a models list): nothing to pay
		var ok bool
		if spend, ok = h.spendReserve(x); !ok {
			h.cacheAbandon(x.cache)
			_ = h.reject(x.w, x.in.model, errNotPriced(x.in.model))
			return false
		}
	}
	if x.cache.serving() {
		tokens, spend = 0, 0 // a cached answer costs nothing
	}
	ad, aerr := h.admitLimits(x.r.Context(), x.identity, tokens, spend)
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
func (h *Handler) admitLimits(ctx context.Context, identity string, reserve, spend int64) (*admission, *apiError) {
	if h.store == nil {
		return &admission{skipped: true}, nil
	}
	ad := &admission{a: store.Admission{
		ID:      identity,
		Reserve: reserve,
		Spend:   spend,
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
		if d.Limit == "spend" {
			e.Status, e.Type = http.StatusPaymentRequired, "insufficient_quota"
			e.Message = fmt.Sprintf("spend limit of $%g reached for %s", float64(h.limits.Spend)/nanoUSD, identity)
			if spend > h.limits.Spend {
				e.Message = fmt.Sprintf("this request may cost up to $%g, more than the spend limit of $%g", float64(spend)/nanoUSD, float64(h.limits.Spend)/nanoUSD)
			}
		}
		e.retryAfter = d.RetryAfter
		return nil, e
	}
	h.inflight.Add(1)
	return ad, nil
}

// spendReserve is the most a request may cost on any upstream that may
// answer it: its prompt (size / 3) at the input price, its max_tokens (or
// defaultAnswerReserve) at the output price. It reports false when one of
// them has no price.
func (h *Handler) spendReserve(x *exchange) (int64, bool) {
	answer := x.in.maxTokens
	if answer == 0 {
		answer = defaultAnswerReserve
	}
	prompt := int64(len(x.in.body)) / 3
	if len(x.cands) == 0 {
		r, ok := h.prices.lookup(x.in.model, "")
		return r.estimate(prompt, answer), ok
	}
	var most int64
	for _, up := range x.cands {
		r, ok := h.prices.lookup(up.upstreamModel(x.in.model), x.in.model)
		if !ok {
			return 0, false
		}
		most = max(most, r.estimate(prompt, answer))
	}
	return most, true
}

// rateOf is the price of the answer's model: as sent upstream (after a
// rename), else as asked for.
func (h *Handler) rateOf(x *exchange) (rate, bool) {
	if x.at.up != nil {
		return h.prices.lookup(x.at.up.upstreamModel(x.in.model), x.in.model)
	}
	return h.prices.lookup(x.in.model, "")
}

// settle releases the slot and the spend reservation, corrects the token
// reservation with the real usage and adds the real cost to the spend.
// Usage that could not be read keeps its reservation: it is never
// refunded as zero.
func (h *Handler) settle(ad *admission, u *usage, cost int64) {
	if ad == nil || ad.skipped {
		return
	}
	defer h.inflight.Done()
	var delta int64
	switch u.status {
	case usageCached:
	case usageAbsent:
		cost = ad.a.Spend
	default:
		delta = u.total() - ad.a.Reserve
	}
	// Not the request's context: the client may be gone. The Redis
	// client's own timeouts bound the wait.
	if err := h.store.Settle(context.Background(), h.limits, ad.a, delta, cost); err != nil {
		h.logger.Error("settling limits failed", zap.String("identity", ad.a.ID), zap.Error(err))
	}
}
