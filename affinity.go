package llmstream

import (
	"bytes"
	"math"
	"strings"

	"github.com/cespare/xxhash/v2"
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

// conversation is the hash that names the request's conversation, per
// key_affinity; 0 leaves the request to rotation.
func (h *Handler) conversation(x *exchange) uint64 {
	switch src := h.KeyAffinity; {
	case src == "":
		return 0
	case src == affinityUser:
		return conversationHash(x.in.user)
	case src == affinityCacheKey:
		return conversationHash(x.in.promptCacheKey)
	case src == affinityPrefix:
		return promptPrefix(x.in)
	case strings.HasPrefix(src, affinityHeader):
		return conversationHash(x.r.Header.Get(src[len(affinityHeader):]))
	}
	// auto: what the client says the conversation is, else its beginning
	for _, v := range [...]string{x.in.promptCacheKey, x.in.user, x.in.metadataUser} {
		if v != "" {
			return conversationHash(v)
		}
	}
	return promptPrefix(x.in)
}

// promptPrefix identifies a conversation by its beginning, which every
// turn repeats: the model, the system prompt and the first user turn
// (OpenAI messages, Anthropic system + messages, Responses instructions +
// input, Gemini systemInstruction + contents). 0 when the body has none.
// It scans the body's bytes without decoding them; each part is hashed
// on its own, so the spacing between turns does not count.
func promptPrefix(in *inbound) uint64 {
	if !in.isJSON {
		return 0
	}
	h := xxhash.Sum64String(in.model)
	found := false
	for _, v := range in.system {
		if v != nil {
			h = mix(h, xxhash.Sum64(v))
			found = true
		}
	}
	turns, input := in.turns, in.input
	if turns == nil && len(input) > 0 {
		if input[0] != '[' {
			return nonZero(mix(h, xxhash.Sum64(input))) // one string: the whole conversation
		}
		turns = input
	}
	if len(turns) > 0 && turns[0] == '[' {
		for i := skipSpace(turns, 1); i < len(turns) && turns[i] != ']'; {
			end := skipValue(turns, i)
			t := turns[i:end]
			h = mix(h, xxhash.Sum64(t))
			found = true
			if !bytes.Contains(t, systemRole) && !bytes.Contains(t, developerRole) {
				break // the first turn past the system prompt
			}
			if i = skipSpace(turns, end); i < len(turns) && turns[i] == ',' {
				i = skipSpace(turns, i+1)
			}
		}
	}
	if !found {
		return 0
	}
	return nonZero(h)
}

// mix adds a part's hash to the hash of the parts before it (in order:
// "a","bc" is not "ab","c" nor "bc","a").
func mix(h, part uint64) uint64 { return score(h*0x9e3779b97f4a7c15, part) }

// nonZero keeps a conversation's hash from meaning "none".
func nonZero(h uint64) uint64 { return max(h, 1) }

var (
	systemRole    = []byte(`"system"`)
	developerRole = []byte(`"developer"`)
)

// The hashes are xxHash64, unseeded: the same on every instance and after
// every restart, so that they all send a conversation to the same upstream
// and key.

// conversationHash is the conversation's half of every rendezvous score,
// from what names it; 0 (none) for "".
func conversationHash(conv string) uint64 {
	if conv == "" {
		return 0
	}
	return nonZero(xxhash.Sum64String(conv))
}

// idHash is an upstream's (by its URL) or a key's (by its fingerprint)
// half, computed once at provisioning.
func idHash(id string) uint64 { return xxhash.Sum64String(id) ^ 0x9e3779b97f4a7c15 }

// score is the rendezvous score of a conversation on one key: uniform
// over 64 bits, the highest wins.
func score(conv, id uint64) uint64 {
	h := conv ^ id
	h ^= h >> 33 // murmur3's finaliser: every bit of both halves counts
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// weight is the rendezvous score of a conversation on an upstream of
// weight w, by the logarithmic method: -w / ln(u), u uniform in (0,1).
func weight(conv, id uint64, w int) float64 {
	u := (float64(score(conv, id)>>11) + 0.5) / (1 << 53)
	return -float64(max(w, 1)) / math.Log(u)
}
