package llmstream

import (
	"bytes"
	"math"
	"strconv"
	"strings"
)

// Key affinity keeps a conversation on one upstream and key, so that the
// provider's prompt cache (per key, per deployment) stays warm. The
// choice is rendezvous (highest-random-weight) hashing of the
// conversation with each upstream and key: nothing is remembered, every
// instance makes the same choice, adding or removing one of N keys moves
// about 1/N of the conversations, and a conversation whose key rests
// moves to its second choice and comes back when the rest ends.

// Affinity sources (key_affinity).
const (
	affinityAuto     = "auto"
	affinityCacheKey = "prompt_cache_key"
	affinityUser     = "user"
	affinityPrefix   = "prefix"
	affinityHeader   = "header:"
)

// conversation is what identifies the request's conversation, per
// key_affinity; "" leaves the request to rotation.
func (h *Handler) conversation(x *exchange) string {
	switch src := h.KeyAffinity; {
	case src == "":
		return ""
	case src == affinityUser:
		return x.in.user
	case src == affinityCacheKey:
		return x.in.promptCacheKey
	case src == affinityPrefix:
		return promptPrefix(x.in)
	case strings.HasPrefix(src, affinityHeader):
		return x.r.Header.Get(src[len(affinityHeader):])
	}
	// auto: what the client says the conversation is, else its beginning
	for _, v := range []string{x.in.promptCacheKey, x.in.user, x.in.metadataUser} {
		if v != "" {
			return v
		}
	}
	return promptPrefix(x.in)
}

// promptPrefix identifies a conversation by its beginning, which every
// turn repeats: the model, the system prompt and the first user turn
// (OpenAI messages, Anthropic system + messages, Responses instructions +
// input, Gemini systemInstruction + contents). "" when the body has none.
// It scans the body's bytes without decoding it.
func promptPrefix(in *inbound) string {
	if !in.isJSON {
		return ""
	}
	h := fnv(fnvOffset, in.model)
	var turns, input []byte
	found := false
	forEachMember(in.body, func(key, v []byte) {
		switch string(key) {
		case "system", "instructions", "systemInstruction":
			h, found = fnvBytes(h, v), true
		case "messages", "contents":
			turns = v
		case "input":
			input = v
		}
	})
	if turns == nil && len(input) > 0 {
		if input[0] != '[' {
			return "prefix:" + strconv.FormatUint(fnvBytes(h, input), 36) // one string: the whole conversation
		}
		turns = input
	}
	if len(turns) > 0 && turns[0] == '[' {
		for i := skipSpace(turns, 1); i < len(turns) && turns[i] != ']'; {
			end := skipValue(turns, i)
			t := turns[i:end]
			h, found = fnvBytes(h, t), true
			if !bytes.Contains(t, systemRole) && !bytes.Contains(t, developerRole) {
				break // the first turn past the system prompt
			}
			if i = skipSpace(turns, end); i < len(turns) && turns[i] == ',' {
				i = skipSpace(turns, i+1)
			}
		}
	}
	if !found {
		return ""
	}
	return "prefix:" + strconv.FormatUint(h, 36)
}

// forEachMember calls f with the raw key (between its quotes) and value of
// each top-level member of a valid JSON object.
func forEachMember(b []byte, f func(key, value []byte)) {
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
		f(b[ks+1:max(ks+1, ke-1)], b[vs:ve])
		if i = skipSpace(b, ve); i >= len(b) || b[i] != ',' {
			return
		}
		i = skipSpace(b, i+1)
	}
}

var (
	systemRole    = []byte(`"system"`)
	developerRole = []byte(`"developer"`)
)

// FNV-1a, 64 bits: the same on every instance and after every restart, so
// that they all send a conversation to the same upstream and key.
const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

func fnv(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime
	}
	return h
}

func fnvBytes(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime
	}
	return h
}

// conversationHash is the conversation's half of every rendezvous score.
func conversationHash(conv string) uint64 { return fnv(fnvOffset, conv) }

// weight is the rendezvous score of a conversation on one upstream or key
// (by its URL, or its key's fingerprint): the highest wins. Weighted by
// the logarithmic method: -w / ln(u), u uniform in (0,1).
func weight(conv uint64, id string, w int) float64 {
	h := fnv(conv, id)
	h ^= h >> 33 // finalise: FNV's high bits mix poorly
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	u := (float64(h>>11) + 0.5) / (1 << 53)
	return -float64(max(w, 1)) / math.Log(u)
}
