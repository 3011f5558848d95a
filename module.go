// Package llmstream is a Caddy HTTP handler that proxies requests to model
// APIs (OpenAI and compatible providers, Azure OpenAI, Anthropic, Gemini),
// injects the API key from the configuration and relays streamed answers to
// the client as they arrive, flushing after every upstream read.
package llmstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"sync"
	"time"

	"filippo.io/age"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cache"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/denyword"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/memo"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redact"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/stop"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/store"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults for the timeouts and limits; each is documented on its field.
const (
	defaultDialTimeout      = 10 * time.Second
	defaultFirstByteTimeout = 2 * time.Minute
	defaultIdleTimeout      = 5 * time.Minute
	defaultHeartbeat        = 15 * time.Second
	defaultMaxRequestBody   = 16 << 20
)

// Handler proxies requests to a model API and relays streamed answers
// (`text/event-stream`, `application/x-ndjson`, or any response to a request
// with `"stream": true`) to the client as they arrive. The upstream API key
// comes from the configuration and replaces whatever credential the client
// sent, so clients never see it.
type Handler struct {
	// Base URL of the model API, e.g. `https://api.openai.com`. The request's
	// path and query are appended to it (after the base URL's own path, so
	// `https://example.com/openai` + `/v1/models` is
	// `https://example.com/openai/v1/models`). Required.
	Upstream string `json:"upstream,omitempty"`

	// API key sent upstream as `Authorization: Bearer <key>`. Use a
	// placeholder such as `{env.OPENAI_API_KEY}` or `{file./run/secrets/key}`
	// so the secret never appears in the JSON config; it is resolved once at
	// provision time. The key is never logged (only a fingerprint) and is
	// scrubbed from anything the upstream sends back in an error. Optional:
	// local model servers may need none.
	APIKey string `json:"api_key,omitempty"`

	// Header operations applied to the upstream request (Caddy placeholders
	// allowed). Client credentials (`Authorization`, `Api-Key`, `X-Api-Key`,
	// `X-Goog-Api-Key`) and cookies are always removed first, and the API key
	// is set last, so these operations cannot override it.
	HeaderUp *headers.HeaderOps `json:"header_up,omitempty"`

	// How long to wait for a TCP connection to the upstream. Applies to the
	// default transport and to an `http` transport that sets no dial timeout
	// of its own. Default: 10s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// How long to wait for the upstream's response headers after the request
	// was sent. On expiry the client gets 504. Default: 2m.
	FirstByteTimeout caddy.Duration `json:"first_byte_timeout,omitempty"`

	// The longest silence allowed inside a response body. On expiry the
	// upstream request is cancelled and a stream ends with a final error
	// event. Default: 5m.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// While an event stream is silent for this long, a comment line
	// (`: keep-alive`) is sent to the client between events, so that proxies,
	// load balancers and CDNs with idle limits do not cut long pauses. It also
	// covers the wait for the upstream's response headers on requests with
	// `"stream": true`. A negative value turns heartbeats off. Default: 15s.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`

	// The largest request body accepted, in bytes; larger bodies get 413.
	// Default: 16 MiB.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`

	// The transport used to reach the upstreams: Caddy's `http` transport
	// module (`http.reverse_proxy.transport.http`), so its TLS, proxy,
	// HTTP-version and keep-alive options apply. Each upstream gets its own
	// instance, with TLS added for `https` upstreams and `dial_timeout` when
	// the block sets none. Default: the `http` transport.
	TransportRaw json.RawMessage `json:"transport,omitempty" caddy:"namespace=http.reverse_proxy.transport inline_key=protocol"`

	// Several upstreams, each with its provider style, keys, models,
	// renames, weight and priority. Use either this or `upstream` and
	// `api_key`.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// Further attempts after the first, on another key or upstream, while
	// no part of the answer has reached the client. Default: 2.
	Retries *int `json:"retries,omitempty"`

	// Which outcomes are retried: `connect` (the upstream could not be
	// reached, or broke before sending any event), `timeout`
	// (`first_byte_timeout` or `first_token_timeout`) and status codes.
	// Default: `connect timeout 429 500 502 503 504`. A 401 or 403 is also
	// retried, on another key or upstream, when there is one.
	RetryOn []string `json:"retry_on,omitempty"`

	// Base of the exponential backoff (with full jitter) before a retry that
	// reuses a key already tried in this request. Default: 200ms.
	RetryBackoff caddy.Duration `json:"retry_backoff,omitempty"`

	// The longest backoff; a Retry-After from the upstream is honoured up
	// to this. Default: 5s.
	RetryBackoffMax caddy.Duration `json:"retry_backoff_max,omitempty"`

	// Passive health: this many consecutive failures take an upstream out
	// of rotation for UnhealthyCooldown (it is still tried when nothing
	// else is left). Default: 3.
	UnhealthyAfter int `json:"unhealthy_after,omitempty"`

	// How long an unhealthy upstream stays out. Default: 30s.
	UnhealthyCooldown caddy.Duration `json:"unhealthy_cooldown,omitempty"`

	// A streamed answer that sends no data event within this time after its
	// headers counts as a failed attempt and fails over (comments such as
	// `: PROCESSING` do not count). Default: off, because reasoning models
	// may think for minutes.
	FirstTokenTimeout caddy.Duration `json:"first_token_timeout,omitempty"`

	// Keeps a conversation on one upstream and key while they are healthy
	// and not resting, so the provider's prompt cache (per key and
	// deployment) stays warm. The conversation is named by `auto` (the
	// body's `prompt_cache_key`, else `user` or `metadata.user_id`, else a
	// hash of the model, the system prompt and the first user turn),
	// `prompt_cache_key`, `user`, `prefix` (that hash only) or
	// `header:<name>`. The choice is rendezvous hashing: every instance
	// makes the same one, and adding or removing one of N keys moves about
	// 1/N of the conversations. Default: empty, keys rotate per request.
	KeyAffinity string `json:"key_affinity,omitempty"`

	// How long the upstream and key that produced a Responses API answer
	// are remembered, so that a follow-up naming it in
	// `previous_response_id` goes to the same provider account (in memory,
	// or with `store redis` for every instance). Default: 720h, as long as
	// providers keep stored responses.
	ResponseTTL caddy.Duration `json:"response_ttl,omitempty"`

	// Keys handed to clients, stored as SHA-256 digests. With any client
	// key (or `identity`) configured, requests without a valid credential
	// (`Authorization: Bearer <key>` or `x-api-key: <key>`) get 401.
	ClientKeys []ClientKey `json:"client_keys,omitempty"`

	// A file of client keys, one `<key-or-sha256:hex> <name>` a line (`#`
	// starts a comment). Read when the config loads, so a reload picks up
	// changes.
	ClientKeysFile string `json:"client_keys_file,omitempty"`

	// Who the caller is, from a placeholder such as `{http.auth.user.id}`
	// after `basic_auth` or `forward_auth`. An empty value gets 401. Use
	// either this or client keys.
	Identity string `json:"identity,omitempty"`

	// Per-identity limits. Without client keys or identity, callers are
	// limited per client address.
	Limit *Limits `json:"limit,omitempty"`

	// Rules that choose the model from what a request asks (content-aware
	// routing), applied to the models in RouteModels (default: every
	// request) before the normal routing takes the chosen model.
	Route *RouteRules `json:"route,omitempty"`

	// The model names the route rules apply to, e.g. `auto`. Default:
	// every request.
	RouteModels []string `json:"route_models,omitempty"`

	// What models cost, in US dollars per million tokens: the cost of each
	// answer goes to the usage line (`cost_usd`), the `{llm.cost_usd}`
	// placeholder and the cost counter, and counts against `limit spend`.
	// The first price whose model (or glob) matches applies; these come
	// before PricesFile.
	Prices []Price `json:"prices,omitempty"`

	// A price list in the widely used model_prices_and_context_window.json
	// format (model → input_cost_per_token, output_cost_per_token,
	// cache_read_input_token_cost, cache_creation_input_token_cost, in
	// dollars per token). Read when the config loads, so a reload picks up
	// changes.
	PricesFile string `json:"prices_file,omitempty"`

	// Models clients may ask for (names or globs); others get 403.
	// Default: any.
	AllowModels []string `json:"allow_models,omitempty"`

	// Request paths that may reach the upstream, matched like Caddy's `path`
	// matcher (case-insensitive; `/v1/chat/*` is a prefix, a `*` elsewhere
	// stays within one segment) on the cleaned path, which is also the path
	// forwarded. Others get 404, so the injected key cannot reach files,
	// fine-tuning or organisation endpoints; so do paths with a NUL, a
	// backslash or an encoded slash or backslash. Default:
	// /v1/chat/completions /v1/completions /v1/embeddings /v1/models
	// /v1/responses /v1/messages.
	AllowPaths []string `json:"allow_paths,omitempty"`

	// Where limit state (and, with `cache { store redis }`, cached
	// answers) lives. Default: in this process's memory.
	Store *StoreConfig `json:"store,omitempty"`

	// Keep complete answers and replay them to identical requests. Default:
	// off.
	Cache *CacheConfig `json:"cache,omitempty"`

	// What happens upstream when the client leaves mid-answer: `cancel`
	// (stop at once, the default) or `drain` (keep reading, without
	// writing, for at most DrainMax, only to capture usage for billing).
	OnDisconnect string `json:"on_disconnect,omitempty"`

	// The longest drain after the client left. Default: 30s.
	DrainMax caddy.Duration `json:"drain_max,omitempty"`

	// Whether request messages and the assembled answer are logged (one
	// `llm prompt` line a request): `off` (the default), `redacted` (the
	// Redact kinds are masked before anything is written) or `full`
	// (verbatim: unsafe, personal data reaches the logs).
	LogPrompts string `json:"log_prompts,omitempty"`

	// Who can open prompt logs when LogPrompts is `sealed`: each entry is
	// encrypted to these age recipients before it is written, and the
	// server holds only their public keys.
	Seal *SealConfig `json:"seal,omitempty"`

	// What `log_prompts redacted` masks: `phone` (Chinese mobile numbers),
	// `id_card` (Chinese resident ID numbers with a valid check digit),
	// `email`, `api_key` (`sk-…`, `AIza…`, long bearer tokens). Default: all.
	Redact []string `json:"redact,omitempty"`

	// Forbidden words or phrases, matched case-insensitively with
	// full-width and half-width forms alike.
	DenyWords []string `json:"deny_words,omitempty"`

	// A file of forbidden words, one word or phrase a line. Read when the
	// config loads, so a reload picks up changes.
	DenyWordsFile string `json:"deny_words_file,omitempty"`

	// Where deny words apply: `request` (the default: 403 `content_filter`
	// before any upstream is called), `response` (a streamed answer is held
	// back by at most the longest word's length in characters, and one that
	// produces a word ends with an in-band `content_filter` error event
	// while the upstream is cancelled) or `both`.
	DenyWordsScope string `json:"deny_words_scope,omitempty"`

	// Stops in-flight generations: `POST <stop_endpoint>/<request_id>`, with
	// the X-Request-Id every response carries, cancels that generation's
	// upstream request at once; its stream ends with a clean final event
	// (`data: [DONE]`, or Anthropic's `message_stop`) and its usage is still
	// recorded (estimated when the upstream never reported it). With
	// `store redis`, a stop reaches the instance running the generation
	// through Redis pub/sub. Where client keys or identity are configured,
	// only the caller that started a generation may stop it. Default: off.
	StopEndpoint string `json:"stop_endpoint,omitempty"`

	// Answers `GET <usage_endpoint>/<id>` with what the handler measured of
	// a request that ended (usage by kind, cost, time to first token,
	// tokens per second, cache), by its X-Request-Id or its answer's id,
	// for 10 minutes; with `store redis` any instance answers. Where client
	// keys or identity are configured, only the caller that made the
	// request may read it. Default: off.
	UsageEndpoint string `json:"usage_endpoint,omitempty"`

	// Accept WebSocket upgrades and answer each message sent on the socket
	// like a request. Default: off.
	WebSocket *WebSocketConfig `json:"websocket,omitempty"`

	// Split bursts of streamed text into small pieces written at a steady
	// pace. Default: off.
	Smooth *SmoothConfig `json:"smooth,omitempty"`

	ups     []*Upstream
	router  *router
	state   routeState
	retryOn map[string]bool
	secrets *scrubber
	logger  *zap.Logger

	clientKeys    []clientKey
	allowPaths    []string
	pathMatcher   caddyhttp.MatchPath
	prices        *priceList
	labels        *memo.Map[string, string] // model name → its metrics label
	rules         *modelRules               // the compiled route rules
	responses     recall                    // Responses API answer id → its upstream and key
	usageRecords  recall                    // request or answer id → its usage record
	limits        store.Limits
	store         store.Store
	redis         *store.Redis    // the `store redis` server
	redisSettings string          // its pool key: a digest of its settings
	inflight      *sync.WaitGroup // requests that may still settle with the store

	cacheStore cache.Store
	flights    *cache.Group

	stops stop.Broadcaster // reaches the other instances, with store redis

	held []poolRef // usage-pool entries, released in Cleanup (state.go)

	redactor     *redact.Redactor
	recipients   []age.Recipient // log_prompts sealed
	deny         *denyword.Matcher
	denyRequest  bool
	denyResponse bool
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_stream",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision resolves the keys, fills in defaults, sets up the transports
// and the shared state (the Redis client first, then what uses it).
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.labels = new(memo.Map[string, string])
	h.applyDefaults()
	switch {
	case h.Upstream != "" && len(h.Upstreams) > 0:
		return errors.New("upstream: use either one upstream URL or upstream blocks, not both")
	case h.Upstream != "":
		u := &Upstream{URL: h.Upstream}
		if h.APIKey != "" {
			u.APIKeys = []string{h.APIKey}
		}
		h.ups = []*Upstream{u}
	case len(h.Upstreams) > 0:
		if h.APIKey != "" {
			return errKeyInBlocks
		}
		h.ups = h.Upstreams
	default:
		return errNoUpstream
	}

	if h.HeaderUp != nil {
		if err := h.HeaderUp.Provision(ctx); err != nil {
			return fmt.Errorf("header_up: %w", err)
		}
	}
	if err := h.provisionStore(); err != nil {
		return err
	}
	var secrets []string
	for _, u := range h.ups {
		if err := u.provision(ctx, h); err != nil {
			return err
		}
		if err := h.shareRouteState(u); err != nil {
			return err
		}
		for _, k := range u.keys {
			secrets = append(secrets, k.secret)
		}
		h.logger.Debug("upstream provisioned",
			zap.String("upstream", u.URL),
			zap.String("provider", u.Provider),
			zap.Int("keys", len(u.keys)))
	}
	h.secrets = newScrubber(secrets...)
	h.router = newRouter(h.ups)
	if err := h.provisionRouteState(); err != nil {
		return err
	}

	if err := registerMetrics(ctx); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if err := h.provisionContentRules(); err != nil {
		return err
	}
	h.inflight = new(sync.WaitGroup)
	if err := h.provisionAccess(); err != nil {
		return err
	}
	if err := h.provisionRouteRules(); err != nil {
		return err
	}
	if err := h.provisionUsageEndpoint(); err != nil {
		return err
	}
	if err := h.provisionResponseRoutes(); err != nil {
		return err
	}
	if err := h.provisionPrices(); err != nil {
		return err
	}
	if err := h.provisionLimits(); err != nil {
		return err
	}
	if err := h.provisionCache(); err != nil {
		return err
	}
	if err := h.provisionWebSocket(); err != nil {
		return err
	}
	if err := h.provisionSmooth(); err != nil {
		return err
	}
	return h.provisionStop()
}

// applyDefaults fills in the defaults documented on the fields.
func (h *Handler) applyDefaults() {
	if h.DialTimeout == 0 {
		h.DialTimeout = caddy.Duration(defaultDialTimeout)
	}
	if h.FirstByteTimeout == 0 {
		h.FirstByteTimeout = caddy.Duration(defaultFirstByteTimeout)
	}
	if h.IdleTimeout == 0 {
		h.IdleTimeout = caddy.Duration(defaultIdleTimeout)
	}
	if h.Heartbeat == 0 {
		h.Heartbeat = caddy.Duration(defaultHeartbeat)
	}
	if h.MaxRequestBody == 0 {
		h.MaxRequestBody = defaultMaxRequestBody
	}

	if h.Retries == nil {
		two := 2
		h.Retries = &two
	}
	if len(h.RetryOn) == 0 {
		h.RetryOn = []string{"connect", "timeout", "429", "500", "502", "503", "504"}
	}
	h.retryOn = map[string]bool{}
	for _, o := range h.RetryOn {
		h.retryOn[o] = true
	}
	if h.RetryBackoff == 0 {
		h.RetryBackoff = caddy.Duration(200 * time.Millisecond)
	}
	if h.RetryBackoffMax == 0 {
		h.RetryBackoffMax = caddy.Duration(5 * time.Second)
	}
	if h.UnhealthyAfter == 0 {
		h.UnhealthyAfter = 3
	}
	if h.UnhealthyCooldown == 0 {
		h.UnhealthyCooldown = caddy.Duration(30 * time.Second)
	}
}

// Cleanup releases this configuration's hold on the pooled state (the
// Redis client among it) once the requests and WebSockets it admitted have
// ended: after a reload, old streams still relay. State that the new
// configuration shares stays.
func (h *Handler) Cleanup() error {
	if h.stops != nil {
		_ = h.stops.Close()
	}
	inflight := h.inflight
	go func() {
		if inflight != nil {
			inflight.Wait()
		}
		h.releasePools()
	}()
	return nil
}

// Validate checks the provisioned configuration.
func (h *Handler) Validate() error {
	for name, d := range map[string]caddy.Duration{
		"dial_timeout":       h.DialTimeout,
		"first_byte_timeout": h.FirstByteTimeout,
		"idle_timeout":       h.IdleTimeout,
	} {
		if d < 0 {
			return fmt.Errorf("%s: must not be negative", name)
		}
	}
	if h.MaxRequestBody < 0 {
		return errors.New("max_request_body: must not be negative")
	}
	if *h.Retries < 0 {
		return errors.New("retries: must not be negative")
	}
	for _, o := range h.RetryOn {
		if o != "connect" && o != "timeout" {
			if c, err := strconv.Atoi(o); err != nil || c < 400 || c > 599 {
				return fmt.Errorf("retry_on: %q is not connect, timeout or a 4xx/5xx status", o)
			}
		}
	}
	if h.RetryBackoffMax < h.RetryBackoff {
		return errors.New("retry_backoff: the maximum is below the base")
	}
	if h.Identity != "" && (len(h.ClientKeys) > 0 || h.ClientKeysFile != "") {
		return errors.New("identity: use either identity or client keys, not both")
	}
	if h.OnDisconnect != "" && h.OnDisconnect != "cancel" && h.OnDisconnect != "drain" {
		return fmt.Errorf("on_disconnect: %q is not cancel or drain", h.OnDisconnect)
	}
	if err := checkKeyAffinity(h.KeyAffinity); err != nil {
		return err
	}
	return nil
}

// parseBaseURL checks an upstream base URL.
func parseBaseURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("upstream %q: scheme must be http or https", s)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("upstream %q: missing host", s)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("upstream %q: must not have a query or fragment", s)
	}
	return u, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
