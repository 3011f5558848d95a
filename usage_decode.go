package llmstream

import (
	"bytes"
	"encoding/json"
	"strconv"
)

// Usage objects are decoded once per answer, on every answer: by hand
// rather than with encoding/json's reflection (about 6 µs a request), with
// exactly its result for every input (TestUsageDecodeMatchesEncodingJSON):
// names match exactly, else case-insensitively; the last of repeated
// members wins; a null clears a count; a count that is not an integer, or
// an object that is not valid JSON, fails the whole object.

var (
	usageNames = memberNames("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
		"completion_tokens_details", "input_tokens", "output_tokens", "input_tokens_details",
		"output_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens")
	geminiNames    = memberNames("promptTokenCount", "candidatesTokenCount", "totalTokenCount", "cachedContentTokenCount", "thoughtsTokenCount")
	cachedNames    = memberNames("cached_tokens")
	reasoningNames = memberNames("reasoning_tokens")
)

func memberNames(n ...string) [][]byte {
	b := make([][]byte, len(n))
	for i, s := range n {
		b[i] = []byte(s)
	}
	return b
}

// decode decodes raw, a usage object, into f; false when encoding/json
// would have returned an error.
func (f *usageFields) decode(raw []byte) bool {
	return json.Valid(raw) && decodeMembers(raw, usageNames, func(i int, v []byte) bool {
		switch i {
		case 0:
			return setCount(&f.PromptTokens, v)
		case 1:
			return setCount(&f.CompletionTokens, v)
		case 2:
			return setCount(&f.TotalTokens, v)
		case 3:
			return setDetails(&f.PromptDetails, v, cachedNames, func(d *cachedDetails) **int64 { return &d.CachedTokens })
		case 4:
			return setDetails(&f.CompletionDetails, v, reasoningNames, func(d *reasoningDetails) **int64 { return &d.ReasoningTokens })
		case 5:
			return setCount(&f.InputTokens, v)
		case 6:
			return setCount(&f.OutputTokens, v)
		case 7:
			return setDetails(&f.InputDetails, v, cachedNames, func(d *cachedDetails) **int64 { return &d.CachedTokens })
		case 8:
			return setDetails(&f.OutputDetails, v, reasoningNames, func(d *reasoningDetails) **int64 { return &d.ReasoningTokens })
		case 9:
			return setCount(&f.CacheRead, v)
		default:
			return setCount(&f.CacheCreation, v)
		}
	})
}

// decode decodes raw, Gemini's usageMetadata object, into g; false when
// encoding/json would have returned an error.
func (g *geminiUsage) decode(raw []byte) bool {
	counts := [...]**int64{&g.Prompt, &g.Candidates, &g.Total, &g.Cached, &g.Thoughts}
	return json.Valid(raw) && decodeMembers(raw, geminiNames, func(i int, v []byte) bool { return setCount(counts[i], v) })
}

// decodeMembers calls set with the index in names of each member of the
// valid JSON value raw that names one, and its value; false when raw is no
// object or set fails (every member is still visited, as encoding/json
// goes on after a type error).
func decodeMembers(raw []byte, names [][]byte, set func(i int, v []byte) bool) bool {
	if i := skipSpace(raw, 0); i >= len(raw) || raw[i] != '{' {
		return false
	}
	ok := true
	members(raw, func(k []byte, vs, ve int) {
		if i := nameIndex(names, k); i >= 0 && !set(i, raw[vs:ve]) {
			ok = false
		}
	})
	return ok
}

// nameIndex finds k in names: exactly, else as encoding/json folds names.
func nameIndex(names [][]byte, k []byte) int {
	for i, n := range names {
		if bytes.Equal(n, k) {
			return i
		}
	}
	for i, n := range names {
		if bytes.EqualFold(n, k) {
			return i
		}
	}
	return -1
}

// setCount sets a count from a raw JSON value: null clears it, an integer
// sets it, anything else fails.
func setCount(dst **int64, v []byte) bool {
	if string(v) == "null" {
		*dst = nil
		return true
	}
	n, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil {
		return false
	}
	if *dst == nil {
		*dst = new(int64)
	}
	**dst = n
	return true
}

// setDetails decodes a nested details object into *dst (kept, as
// encoding/json keeps it, when a repeated member names it again): null
// clears it, an object sets its count, anything else fails.
func setDetails[T any](dst **T, v []byte, names [][]byte, count func(*T) **int64) bool {
	if string(v) == "null" {
		*dst = nil
		return true
	}
	if v[0] != '{' {
		return false
	}
	if *dst == nil {
		*dst = new(T)
	}
	return decodeMembers(v, names, func(_ int, c []byte) bool { return setCount(count(*dst), c) })
}
