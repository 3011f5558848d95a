package llmstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

var (
	errFirstByteTimeout  = errors.New("no response headers from the upstream within first_byte_timeout")
	errIdleTimeout       = errors.New("the upstream was silent longer than idle_timeout")
	errFirstTokenTimeout = errors.New("no data event from the upstream within first_token_timeout")
	errDrainTimeout      = errors.New("the client left and drain_max passed")
)

// hopHeaders are removed in both directions (RFC 9110 §7.6.1), plus
// Alt-Svc, which describes the upstream, not us.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Alt-Svc",
}

// clientCredentials are removed from every upstream request: the upstream
// gets our key and nothing the client sent to prove who it is.
var clientCredentials = []string{"Authorization", "Api-Key", "X-Api-Key", "X-Goog-Api-Key", "Cookie"}

// copyHeaders copies src's fields into dst, the values of all of them in
// one allocation (as Header.Clone), leaving out the hop-by-hop fields
// (hopHeaders and those src's Connection header names, RFC 9110 §7.6.1)
// and the fields in drop. Fields are left out of the copy rather than
// deleted after it: what dst already holds under those names stays.
func copyHeaders(dst, src http.Header, drop []string) {
	conn := src["Connection"]
	n := 0
	for _, vv := range src {
		n += len(vv)
	}
	vals := make([]string, n)
	for k, vv := range src {
		if slices.Contains(drop, k) || slices.Contains(hopHeaders, k) || len(conn) > 0 && namedIn(conn, k) {
			continue
		}
		c := copy(vals, vv)
		dst[k] = vals[:c:c]
		vals = vals[c:]
	}
}

// namedIn reports whether a Connection header's values name the field k.
func namedIn(conn []string, k string) bool {
	for _, v := range conn {
		for f := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), k) {
				return true
			}
		}
	}
	return false
}

// newUpstreamRequest builds the request for one attempt: same method,
// path (after the base URL's path) and query, the body read earlier (with
// the model renamed for this upstream), the client's headers without
// credentials and hop-by-hop fields, header_up, then the key in the
// provider's style.
func (h *Handler) newUpstreamRequest(ctx context.Context, r *http.Request, in *inbound, u *Upstream, key *apiKey) (*http.Request, error) {
	target := *u.base
	// The path allow_paths matched (cleaned in admit), in the client's own
	// escaping.
	target.Path = joinPath(u.base.Path, r.URL.Path)
	target.RawPath = joinPath(u.base.EscapedPath(), r.URL.EscapedPath())
	target.RawQuery = r.URL.RawQuery

	var body io.Reader = http.NoBody
	if in.body != nil {
		b := in.body
		if to := u.upstreamModel(in.model); in.isJSON && to != in.model {
			b = withModel(b, to)
		}
		body = bytes.NewReader(b)
	}
	// The URL is built, not parsed: NewRequest would parse target's
	// String() back into what target already is.
	req, err := http.NewRequestWithContext(ctx, r.Method, "", body)
	if err != nil {
		return nil, err
	}
	target.Host = strings.TrimSuffix(target.Host, ":") // an empty port, as NewRequest drops it
	req.URL, req.Host = &target, target.Host
	// Room for what is added below (Accept-Encoding, the key).
	req.Header = make(http.Header, len(r.Header)+2)
	copyHeaders(req.Header, r.Header, clientCredentials)
	// Compressed event streams cannot be parsed (or flushed) incrementally;
	// ask for identity. A gzip answer sent anyway is decoded in relay.
	req.Header.Set("Accept-Encoding", "identity")
	if h.HeaderUp != nil || u.HeaderUp != nil {
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		if repl == nil {
			repl = caddy.NewReplacer()
		}
		if h.HeaderUp != nil {
			h.HeaderUp.ApplyTo(req.Header, repl)
		}
		if u.HeaderUp != nil {
			u.HeaderUp.ApplyTo(req.Header, repl)
		}
	}
	u.authorize(req, key.secret)
	return req, nil
}

func joinPath(base, p string) string {
	switch {
	case base == "" || base == "/":
		return p
	case strings.HasSuffix(base, "/") && strings.HasPrefix(p, "/"):
		return base + p[1:]
	case !strings.HasSuffix(base, "/") && !strings.HasPrefix(p, "/"):
		return base + "/" + p
	}
	return base + p
}

// roundTrip sends req and waits for the response headers, at most
// first_byte_timeout. cancel must cancel req's context.
func (h *Handler) roundTrip(u *Upstream, req *http.Request, cancel context.CancelCauseFunc) (*http.Response, error) {
	t := time.AfterFunc(time.Duration(h.FirstByteTimeout), func() { cancel(errFirstByteTimeout) })
	resp, err := u.transport.RoundTrip(req)
	t.Stop()
	if err != nil {
		if cause := context.Cause(req.Context()); cause != nil {
			return nil, cause
		}
		return nil, err
	}
	return resp, nil
}

// upstreamFailure turns a transport error into the error the client sees.
func (h *Handler) upstreamFailure(err error) *apiError {
	if errors.Is(err, errFirstByteTimeout) {
		return &apiError{Status: http.StatusGatewayTimeout, Type: typeTimeout, Code: "upstream_timeout",
			Message: errFirstByteTimeout.Error()}
	}
	return &apiError{Status: http.StatusBadGateway, Type: typeUpstream, Code: "upstream_unreachable",
		Message: "the upstream could not be reached: " + h.secrets.scrubString(err.Error())}
}
