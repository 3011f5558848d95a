package llmstream

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
)

// The attempt stage: try the upstreams in the plan's order, failing over
// while the client has seen nothing of an answer, relay the one that
// answers, and end the exchange cleanly when none does.

// maxErrorBody bounds how much of an upstream error body is read (and
// scrubbed) before it is passed on.
const maxErrorBody = 1 << 20

// authRest is how long a key answered with 401 or 403 rests.
const authRest = 10 * time.Minute

// failure is how an attempt failed before any of its answer reached the
// client; `retry_on` names them.
type failure string

const (
	failConnect failure = "connect" // unreachable, or broke before its first event
	failTimeout failure = "timeout" // first_byte_timeout or first_token_timeout
	failStatus  failure = "status"  // an error status (see attemptResult.status)
)

// attemptResult is how one attempt ended.
type attemptResult struct {
	done       bool    // the client got its answer (or left): nothing more to do
	complete   bool    // the upstream finished its answer
	code       int     // the status the client got, when done
	outcome    failure // why it failed, when not done
	err        error
	status     int
	header     http.Header
	body       []byte // scrubbed error body
	retryAfter time.Duration
	cached     bool // answered from the response cache
	stopped    bool // stopped by stop_endpoint or a WebSocket stop message
}

// attempt runs the attempt stage: a stored answer or a cache flight when
// the cache serves one, else the upstreams one after another.
func (h *Handler) attempt(x *exchange) {
	p := h.newPlan(x.cands, x.conv)
	p.pin(h.followUp(x))
	switchKey := false
	if x.cache.serving() {
		x.last = h.replay(x.r, x.in, x.rl, x.cache)
	}
	for n := 0; n <= *h.Retries && !x.last.done && !stopped(x.r); n++ {
		x.at = p.next(switchKey)
		if n > 0 && x.at.reused && !h.backoff(x.r.Context(), n, x.last.retryAfter) {
			break // the client left while we waited
		}
		x.last = h.try(x.r, x.in, x.rl, x.at)
		if x.last.done {
			break
		}
		h.record(x.at, &x.last, n)
		if !h.retryable(&x.last, x.cands, x.at) || n == *h.Retries {
			break
		}
		switchKey = x.last.status == http.StatusTooManyRequests || x.last.status == 401 || x.last.status == 403
		metrics.retries.WithLabelValues(x.at.up.URL).Inc()
		if !switchKey && len(x.cands) > 1 {
			metrics.failovers.WithLabelValues(x.at.up.URL).Inc()
		}
	}
	if p.sticky && x.at.up != nil {
		if p.firstChoice(x.cands, x.at) {
			metrics.affinityHit.Inc()
		} else {
			metrics.affinityMoved.Inc()
		}
	}
	if stopped(x.r) {
		x.last.stopped = true // also when a flight's followers had the upstream finish
	}
	switch {
	case x.wasStopped():
		x.rl.stop()
		x.rl.endStopped(x.r.URL.Path, x.in.stream)
		metrics.stops.Inc()
		x.last.done = true
		if x.last.code == 0 {
			x.last.code = 499
			if x.in.stream {
				x.last.code = http.StatusOK
			}
		}
	case !x.last.done:
		h.finalFailure(x.w, x.r, x.rl, &x.last)
	}
}

// wasStopped reports whether the generation was stopped before its answer
// completed.
func (x *exchange) wasStopped() bool { return x.last.stopped && !x.last.complete }

// try runs one attempt: the upstream request and, when it answers, the
// relay of the answer.
func (h *Handler) try(r *http.Request, in *inbound, rl *relay, at attempt) attemptResult {
	ctx, cancel, detached, end := h.attemptContext(r, in, rl)
	defer end()
	rl.setAttempt(cancel)
	resp, err := h.send(ctx, r, in, at, cancel)
	if err != nil {
		return sendFailure(ctx, r, err)
	}
	defer resp.Body.Close()
	return h.answer(ctx, r, in, rl, at, resp, detached)
}

// send builds the attempt's upstream request and sends it, waiting at most
// first_byte_timeout for the response headers.
func (h *Handler) send(ctx context.Context, r *http.Request, in *inbound, at attempt, cancel context.CancelCauseFunc) (*http.Response, error) {
	req, err := h.newUpstreamRequest(ctx, r, in, at.up, at.key)
	if err != nil {
		return nil, err
	}
	return h.roundTrip(at.up, req, cancel)
}

// sendFailure is the result of an attempt whose upstream request failed
// before any response headers.
func sendFailure(ctx context.Context, r *http.Request, err error) attemptResult {
	switch {
	case errors.Is(context.Cause(ctx), errStopped):
		return attemptResult{done: true, stopped: true}
	case r.Context().Err() != nil:
		return attemptResult{done: true, code: 499}
	case errors.Is(err, errFirstByteTimeout):
		return attemptResult{outcome: failTimeout, err: err}
	}
	return attemptResult{outcome: failConnect, err: err}
}

// answer handles the upstream's response to an attempt: an error status
// is kept for failover, an answer relayed to the client.
func (h *Handler) answer(ctx context.Context, r *http.Request, in *inbound, rl *relay, at attempt, resp *http.Response, detached bool) attemptResult {
	if resp.StatusCode >= 400 {
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return attemptResult{
			outcome:    failStatus,
			status:     resp.StatusCode,
			header:     resp.Header,
			body:       h.secrets.scrub(raw),
			retryAfter: parseRetryAfter(resp.Header.Get("Retry-After")),
		}
	}

	body, err := decodedBody(resp)
	if err != nil {
		return attemptResult{outcome: failConnect, err: err}
	}
	rl.begin(resp, in.stream)
	out := rl.copyBody(body, detached)
	fields := func() []zap.Field {
		return []zap.Field{
			zap.String("upstream", at.up.URL),
			zap.String("key", at.key.id),
			zap.Int("status", resp.StatusCode),
			zap.Int64("bytes", out.bytes),
			zap.Duration("duration", rl.since()-rl.attemptStart),
		}
	}
	if errors.Is(context.Cause(ctx), errStopped) && out.err != nil {
		// Stopped: the deferred cancel has stopped the upstream; the
		// caller ends the answer cleanly.
		if c := h.logger.Check(zap.DebugLevel, "generation stopped"); c != nil {
			c.Write(fields()...)
		}
		return attemptResult{done: true, stopped: true, code: resp.StatusCode}
	}
	if res, ok := rl.ending(out, r.Context(), resp.StatusCode); ok {
		if res.complete {
			h.state.succeeded(at.up)
		}
		if c := h.logger.Check(zap.DebugLevel, res.describe()); c != nil {
			c.Write(fields()...)
		}
		return res
	}
	// The upstream broke.
	cause := context.Cause(ctx)
	if cause == nil || errors.Is(cause, context.Canceled) {
		cause = out.err
	}
	if rl.canFailOver() {
		// Only comments reached the client: another attempt can still
		// answer it without it noticing.
		outcome := failConnect
		if errors.Is(cause, errFirstTokenTimeout) || errors.Is(cause, errIdleTimeout) {
			outcome = failTimeout
		}
		return attemptResult{outcome: outcome, err: cause}
	}
	h.state.failed(at.up, time.Now())
	h.logger.Warn("upstream stream broke", append(fields(), zap.String("error", h.secrets.scrubString(cause.Error())))...)
	return rl.broken(cause, resp.StatusCode)
}

// ending turns the endings every relayed answer shares — complete, the
// client gone, a forbidden word — into the attempt's result. It reports
// false for a broken answer, which the caller handles.
func (rl *relay) ending(out outcome, client context.Context, code int) (attemptResult, bool) {
	switch {
	case out.err == nil:
		return attemptResult{done: true, complete: true, code: code}, true
	case out.clientGone || client.Err() != nil:
		// The client left: the caller's cancel stops the upstream.
		metrics.disconnects.Inc()
		return attemptResult{done: true, code: 499}, true
	case errors.Is(out.err, errDenied):
		// A forbidden word: what was held back is dropped and the answer
		// ends with the filter's error.
		if c := rl.failDenied(); c != 0 {
			code = c
		}
		return attemptResult{done: true, code: code}, true
	}
	return attemptResult{}, false
}

// broken ends an answer whose upstream broke after some of it reached the
// client: a final error event or line, or an aborted connection for a plain
// body, which must not look complete.
func (rl *relay) broken(cause error, code int) attemptResult {
	if !rl.fail(brokenStreamError(cause)) {
		panic(http.ErrAbortHandler)
	}
	return attemptResult{done: true, code: code}
}

// describe names a finished attempt in the debug log.
func (res *attemptResult) describe() string {
	switch {
	case res.complete:
		return "relayed"
	case res.code == 499:
		return "client disconnected"
	}
	return "answer denied"
}

// attemptContext is the context one attempt's upstream request runs in.
// Normally it ends with the client's request. With on_disconnect drain, or
// while other requests share this answer (a cache flight), it is detached
// from it: the answer is read on after the client left, for at most
// drain_max, only to capture usage; and for as long as a follower needs
// it. A stop ends it at once, or, when followers share the answer, ends
// only the stopper's part. end must be called when the attempt is over.
func (h *Handler) attemptContext(r *http.Request, in *inbound, rl *relay) (ctx context.Context, cancel context.CancelCauseFunc, detached bool, end func()) {
	drain, shared := h.OnDisconnect == "drain", rl.tee != nil
	if !drain && !shared {
		ctx, cancel = context.WithCancelCause(r.Context())
		return ctx, cancel, false, func() { cancel(nil) }
	}
	ctx, cancel = context.WithCancelCause(context.WithoutCancel(r.Context()))
	var mu sync.Mutex
	var drainTimer *time.Timer
	finished := false
	leave := func() {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case finished:
		case drain:
			drainTimer = time.AfterFunc(time.Duration(h.DrainMax), func() { cancel(errDrainTimeout) })
		default:
			cancel(errClientGone)
		}
	}
	stop := context.AfterFunc(r.Context(), func() {
		switch {
		case stopped(r) && shared:
			// A stop ends only the stopper's answer: it gets its clean
			// end now, and the upstream goes on for the requests that
			// joined the flight (it is cancelled when none is left).
			rl.endStopped(r.URL.Path, in.stream)
			rl.tee.LeaderLeft(func() { cancel(errStopped) })
		case stopped(r):
			cancel(errStopped) // a stop ends the upstream at once
		case shared:
			rl.tee.LeaderLeft(leave) // once no follower needs the answer
		default:
			leave()
		}
	})
	return ctx, cancel, true, func() {
		stop()
		mu.Lock()
		finished = true
		if drainTimer != nil {
			drainTimer.Stop()
		}
		mu.Unlock()
		cancel(nil)
	}
}

// record logs a failed attempt and updates upstream health and key rests.
func (h *Handler) record(at attempt, res *attemptResult, n int) {
	now := time.Now()
	switch {
	case res.status == http.StatusTooManyRequests:
		rest := res.retryAfter
		if rest <= 0 {
			rest = time.Duration(h.RetryBackoffMax)
		}
		h.state.rest(at.key, now.Add(rest))
	case res.status == 401 || res.status == 403:
		h.state.rest(at.key, now.Add(authRest))
	case res.outcome != failStatus || res.status >= 500:
		h.state.failed(at.up, now)
	}
	fields := []zap.Field{
		zap.Int("attempt", n+1),
		zap.String("upstream", at.up.URL),
		zap.String("key", at.key.id),
		zap.String("outcome", string(res.outcome)),
	}
	if res.status != 0 {
		fields = append(fields, zap.Int("status", res.status))
	}
	if res.err != nil {
		fields = append(fields, zap.String("error", h.secrets.scrubString(res.err.Error())))
	}
	h.logger.Warn("upstream attempt failed", fields...)
}

// retryable reports whether the outcome may be retried on another attempt.
func (h *Handler) retryable(res *attemptResult, cands []*Upstream, at attempt) bool {
	if res.outcome != failStatus {
		return h.retryOn[string(res.outcome)]
	}
	if h.retryOn[strconv.Itoa(res.status)] {
		return true
	}
	// A rejected key is worth retrying only with another key.
	return (res.status == 401 || res.status == 403) && (len(cands) > 1 || len(at.up.keys) > 1)
}

// backoff waits before an attempt that reuses a key: exponential with full
// jitter, or the upstream's Retry-After when longer, both capped at the
// maximum. It reports false when the client left meanwhile.
func (h *Handler) backoff(ctx context.Context, n int, retryAfter time.Duration) bool {
	ceil := time.Duration(h.RetryBackoff) << min(n-1, 20)
	maxWait := time.Duration(h.RetryBackoffMax)
	ceil = min(ceil, maxWait)
	wait := time.Duration(rand.Int64N(int64(ceil) + 1))
	if retryAfter > wait {
		wait = min(retryAfter, maxWait)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// finalFailure answers with the last attempt's failure: the upstream's own
// error status and body when it sent one, else 502/504.
func (h *Handler) finalFailure(w http.ResponseWriter, r *http.Request, rl *relay, last *attemptResult) {
	rl.stop()
	if r.Context().Err() != nil {
		return // the client left; nobody to answer
	}
	committed := rl.isCommitted()
	if last.outcome == failStatus {
		if committed {
			rl.fail(upstreamStatusError(last.status, last.body))
			return
		}
		hdr := w.Header()
		copyResponseHeaders(hdr, last.header)
		hdr.Del("Content-Encoding")
		hdr.Set("Content-Length", strconv.Itoa(len(last.body)))
		w.WriteHeader(last.status)
		_, _ = w.Write(last.body)
		return
	}
	e := h.upstreamFailure(last.err)
	if committed {
		rl.fail(e) // heartbeats already started an event stream
		return
	}
	e.write(w)
}

// parseRetryAfter reads Retry-After in seconds or as an HTTP date.
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return time.Until(t)
	}
	return 0
}

// upstreamStatusError turns an upstream error answer into an in-band error,
// keeping the upstream's own message, type and code when it used the OpenAI
// (or Anthropic) error shape.
func upstreamStatusError(status int, body []byte) *apiError {
	e := &apiError{Status: status, Type: typeUpstream, Code: "upstream_status_" + strconv.Itoa(status),
		Message: "the upstream answered " + strconv.Itoa(status) + " " + http.StatusText(status)}
	var shaped struct {
		Error struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    any    `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &shaped) == nil && shaped.Error.Message != "" {
		e.Message = shaped.Error.Message
		if shaped.Error.Type != "" {
			e.Type = shaped.Error.Type
		}
		if c, ok := shaped.Error.Code.(string); ok && c != "" {
			e.Code = c
		}
	}
	return e
}
