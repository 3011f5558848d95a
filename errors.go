package llmstream

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Error types and codes sent to clients, in the OpenAI error shape.
const (
	typeInvalidRequest = "invalid_request_error"
	typeUpstream       = "upstream_error"
	typeTimeout        = "timeout_error"
)

// apiError is an error a client can act on, rendered in the OpenAI error
// shape: {"error":{"message":…,"type":…,"code":…}}.
type apiError struct {
	Status  int    `json:"-"`
	Message string `json:"message"`
	Type    string `json:"type"`
	Code    string `json:"code"`

	retryAfter time.Duration // sent as Retry-After when set
}

func (e *apiError) Error() string { return e.Message }

// body renders the error as JSON.
func (e *apiError) body() []byte {
	b, _ := json.Marshal(struct {
		Error *apiError `json:"error"`
	}{e})
	return b
}

// write sends the error as a complete JSON response.
func (e *apiError) write(w http.ResponseWriter) {
	b := e.body()
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Content-Length", strconv.Itoa(len(b)))
	hdr.Del("Content-Encoding")
	if e.retryAfter > 0 {
		hdr.Set("Retry-After", strconv.Itoa(int((e.retryAfter+time.Second-1)/time.Second)))
	}
	w.WriteHeader(e.Status)
	_, _ = w.Write(b)
}

// scrubber removes a secret key, and fragments of it, from text the upstream
// sends back. Some providers echo the key in error messages, whole or masked
// (`sk-abc*****xyz`), so any key-like token that shares a run of at least
// fragmentLen characters with the key, or a masked token that starts or ends
// like the key, becomes "[redacted]". It is only used on error paths.
type scrubber struct {
	keys      []string
	fragments map[string]struct{}
}

const fragmentLen = 6

var redacted = []byte("[redacted]")

func newScrubber(keys ...string) *scrubber {
	s := &scrubber{fragments: map[string]struct{}{}}
	for _, k := range keys {
		if k == "" {
			continue
		}
		s.keys = append(s.keys, k)
		for i := 0; i+fragmentLen <= len(k); i++ {
			s.fragments[k[i:i+fragmentLen]] = struct{}{}
		}
	}
	return s
}

func isKeyChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '-' || c == '_' || c == '*' || c == '.' || c == '~' || c == '+' || c == '/' || c == '='
}

// scrub returns b with every key-like token that reveals part of a key
// replaced. b is not modified.
func (s *scrubber) scrub(b []byte) []byte {
	if s == nil || len(s.keys) == 0 {
		return b
	}
	var out []byte
	last := 0
	for i := 0; i < len(b); {
		if !isKeyChar(b[i]) {
			i++
			continue
		}
		j := i
		for j < len(b) && isKeyChar(b[j]) {
			j++
		}
		for j > i+1 && b[j-1] == '.' {
			j-- // a sentence's full stop is not part of the token
		}
		if s.reveals(b[i:j]) {
			out = append(out, b[last:i]...)
			out = append(out, redacted...)
			last = j
		}
		i = j
	}
	if out == nil {
		return b
	}
	return append(out, b[last:]...)
}

// scrubString is scrub for strings.
func (s *scrubber) scrubString(v string) string {
	return string(s.scrub([]byte(v)))
}

// reveals reports whether a token shows any part of a key.
func (s *scrubber) reveals(tok []byte) bool {
	for i := 0; i+fragmentLen <= len(tok); i++ {
		if _, ok := s.fragments[string(tok[i:i+fragmentLen])]; ok {
			return true
		}
	}
	star := bytes.IndexByte(tok, '*')
	if star < 0 {
		return false
	}
	head := tok[:star]
	tail := tok[bytes.LastIndexByte(tok, '*')+1:]
	for _, k := range s.keys {
		if len(head) >= 3 && len(k) > len(head) && k[:len(head)] == string(head) && len(tail) > 0 {
			return true
		}
		if len(tail) >= 3 && len(k) > len(tail) && k[len(k)-len(tail):] == string(tail) {
			return true
		}
	}
	return false
}
