// Package llmstream is a Caddy HTTP handler that proxies requests to model
// APIs (OpenAI and compatible providers, Azure OpenAI, Anthropic, Gemini),
// injects the API key from the configuration and relays streamed answers to
// the client as they arrive, flushing after every upstream read.
package llmstream

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
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

	// The transport used to reach the upstream: one of Caddy's
	// `http.reverse_proxy.transport` modules, normally `http`, so its TLS,
	// proxy, HTTP-version and keep-alive options apply. Default: the `http`
	// transport with `dial_timeout` and TLS for `https` upstreams.
	TransportRaw json.RawMessage `json:"transport,omitempty" caddy:"namespace=http.reverse_proxy.transport inline_key=protocol"`

	upstream  *url.URL
	apiKey    string
	secrets   *scrubber
	transport http.RoundTripper
	logger    *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_stream",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision resolves the key, fills in defaults and sets up the transport.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
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

	if h.Upstream == "" {
		return errors.New("upstream: a base URL is required")
	}
	u, err := parseBaseURL(h.Upstream)
	if err != nil {
		return err
	}
	h.upstream = u

	key, err := resolveSecret(h.APIKey)
	if err != nil {
		return fmt.Errorf("api_key: %w", err)
	}
	h.apiKey = key
	h.secrets = newScrubber(key)
	if h.APIKey != "" && key == "" {
		h.logger.Warn("api_key resolved to an empty value; requests go upstream without a key",
			zap.String("upstream", h.Upstream))
	}
	if key != "" && key == h.APIKey {
		h.logger.Warn("api_key is a literal in the config; prefer {env.NAME} or {file.path}",
			zap.String("key", fingerprint(key)))
	}

	if h.HeaderUp != nil {
		if err := h.HeaderUp.Provision(ctx); err != nil {
			return fmt.Errorf("header_up: %w", err)
		}
	}

	h.transport, err = h.loadTransport(ctx, u.Scheme == "https")
	if err != nil {
		return fmt.Errorf("loading transport: %w", err)
	}
	h.logger.Debug("provisioned",
		zap.String("upstream", h.Upstream),
		zap.String("key", fingerprint(key)))
	return nil
}

// loadTransport loads the configured transport or builds the default one.
// An `http` transport gets TLS for https upstreams and the dial timeout
// when it sets none of its own.
func (h *Handler) loadTransport(ctx caddy.Context, useTLS bool) (http.RoundTripper, error) {
	if h.TransportRaw == nil {
		t := &reverseproxy.HTTPTransport{
			DialTimeout: h.DialTimeout,
			// The request is written once; a small write buffer keeps
			// memory per connection low without costing extra syscalls.
			WriteBufferSize: 1024,
		}
		if useTLS {
			t.TLS = new(reverseproxy.TLSConfig)
		}
		if err := t.Provision(ctx); err != nil {
			return nil, err
		}
		return t, nil
	}
	var ht reverseproxy.HTTPTransport
	if err := json.Unmarshal(h.TransportRaw, &ht); err == nil && isHTTPProtocol(h.TransportRaw) {
		// Adjust before Caddy provisions it: TLS for https upstreams (as
		// reverse_proxy's Caddyfile does) and our dial timeout.
		raw := map[string]json.RawMessage{}
		_ = json.Unmarshal(h.TransportRaw, &raw)
		if useTLS && ht.TLS == nil {
			raw["tls"] = json.RawMessage("{}")
		}
		if ht.DialTimeout == 0 {
			raw["dial_timeout"], _ = json.Marshal(h.DialTimeout)
		}
		h.TransportRaw, _ = json.Marshal(raw)
	}
	mod, err := ctx.LoadModule(h, "TransportRaw")
	if err != nil {
		return nil, err
	}
	rt, ok := mod.(http.RoundTripper)
	if !ok {
		return nil, fmt.Errorf("module %T is not an http.RoundTripper", mod)
	}
	return rt, nil
}

func isHTTPProtocol(raw json.RawMessage) bool {
	var p struct {
		Protocol string `json:"protocol"`
	}
	return json.Unmarshal(raw, &p) == nil && p.Protocol == "http"
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
	return nil
}

// Cleanup releases idle upstream connections. It runs after a config reload
// while the old configuration's streams may still be relaying, so it must
// not close anything in use; the transport modules loaded through the
// context are cleaned up by Caddy itself.
func (h *Handler) Cleanup() error {
	if c, ok := h.transport.(interface{ CloseIdleConnections() }); ok && h.TransportRaw == nil {
		c.CloseIdleConnections()
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

// resolveSecret replaces global placeholders ({env.*}, {file.*}) in a
// configured secret. The error names the placeholder problem, never the
// value.
func resolveSecret(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	v, err := caddy.NewReplacer().ReplaceOrErr(s, false, true)
	if err != nil {
		return "", errors.New("unresolvable placeholder")
	}
	return v, nil
}

// fingerprint identifies a key in logs without revealing any of it.
func fingerprint(key string) string {
	if key == "" {
		return "none"
	}
	sum := sha256.Sum256([]byte(key))
	return "sha256:" + hex.EncodeToString(sum[:4])
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
