package llmstream

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// defaultAllowPaths are the endpoints reachable when allow_paths is not set:
// model calls, not files, fine-tuning or organisation endpoints.
var defaultAllowPaths = []string{
	"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
	"/v1/models", "/v1/responses", "/v1/messages",
}

// ClientKey is a key the operator handed to a client, stored only as the
// SHA-256 digest of the key.
type ClientKey struct {
	// Hex SHA-256 digest of the key. The Caddyfile accepts the key itself
	// and stores only this.
	SHA256 string `json:"sha256,omitempty"`

	// Who holds the key: the identity in limits, logs and metrics.
	Name string `json:"name,omitempty"`
}

// clientKey is a parsed ClientKey.
type clientKey struct {
	digest [sha256.Size]byte
	name   string
}

// parseClientKey reads `<key>|sha256:<hex> [<name>]`.
func parseClientKey(key, name string) (ClientKey, error) {
	var digest []byte
	if hexDigest, ok := strings.CutPrefix(key, "sha256:"); ok {
		b, err := hex.DecodeString(hexDigest)
		if err != nil || len(b) != sha256.Size {
			return ClientKey{}, fmt.Errorf("sha256: wants %d hex digits", 2*sha256.Size)
		}
		digest = b
	} else {
		if key == "" {
			return ClientKey{}, fmt.Errorf("empty client key")
		}
		sum := sha256.Sum256([]byte(key))
		digest = sum[:]
	}
	h := hex.EncodeToString(digest)
	if name == "" {
		name = "key-" + h[:8]
	}
	return ClientKey{SHA256: h, Name: name}, nil
}

// provisionAccess sets up who may call and what they may reach.
func (h *Handler) provisionAccess() error {
	h.allowPaths = h.AllowPaths
	if len(h.allowPaths) == 0 {
		h.allowPaths = defaultAllowPaths
	}
	h.pathMatcher = caddyhttp.MatchPath(slices.Clone(h.allowPaths))
	if err := h.pathMatcher.Provision(caddy.Context{}); err != nil {
		return fmt.Errorf("allow_paths: %w", err)
	}
	if err := h.loadClientKeys(); err != nil {
		return err
	}
	if !h.authRequired() {
		h.logger.Warn("no client_key or identity configured: anyone who reaches this endpoint uses the upstream key",
			zap.Strings("allow_paths", h.allowPaths))
	}
	return nil
}

// loadClientKeys collects the configured keys and the keys file.
func (h *Handler) loadClientKeys() error {
	all := append([]ClientKey(nil), h.ClientKeys...)
	if h.ClientKeysFile != "" {
		f, err := os.Open(h.ClientKeysFile)
		if err != nil {
			return fmt.Errorf("client_keys_file: %w", err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for n := 1; sc.Scan(); n++ {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			fields := strings.Fields(line)
			name := ""
			if len(fields) > 1 {
				name = fields[1]
			}
			k, err := parseClientKey(fields[0], name)
			if err != nil {
				return fmt.Errorf("client_keys_file %s:%d: %w", h.ClientKeysFile, n, err)
			}
			all = append(all, k)
		}
		if err := sc.Err(); err != nil {
			return fmt.Errorf("client_keys_file: %w", err)
		}
	}
	for _, k := range all {
		ck, err := parseClientKey("sha256:"+k.SHA256, k.Name)
		if err != nil {
			return fmt.Errorf("client_keys: %w", err)
		}
		var c clientKey
		if _, err := hex.Decode(c.digest[:], []byte(ck.SHA256)); err != nil {
			return fmt.Errorf("client_keys: %s: %w", ck.Name, err)
		}
		c.name = ck.Name
		for _, u := range h.ups {
			for _, uk := range u.keys {
				if uk.secret != "" && sha256.Sum256([]byte(uk.secret)) == c.digest {
					return fmt.Errorf("client_keys: %s is an upstream key; clients must never hold one", c.name)
				}
			}
		}
		h.clientKeys = append(h.clientKeys, c)
	}
	return nil
}

// authRequired reports whether callers must prove who they are.
func (h *Handler) authRequired() bool { return len(h.clientKeys) > 0 || h.Identity != "" }

// identify returns the caller's identity name, or "" when the request
// carries no valid credential. Without client keys or identity configured,
// callers are told apart by their client address (Caddy's, behind trusted
// proxies), for limits only.
func (h *Handler) identify(r *http.Request) string {
	switch {
	case len(h.clientKeys) > 0:
		cred := r.Header.Get("X-Api-Key")
		if v, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
			cred = strings.TrimSpace(v)
		}
		if cred == "" {
			return ""
		}
		sum := sha256.Sum256([]byte(cred))
		// Every digest is compared, in constant time: no early exit that
		// would tell how many keys were tried.
		name := ""
		for i := range h.clientKeys {
			if subtle.ConstantTimeCompare(sum[:], h.clientKeys[i].digest[:]) == 1 {
				name = h.clientKeys[i].name
			}
		}
		return name
	case h.Identity != "":
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		if repl == nil {
			return ""
		}
		return strings.TrimSpace(repl.ReplaceAll(h.Identity, ""))
	}
	return "ip:" + clientIP(r)
}

// admit is the first stage: who is calling, and may they reach this path?
// Stop and usage requests and WebSocket upgrades leave the pipeline here.
func (h *Handler) admit(x *exchange) bool {
	w, r := x.w, x.r
	x.identity = h.identify(r)
	if h.authRequired() && x.identity == "" {
		_ = h.reject(w, "", &apiError{Status: http.StatusUnauthorized, Type: typeInvalidRequest, Code: "invalid_api_key",
			Message: "a valid API key is required (Authorization: Bearer <key> or x-api-key)"})
		return false
	}
	if !cleanRequestPath(r) {
		_ = h.reject(w, "", unknownURL(r))
		return false
	}
	if h.authRequired() {
		x.owner = x.identity // only the caller may stop its generation
	}
	switch {
	case h.isStopPath(r.URL.Path):
		_ = h.serveStop(w, r, x.owner)
		return false
	case h.isUsagePath(r.URL.Path):
		_ = h.serveUsage(w, r, x.owner)
		return false
	case h.WebSocket != nil && h.forWebSocket(r):
		_ = h.serveWebSocket(w, r)
		return false
	case !h.pathAllowed(r):
		_ = h.reject(w, "", unknownURL(r))
		return false
	}
	return true
}

// clientIP is the caller's address as Caddy determined it: the server's
// trusted_proxies and client_ip_headers decide whether a forwarded address
// is believed, so an untrusted peer cannot choose its identity.
func clientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// cleanRequestPath cleans the request's path in place, the way Caddy's
// path matcher sees it (dot segments resolved, doubled slashes merged), so
// that what allow_paths matched is exactly what is forwarded. It refuses a
// path holding a NUL, a backslash, or an encoded slash or backslash:
// providers and the proxies in between disagree on what those mean, and no
// model API uses them.
func cleanRequestPath(r *http.Request) bool {
	p := r.URL.Path
	if strings.ContainsAny(p, "\x00\\") || !strings.HasPrefix(p, "/") {
		return false
	}
	raw := r.URL.EscapedPath()
	if i := strings.IndexByte(raw, '%'); i >= 0 {
		lower := strings.ToLower(raw[i:])
		if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") || strings.Contains(lower, "%00") {
			return false
		}
	}
	clean := caddyhttp.CleanPath(p, true)
	if clean != p {
		// Dot segments or doubled slashes: forward the cleaned path.
		r.URL.Path, r.URL.RawPath = clean, ""
	}
	return true
}

// pathAllowed reports whether the (cleaned) request path is in
// allow_paths, with Caddy's path matching.
func (h *Handler) pathAllowed(r *http.Request) bool {
	if _, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); !ok {
		// Not a request Caddy prepared (a benchmark's): the matcher needs
		// a replacer.
		r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
	}
	ok, _ := h.pathMatcher.MatchWithError(r)
	return ok
}

// unknownURL is the answer for a path that may not reach the upstream.
func unknownURL(r *http.Request) *apiError {
	return &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "unknown_url",
		Message: "unknown request URL: " + r.Method + " " + strconv.Quote(r.URL.Path)}
}

// filterModelList keeps, in a model list (OpenAI and Anthropic `data[].id`,
// Gemini `models[].name`), only the models allow_models lets the caller
// use. A body it cannot read is replaced by an empty list: model names the
// operator closed must not leak.
func (h *Handler) filterModelList(body []byte) []byte {
	var list map[string]json.RawMessage
	if json.Unmarshal(body, &list) != nil {
		return []byte(`{"object":"list","data":[]}`)
	}
	for field, name := range map[string]string{"data": "id", "models": "name"} {
		raw, ok := list[field]
		if !ok {
			continue
		}
		var items []json.RawMessage
		if json.Unmarshal(raw, &items) != nil {
			list[field] = json.RawMessage("[]")
			continue
		}
		kept := items[:0]
		for _, it := range items {
			var m map[string]any
			_ = json.Unmarshal(it, &m)
			id, _ := m[name].(string)
			if id != "" && h.modelAllowed(strings.TrimPrefix(id, "models/")) {
				kept = append(kept, it)
			}
		}
		list[field], _ = json.Marshal(kept)
		if len(kept) == 0 {
			list[field] = json.RawMessage("[]")
		}
	}
	out, _ := json.Marshal(list)
	return out
}

// modelAllowed reports whether clients may ask for the model.
func (h *Handler) modelAllowed(model string) bool {
	if len(h.AllowModels) == 0 || model == "" {
		return true
	}
	for _, pat := range h.AllowModels {
		if ok, _ := path.Match(pat, model); ok || pat == model {
			return true
		}
	}
	return false
}
