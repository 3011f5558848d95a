package llmstream

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// maxErrorBody bounds how much of an upstream error body is read (and
// scrubbed) before it is passed on.
const maxErrorBody = 1 << 20

// authRest is how long a key answered with 401 or 403 rests.
const authRest = 10 * time.Minute

// ServeHTTP proxies one request: read the body once, pick the upstreams
// that serve its model, try them (failing over while the client has seen
// nothing of an answer) and relay the answer as it arrives.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	start := time.Now()
	id := requestID(r)
	w.Header().Set(headerRequestID, id)
	// admit: who is calling, and may they reach this path?
	identity := h.identify(r)
	if h.authRequired() && identity == "" {
		return h.reject(w, "", &apiError{Status: http.StatusUnauthorized, Type: typeInvalidRequest, Code: "invalid_api_key",
			Message: "a valid API key is required (Authorization: Bearer <key> or x-api-key)"})
	}
	if !cleanRequestPath(r) {
		return h.reject(w, "", unknownURL(r))
	}
	owner := "" // who may stop this request's generation
	if h.authRequired() {
		owner = identity
	}
	if h.isStopPath(r.URL.Path) {
		return h.serveStop(w, r, owner)
	}
	if h.WebSocket != nil && h.forWebSocket(r) {
		return h.serveWebSocket(w, r)
	}
	if !h.pathAllowed(r) {
		return h.reject(w, "", unknownURL(r))
	}

	// inspect: the body, once
	in, aerr := readRequest(r, h.MaxRequestBody)
	if aerr != nil {
		return h.reject(w, "", aerr)
	}
	in.id = id
	if !h.modelAllowed(in.model) {
		return h.reject(w, in.model, &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "model_not_allowed",
			Message: "the model " + strconv.Quote(in.model) + " may not be used here"})
	}
	var prompt string
	if in.isJSON && (h.denyRequest || h.LogPrompts != "off") {
		prompt = requestText(in.body)
	}
	if h.denyRequest && h.deny.Contains(prompt) {
		metrics.denyWordBlocks.WithLabelValues("request").Inc()
		return h.reject(w, in.model, &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "content_filter",
			Message: "the request contains words that are not allowed here"})
	}
	if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/models") && len(h.router.names) > 0 {
		h.serveModels(w)
		return nil
	}

	// route
	cands := h.router.candidates(in.model)
	if len(cands) == 0 {
		return h.reject(w, in.model, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "model_not_found",
			Message: "the model " + strconv.Quote(in.model) + " is not served here"})
	}
	// cache: a stored answer, a live one to share, or a miss to store
	cs := h.cacheLookup(r, identity, in, cands)
	if cs != nil {
		w.Header().Set("X-Cache", cacheHeader(cs.result))
	}

	hideUsage := wantsUsageInjection(r.URL.Path, in)
	if hideUsage {
		// Ask for the usage chunk so usage is exact, and keep it from a
		// client that did not ask for it.
		in.body = withIncludeUsage(in.body)
	}
	reserve := in.tokenEstimate()
	if cs.serving() {
		reserve = 0 // a cached answer costs no tokens
	}
	ad, aerr := h.admit(r.Context(), identity, reserve)
	if aerr != nil {
		h.cacheAbandon(cs)
		return h.reject(w, in.model, aerr)
	}
	r, release := h.stoppable(r, id, owner)
	defer release()
	w = h.smoothing(w, r.Context())
	u := new(usage)
	rl := newRelay(w, h, in.stream)
	rl.paced = h.Smooth != nil
	rl.usage, rl.hideUsage, rl.model = u, hideUsage, h.modelLabel(in.model)
	if h.denyResponse {
		rl.deny = h.deny
	}
	if h.LogPrompts != "off" {
		rl.keepAnswer()
	}
	if len(h.AllowModels) > 0 && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/models") {
		rl.filterModels = h.filterModelList
	}
	if cs != nil && cs.lead != nil {
		rl.tee, rl.teeStart = cs.lead, time.Now()
	}
	defer rl.stop()
	metrics.openStreams.Inc()
	defer metrics.openStreams.Dec()

	// attempt and relay
	p := h.newPlan(cands, h.affinityValue(r.Header.Get, in.user))
	var last attemptResult
	var at attempt
	switchKey := false
	if cs.serving() {
		last = h.replay(r, in, rl, cs)
	}
	for n := 0; n <= *h.Retries && !last.done && !stopped(r); n++ {
		at = p.next(switchKey)
		if n > 0 && at.reused && !h.backoff(r.Context(), n, last.retryAfter) {
			break // the client left while we waited
		}
		last = h.try(r, in, rl, at)
		if last.done {
			break
		}
		h.record(at, &last, n)
		if !h.retryable(&last, cands, at) || n == *h.Retries {
			break
		}
		switchKey = last.status == http.StatusTooManyRequests || last.status == 401 || last.status == 403
		metrics.retries.WithLabelValues(at.up.URL).Inc()
		if !switchKey && len(cands) > 1 {
			metrics.failovers.WithLabelValues(at.up.URL).Inc()
		}
	}
	wasStopped := stopped(r) && !last.complete
	if stopped(r) {
		last.stopped = true // also when a flight's followers had the upstream finish
	}
	switch {
	case wasStopped:
		rl.stop()
		rl.endStopped(r.URL.Path, in.stream)
		metrics.stops.Inc()
		last.done, last.stopped = true, true
		if last.code == 0 {
			last.code = 499
			if in.stream {
				last.code = http.StatusOK
			}
		}
	case !last.done:
		h.finalFailure(w, r, rl, &last)
	}

	// finish
	rl.stop()
	h.cacheFinish(cs, &last)
	metrics.interToken.merge(rl.model, &rl.gaps)
	u.finish(last.complete)
	if wasStopped {
		u.estimate(in, rl)
	}
	if last.cached && u.status != usageAbsent {
		u.status = usageCached
	}
	h.settle(ad, u)
	h.recordUsage(r, identity, in, at, &last, u, rl, start, cs)
	if rl.answer != nil {
		answer := rl.answer.String()
		if answer == "" && len(rl.jsonBuf) > 0 {
			answer = answerText(rl.jsonBuf)
		}
		h.logPrompt(identity, in.model, prompt, answer)
	}
	return nil
}

// reject answers a request refused before any upstream was tried.
func (h *Handler) reject(w http.ResponseWriter, model string, e *apiError) error {
	e.write(w)
	metrics.requests.WithLabelValues(h.modelLabel(model), "", strconv.Itoa(e.Status)).Inc()
	return nil
}

// attemptResult is how one attempt ended.
type attemptResult struct {
	done       bool   // the client got its answer (or left): nothing more to do
	complete   bool   // the upstream finished its answer
	code       int    // the status the client got, when done
	outcome    string // "connect", "timeout" or "status"
	err        error
	status     int
	header     http.Header
	body       []byte // scrubbed error body
	retryAfter time.Duration
	cached     bool // answered from the response cache
	stopped    bool // stopped by stop_endpoint or a WebSocket stop message
}

// try runs one attempt: the upstream request and, when it answers, the
// relay of the answer.
func (h *Handler) try(r *http.Request, in *inbound, rl *relay, at attempt) attemptResult {
	parent := r.Context()
	drain, shared := h.OnDisconnect == "drain", rl.tee != nil
	if drain || shared {
		// Keep reading after the client left: for at most drain_max, only
		// to capture usage; and for as long as other requests share this
		// answer (a cache flight).
		parent = context.WithoutCancel(parent)
	}
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	if drain || shared {
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
		defer func() {
			stop()
			mu.Lock()
			defer mu.Unlock()
			finished = true
			if drainTimer != nil {
				drainTimer.Stop()
			}
		}()
	}
	rl.setAttempt(cancel)

	req, err := h.newUpstreamRequest(ctx, r, in, at.up, at.key)
	if err != nil {
		return attemptResult{outcome: "connect", err: err}
	}
	resp, err := h.roundTrip(at.up, req, cancel)
	if err != nil {
		if errors.Is(context.Cause(ctx), errStopped) {
			return attemptResult{done: true, stopped: true}
		}
		if r.Context().Err() != nil {
			return attemptResult{done: true, code: 499}
		}
		if errors.Is(err, errFirstByteTimeout) {
			return attemptResult{outcome: "timeout", err: err}
		}
		return attemptResult{outcome: "connect", err: err}
	}
	defer resp.Body.Close()

	if resp.StatusCode >= 400 {
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return attemptResult{
			outcome:    "status",
			status:     resp.StatusCode,
			header:     resp.Header,
			body:       h.secrets.scrub(raw),
			retryAfter: parseRetryAfter(resp.Header.Get("Retry-After")),
		}
	}

	body, err := decodedBody(resp)
	if err != nil {
		return attemptResult{outcome: "connect", err: err}
	}
	rl.begin(resp, in.stream)
	start := rl.attemptStart
	out := rl.copyBody(body, drain || shared)
	fields := func() []zap.Field {
		return []zap.Field{
			zap.String("upstream", at.up.URL),
			zap.String("key", at.key.id),
			zap.Int("status", resp.StatusCode),
			zap.Int64("bytes", out.bytes),
			zap.Duration("duration", time.Since(start)),
		}
	}
	switch {
	case out.err == nil:
		h.state.succeeded(at.up)
		if c := h.logger.Check(zap.DebugLevel, "relayed"); c != nil {
			c.Write(fields()...)
		}
		return attemptResult{done: true, complete: true, code: resp.StatusCode}
	case errors.Is(context.Cause(ctx), errStopped):
		// Stopped: the deferred cancel has stopped the upstream; the
		// caller ends the answer cleanly.
		if c := h.logger.Check(zap.DebugLevel, "generation stopped"); c != nil {
			c.Write(fields()...)
		}
		return attemptResult{done: true, stopped: true, code: resp.StatusCode}
	case out.clientGone || r.Context().Err() != nil:
		// The client left: the deferred cancel stops the upstream now.
		metrics.disconnects.Inc()
		if c := h.logger.Check(zap.DebugLevel, "client disconnected"); c != nil {
			c.Write(fields()...)
		}
		return attemptResult{done: true, code: 499}
	}
	if errors.Is(out.err, errDenied) {
		// A forbidden word: what was held back is dropped, the stream
		// ends with the filter's error, and the deferred cancel stops the
		// upstream.
		code := resp.StatusCode
		if c := rl.failDenied(); c != 0 {
			code = c
		}
		return attemptResult{done: true, code: code}
	}
	cause := context.Cause(ctx)
	if cause == nil || errors.Is(cause, context.Canceled) {
		cause = out.err
	}
	if rl.canFailOver() {
		// Only comments reached the client: another attempt can still
		// answer it without it noticing.
		outcome := "connect"
		if errors.Is(cause, errFirstTokenTimeout) || errors.Is(cause, errIdleTimeout) {
			outcome = "timeout"
		}
		return attemptResult{outcome: outcome, err: cause}
	}
	h.state.failed(at.up, time.Now())
	h.logger.Warn("upstream stream broke", append(fields(), zap.String("error", h.secrets.scrubString(cause.Error())))...)
	if !rl.fail(brokenStreamError(cause)) {
		// A plain body cut short must not look complete.
		panic(http.ErrAbortHandler)
	}
	return attemptResult{done: true, code: resp.StatusCode}
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
	case res.outcome != "status" || res.status >= 500:
		h.state.failed(at.up, now)
	}
	fields := []zap.Field{
		zap.Int("attempt", n+1),
		zap.String("upstream", at.up.URL),
		zap.String("key", at.key.id),
		zap.String("outcome", res.outcome),
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
	if res.outcome != "status" {
		return h.retryOn[res.outcome]
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
	if last.outcome == "status" {
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

// serveModels answers GET /v1/models with the names configured in
// `models` (exact names) and `rename`.
func (h *Handler) serveModels(w http.ResponseWriter) {
	var names []string
	for _, n := range h.router.names {
		if h.modelAllowed(n) {
			names = append(names, n)
		}
	}
	writeModelList(w, names, "llm_stream", 0)
}

// writeModelList writes an OpenAI model list.
func writeModelList(w http.ResponseWriter, names []string, owner string, created int64) {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	list := struct {
		Object string  `json:"object"`
		Data   []model `json:"data"`
	}{Object: "list", Data: []model{}}
	for _, name := range names {
		list.Data = append(list.Data, model{ID: name, Object: "model", Created: created, OwnedBy: owner})
	}
	writeJSON(w, list)
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
