package llmstream

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"

	"github.com/caddyserver/caddy/v2"
)

// Secrets: upstream keys and Redis passwords are resolved from placeholders
// at load, appear in logs only as fingerprints, and are scrubbed from
// anything an upstream sends back.

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
