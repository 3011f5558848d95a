package llmstream

import (
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// exchange is one request on its way through the pipeline: what each stage
// learned, for the stages after it.
type exchange struct {
	w     http.ResponseWriter
	r     *http.Request
	start time.Time
	id    string // the handler's request id (X-Request-Id)

	// admit
	identity string // who calls: a client key's name, an identity, or ip:<client address>
	owner    string // who may stop this generation ("" on an open endpoint)

	// inspect
	in     *inbound // the body, read once
	prompt string   // its text, for deny words and prompt logs

	// route, cache, reserve
	asked     string // the model asked for, when a route rule chose another
	cands     []*Upstream
	conv      uint64 // the conversation's hash, with key_affinity (0: none)
	cache     *cacheState
	hideUsage bool       // the include_usage chunk is asked for and hidden from the client
	admission *admission // the claim on the limits, settled in finish
	release   func()     // ends the stop_endpoint registration

	// finish
	cost   int64 // what the answer cost, in nano-dollars
	priced bool  // its model has a price

	// attempt and relay
	rl   *relay
	at   attempt       // the last attempt
	last attemptResult // how it ended

	// finish
	usage *usage
}

// ServeHTTP proxies one request through the pipeline: admit the caller,
// inspect the body (read once), route it to the upstreams serving its
// model, consult the cache, reserve what the limits allow, attempt the
// upstreams (failing over while the client has seen nothing of an answer)
// relaying the answer as it arrives, and finish: usage, limits, metrics
// and logs. A stage that answers the request itself returns false.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	x := &exchange{w: w, r: r, start: time.Now(), id: requestID(r), usage: new(usage)}
	w.Header().Set(headerRequestID, x.id)
	if !h.admit(x) || !h.inspect(x) || !h.route(x) {
		return nil
	}
	h.consultCache(x)
	x.requestUsage()
	if !h.reserve(x) {
		return nil
	}
	defer x.release()
	h.openRelay(x)
	defer x.rl.stop()
	metrics.openStreams.Inc()
	defer metrics.openStreams.Dec()
	h.attempt(x)
	h.finish(x)
	return nil
}

// reject answers a request refused before any upstream was tried.
func (h *Handler) reject(w http.ResponseWriter, model string, e *apiError) error {
	e.write(w)
	metrics.requests.WithLabelValues(h.modelLabel(model), "", strconv.Itoa(e.Status)).Inc()
	return nil
}
