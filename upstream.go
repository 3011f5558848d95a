package llmstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"go.uber.org/zap"
)

// Upstream is one model API: where it is, how the key is sent, which keys,
// which models it serves and how it ranks against the others.
type Upstream struct {
	// Base URL of the model API, e.g. `https://api.deepseek.com` or an Azure
	// resource `https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT`.
	// The request's path and query are appended. Required.
	URL string `json:"url,omitempty"`

	// How the key is sent: `openai` (`Authorization: Bearer`, the default,
	// also right for OpenAI-compatible providers), `azure` (`api-key`),
	// `anthropic` (`x-api-key`) or `gemini` (`x-goog-api-key`).
	Provider string `json:"provider,omitempty"`

	// API keys, rotated per request (see `key_affinity`). A key answered
	// with 429 rests for the upstream's Retry-After (or the retry backoff
	// maximum) while the others carry on; a key answered with 401 or 403
	// rests 10 minutes. Placeholders such as `{env.KEY}` are resolved at
	// provision time.
	APIKeys []string `json:"api_keys,omitempty"`

	// For `azure`: the `api-version` query value used when the client sent
	// none (default `2024-10-21`). For `anthropic`: the `anthropic-version`
	// header used when the client sent none (default `2023-06-01`).
	APIVersion string `json:"api_version,omitempty"`

	// Models this upstream serves: exact names or globs (`gpt-4o*`,
	// `deepseek-?`). Default: all.
	Models []string `json:"models,omitempty"`

	// Client model name → the name sent to this upstream. Only the `model`
	// member of the request body is rewritten; every other byte is kept.
	// Renamed names are served by this upstream even when not in Models.
	Rename map[string]string `json:"rename,omitempty"`

	// Share of traffic among upstreams of equal priority. Default: 1.
	Weight int `json:"weight,omitempty"`

	// Lower is tried first; higher numbers are fallbacks. Default: 0.
	Priority int `json:"priority,omitempty"`

	// Header operations for requests to this upstream, applied after the
	// handler's own `header_up`.
	HeaderUp *headers.HeaderOps `json:"header_up,omitempty"`

	// Reach this upstream through an HTTP forward proxy, e.g.
	// `http://proxy.internal:3128`.
	ForwardProxy string `json:"forward_proxy,omitempty"`

	base       *url.URL
	keys       []*apiKey
	exact      map[string]bool
	globs      []string
	globPrefix []string // literal start of each glob
	transport  http.RoundTripper
	rr         atomic.Uint64   // key rotation
	urlHash    uint64          // the URL's half of every rendezvous score
	health     *upstreamHealth // pooled: survives reloads
	stateKey   string          // health's pool key, shared with other instances
}

// apiKey is one resolved key; id is its fingerprint.
type apiKey struct {
	secret   string
	id       string
	idHash   uint64   // id's half of every rendezvous score
	rest     *keyRest // pooled: survives reloads
	stateKey string   // rest's pool key, shared with other instances
}

func newAPIKey(secret string) *apiKey {
	id := fingerprint(secret)
	return &apiKey{secret: secret, id: id, idHash: idHash(id)}
}

// provision resolves keys, indexes models and loads the transport.
func (u *Upstream) provision(ctx caddy.Context, h *Handler) error {
	var err error
	if u.base, err = parseBaseURL(u.URL); err != nil {
		return err
	}
	if u.Provider == "" {
		u.Provider = "openai"
	}
	if err := checkProvider(u.Provider); err != nil {
		return fmt.Errorf("upstream %s: %w", u.URL, err)
	}
	if u.Weight == 0 {
		u.Weight = 1
	}
	if u.Weight < 0 {
		return fmt.Errorf("upstream %s: weight must be positive", u.URL)
	}
	for i, k := range u.APIKeys {
		secret, err := resolveSecret(k)
		if err != nil {
			return fmt.Errorf("upstream %s: api_key %d: %w", u.URL, i+1, err)
		}
		if secret == "" {
			h.logger.Warn("api_key resolved to an empty value; it is skipped",
				zap.String("upstream", u.URL))
			continue
		}
		if secret == k {
			h.logger.Warn("api_key is a literal in the config; prefer {env.NAME} or {file.path}",
				zap.String("key", fingerprint(secret)))
		}
		u.keys = append(u.keys, newAPIKey(secret))
	}
	if len(u.keys) == 0 {
		u.keys = []*apiKey{newAPIKey("")} // local servers without keys
	}
	u.urlHash = idHash(u.URL)
	u.exact = map[string]bool{}
	for _, m := range u.Models {
		if strings.ContainsAny(m, "*?[") {
			if _, err := path.Match(m, ""); err != nil {
				return fmt.Errorf("upstream %s: bad model pattern %q", u.URL, m)
			}
			u.globs = append(u.globs, m)
			u.globPrefix = append(u.globPrefix, m[:strings.IndexAny(m, "*?[\\")])
		} else {
			u.exact[m] = true
		}
	}
	if u.HeaderUp != nil {
		if err := u.HeaderUp.Provision(ctx); err != nil {
			return fmt.Errorf("upstream %s: header_up: %w", u.URL, err)
		}
	}
	u.transport, err = h.loadTransport(ctx, u)
	if err != nil {
		return fmt.Errorf("upstream %s: loading transport: %w", u.URL, err)
	}
	return nil
}

// servesAll reports whether the upstream takes any model.
func (u *Upstream) servesAll() bool { return len(u.Models) == 0 }

// serves reports whether the upstream takes the model.
func (u *Upstream) serves(model string) bool {
	if u.servesAll() || u.exact[model] {
		return true
	}
	if _, ok := u.Rename[model]; ok {
		return true
	}
	for i, g := range u.globs {
		// The literal prefix rules most patterns out with one compare.
		if strings.HasPrefix(model, u.globPrefix[i]) {
			if ok, _ := path.Match(g, model); ok {
				return true
			}
		}
	}
	return false
}

// upstreamModel is the model name sent to this upstream.
func (u *Upstream) upstreamModel(model string) string {
	if to, ok := u.Rename[model]; ok {
		return to
	}
	return model
}

// loadTransport loads Caddy's `http` transport for one upstream: the
// handler's `transport` block when given, with TLS for https upstreams, the
// dial timeout, and the upstream's forward proxy.
func (h *Handler) loadTransport(ctx caddy.Context, u *Upstream) (http.RoundTripper, error) {
	raw := map[string]json.RawMessage{}
	if h.TransportRaw != nil {
		if err := json.Unmarshal(h.TransportRaw, &raw); err != nil {
			return nil, err
		}
		var protocol string
		_ = json.Unmarshal(raw["protocol"], &protocol)
		if protocol != "http" {
			return nil, fmt.Errorf("unsupported transport %q: only http is", protocol)
		}
		delete(raw, "protocol")
	} else {
		// The request is written once; a small write buffer keeps memory
		// per connection low without costing extra syscalls.
		raw["write_buffer_size"] = json.RawMessage("1024")
	}
	if _, ok := raw["tls"]; !ok && u.base.Scheme == "https" {
		raw["tls"] = json.RawMessage("{}")
	}
	if _, ok := raw["dial_timeout"]; !ok {
		raw["dial_timeout"], _ = json.Marshal(h.DialTimeout)
	}
	if u.ForwardProxy != "" {
		if _, err := url.Parse(u.ForwardProxy); err != nil {
			return nil, fmt.Errorf("forward_proxy: %w", err)
		}
		raw["network_proxy"], _ = json.Marshal(map[string]string{"from": "url", "url": u.ForwardProxy})
	}
	cfg, _ := json.Marshal(raw)
	mod, err := ctx.LoadModuleByID("http.reverse_proxy.transport.http", cfg)
	if err != nil {
		return nil, err
	}
	rt, ok := mod.(http.RoundTripper)
	if !ok {
		return nil, errors.New("transport is not an http.RoundTripper")
	}
	return rt, nil
}
