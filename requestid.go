package llmstream

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Request ids. The client always gets the handler's own id as X-Request-Id
// (the one stop_endpoint, the usage line and the access log know); the
// provider's own id travels beside it as X-Upstream-Request-Id, because
// support tickets with the provider need it.
const (
	headerRequestID         = "X-Request-Id"
	headerUpstreamRequestID = "X-Upstream-Request-Id"
)

// upstreamIDHeaders are where providers put their request id: OpenAI and
// most compatible providers `x-request-id`, Anthropic `request-id`.
var upstreamIDHeaders = []string{"X-Request-Id", "Request-Id"}

// requestID is the request's id, sent to the client as X-Request-Id and
// used by stop_endpoint: Caddy's {http.request.uuid}, so access logs that
// carry the uuid match it.
func requestID(r *http.Request) string {
	if id, ok := r.Context().Value(requestIDKey{}).(string); ok {
		return id // a WebSocket message's
	}
	if _, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			if id, ok := repl.GetString("http.request.uuid"); ok && id != "" {
				return id
			}
		}
	}
	return newID()
}

// newID returns a random request id.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// upstreamRequestID is the provider's id from its response headers, or "".
func upstreamRequestID(h http.Header) string {
	for _, k := range upstreamIDHeaders {
		if v := h.Get(k); v != "" {
			return v
		}
	}
	return ""
}

// maxIDSniff bounds how much of an answer is searched for its id when the
// provider sent no id header.
const maxIDSniff = 8 << 10

var (
	idMember         = []byte(`"id":"`)
	responseIDMember = []byte(`"responseId":"`) // Gemini
)

// answerID finds the answer's own id in the start of an answer: the first
// `"id"` member (OpenAI chunks and completions, Anthropic's message_start,
// the Responses API's response.created) or Gemini's `responseId`. It
// reports "" when b holds none.
func answerID(b []byte) string {
	for _, m := range [][]byte{idMember, responseIDMember} {
		i := bytes.Index(b, m)
		if i < 0 {
			continue
		}
		v := b[i+len(m):]
		end := bytes.IndexByte(v, '"')
		if end <= 0 || end > 200 || bytes.IndexByte(v[:end], '\\') >= 0 {
			continue
		}
		return string(v[:end])
	}
	return ""
}
