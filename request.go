package llmstream

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/wire"
)

// inbound is what the handler learns from the client's request, read once.
type inbound struct {
	id     string // the request id (X-Request-Id)
	body   []byte // nil when the request has none
	isJSON bool
	model  string
	stream bool
	user   string
	// what names the conversation, for key affinity: prompt_cache_key and
	// Anthropic's metadata.user_id
	promptCacheKey string
	metadataUser   string
	// the Responses API answer this request follows up
	previousResponse string
	// the largest answer asked for: max_tokens, max_completion_tokens or
	// max_output_tokens
	maxTokens int64
	// where the conversation begins (raw values in body), for key
	// affinity: system prompts (system, instructions, systemInstruction),
	// the turns (messages, contents) and Responses input
	system       [3][]byte
	turns, input []byte
}

// tokenEstimate is what a request may cost at most, as far as can be
// told before the answer: the request's size in bytes / 3 (a generous
// bytes-per-token ratio for prompts) plus the answer's cap when given.
func (in *inbound) tokenEstimate() int64 {
	return int64(len(in.body))/3 + in.maxTokens
}

// readBody reads a request body of at most max bytes (more is returned
// for the caller to refuse): into a buffer of its declared length when it
// has one, since the body is kept while the answer streams (failover
// resends it) and io.ReadAll's doubling would keep up to twice its size;
// net/http ends a body at its declared length.
func readBody(body io.Reader, declared, max int64) ([]byte, error) {
	if declared < 0 || declared > max {
		return io.ReadAll(io.LimitReader(body, max+1))
	}
	b := make([]byte, declared)
	if _, err := io.ReadFull(body, b); err != nil {
		return nil, err
	}
	return b, nil
}

// readRequest reads the body (at most max bytes) and, for JSON bodies,
// checks the syntax and takes the fields routing and relaying need.
func readRequest(r *http.Request, max int64) (*inbound, *apiError) {
	in := new(inbound)
	if r.ContentLength > max {
		return nil, errTooLarge(max)
	}
	if r.Body != nil && r.Body != http.NoBody {
		b, err := readBody(r.Body, r.ContentLength, max)
		if err != nil {
			return nil, &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "body_unreadable",
				Message: "could not read the request body"}
		}
		if int64(len(b)) > max {
			return nil, errTooLarge(max)
		}
		if len(b) > 0 {
			in.body = b
		}
		// All of it is in memory now. Closing it lets HTTP/2 drop the
		// frame data it keeps for an unfinished read (a 1 KiB chunk for a
		// short prompt) now, not when the answer ends.
		_ = r.Body.Close()
	}
	if in.body == nil || !looksJSON(r.Header.Get("Content-Type"), in.body) {
		return in, nil
	}
	in.isJSON = true
	if !json.Valid(in.body) {
		return nil, &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "invalid_json",
			Message: "the request body is not valid JSON"}
	}
	if err := in.readFields(); err != nil {
		return nil, err
	}
	return in, nil
}

// readFields takes the top-level members routing and relaying need from a
// valid JSON body in one pass over its bytes, without decoding the rest.
// As with encoding/json, the last of repeated members counts.
func (in *inbound) readFields() *apiError {
	var model, stream, user, cacheKey, previous, metadata []byte
	forEachMember(in.body, func(key, v []byte) {
		switch string(key) {
		case "model":
			model = v
		case "stream":
			stream = v
		case "user":
			user = v
		case "prompt_cache_key":
			cacheKey = v
		case "previous_response_id":
			previous = v
		case "metadata":
			metadata = v
		case "max_tokens", "max_completion_tokens", "max_output_tokens":
			if n, err := strconv.ParseInt(string(v), 10, 64); err == nil && n > in.maxTokens {
				in.maxTokens = n
			}
		case "system":
			in.system[0] = v
		case "instructions":
			in.system[1] = v
		case "systemInstruction":
			in.system[2] = v
		case "messages", "contents":
			in.turns = v
		case "input":
			in.input = v
		}
	})
	if model != nil && string(model) != "null" {
		var ok bool
		if in.model, ok = jsonString(model); !ok {
			return fieldError("model", "a string")
		}
	}
	if stream != nil && string(stream) != "null" {
		switch string(stream) {
		case "true":
			in.stream = true
		case "false":
		default:
			return fieldError("stream", "a boolean")
		}
	}
	// only for routing: a value of another type names no conversation
	in.user, _ = jsonString(user)
	in.promptCacheKey, _ = jsonString(cacheKey)
	in.previousResponse, _ = jsonString(previous)
	in.metadataUser, _ = jsonString(member(metadata, "user_id"))
	return nil
}

// jsonString decodes a raw JSON value that is a string.
func jsonString(v []byte) (string, bool) {
	if len(v) < 2 || v[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(v, '\\') < 0 {
		return string(v[1 : len(v)-1]), true
	}
	var s string
	err := json.Unmarshal(v, &s)
	return s, err == nil
}

// withModel returns the body with the top-level "model" member's value
// replaced by name; every other byte is unchanged. The body is valid JSON.
// quoteJSON is name as a JSON string, as json.Marshal writes it.
func quoteJSON(name string) []byte {
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			v, _ := json.Marshal(name)
			return v
		}
	}
	return []byte(`"` + name + `"`)
}

func withModel(body []byte, name string) []byte {
	start, end := topLevelValue(body, "model")
	if start < 0 {
		return body
	}
	v := quoteJSON(name)
	out := make([]byte, 0, len(body)-(end-start)+len(v))
	out = append(out, body[:start]...)
	out = append(out, v...)
	return append(out, body[end:]...)
}

// topLevelValue finds the byte range of a top-level member's value in a
// valid JSON object, or -1, -1. Of repeated members it is the last, the
// one encoding/json and the providers' parsers read.
func topLevelValue(b []byte, key string) (int, int) {
	start, end := -1, -1
	members(b, func(k []byte, vs, ve int) {
		if string(k) == key {
			start, end = vs, ve
		}
	})
	return start, end
}

// member is the raw value of a top-level member of a valid JSON object
// (nil when it has none).
func member(b []byte, key string) []byte {
	if s, e := topLevelValue(b, key); s >= 0 {
		return b[s:e]
	}
	return nil
}

// forEachMember calls f with the key and raw value of each top-level
// member of a valid JSON object (nothing when b is not one).
func forEachMember(b []byte, f func(key, value []byte)) {
	members(b, func(k []byte, vs, ve int) { f(k, b[vs:ve]) })
}

// members calls f with the key and the value's byte range of each
// top-level member of a valid JSON object. A key is passed as the bytes
// between its quotes, decoded when it has escapes: "mod\u0065l" is the
// member model.
func members(b []byte, f func(key []byte, vs, ve int)) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return
	}
	for i = skipSpace(b, i+1); i < len(b) && b[i] == '"'; {
		ks, ke := i, skipString(b, i)
		if i = skipSpace(b, ke); i >= len(b) || b[i] != ':' {
			return
		}
		vs := skipSpace(b, i+1)
		ve := skipValue(b, vs)
		key := b[ks+1 : max(ks+1, ke-1)]
		if bytes.IndexByte(key, '\\') >= 0 {
			if k, ok := jsonString(b[ks:ke]); ok {
				key = []byte(k)
			}
		}
		f(key, vs, ve)
		if i = skipSpace(b, ve); i >= len(b) || b[i] != ',' {
			return
		}
		i = skipSpace(b, i+1)
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string starting at b[i] == '"'.
func skipString(b []byte, i int) int {
	for i++; i < len(b); {
		q := bytes.IndexByte(b[i:], '"')
		if q < 0 {
			return len(b)
		}
		end := i + q
		// The quote ends the string unless an odd run of backslashes
		// escapes it.
		n := 0
		for k := end - 1; k >= i && b[k] == '\\'; k-- {
			n++
		}
		if n%2 == 0 {
			return end + 1
		}
		i = end + 1
	}
	return len(b)
}

// skipValue returns the index after the value starting at b[i].
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = skipString(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return i
	}
	for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
		i++
	}
	return i
}

func errTooLarge(max int64) *apiError {
	return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: "request_too_large",
		Message: fmt.Sprintf("the request body is larger than %d bytes", max)}
}

func fieldError(name, want string) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "invalid_type",
		Message: fmt.Sprintf("%q must be %s", name, want)}
}

// looksJSON reports whether a body is meant as JSON: labelled so, or
// unlabelled (or labelled as a form, which is what `curl -d` sends) and
// starting like a JSON object or array.
func looksJSON(contentType string, body []byte) bool {
	mt, _, _ := mime.ParseMediaType(contentType)
	switch {
	case mt == "application/json" || (len(mt) > 5 && mt[len(mt)-5:] == "+json"):
		return true
	case mt == "" || mt == "application/x-www-form-urlencoded" || mt == "text/plain":
		t := bytes.TrimLeft(body, " \t\r\n")
		return len(t) > 0 && (t[0] == '{' || t[0] == '[')
	}
	return false
}

// inspect is the stage that reads the body, once, and checks what it asks
// for: an allowed model, no forbidden words. GET /v1/models is answered
// here when the configuration names the models.
func (h *Handler) inspect(x *exchange) bool {
	in, aerr := readRequest(x.r, h.MaxRequestBody)
	if aerr != nil {
		_ = h.reject(x.w, "", aerr)
		return false
	}
	in.id = x.id
	x.in = in
	if !h.modelAllowed(in.model) {
		_ = h.reject(x.w, in.model, &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "model_not_allowed",
			Message: "the model " + strconv.Quote(in.model) + " may not be used here"})
		return false
	}
	if in.isJSON && (h.denyRequest || h.LogPrompts != "off") {
		x.prompt = requestText(in.body)
	}
	if h.denyRequest && h.deny.Contains(x.prompt) {
		metrics.denyWordBlocks.WithLabelValues("request").Inc()
		_ = h.reject(x.w, in.model, &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "content_filter",
			Message: "the request contains words that are not allowed here"})
		return false
	}
	if isModelList(x.r) && len(h.router.names) > 0 {
		h.serveModels(x.w)
		return false
	}
	return true
}

// isModelList reports whether r asks for the model list.
func isModelList(r *http.Request) bool {
	return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/models")
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
	wire.WriteModelList(w, names, "llm_stream", 0)
}
