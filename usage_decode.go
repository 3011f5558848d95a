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

// The members each object has, as encoding/json names its fields.
var (
	usageNames = []string{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
		"completion_tokens_details", "input_tokens", "output_tokens", "input_tokens_details",
		"output_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens"}
	geminiNames = []string{"promptTokenCount", "candidatesTokenCount", "totalTokenCount",
		"cachedContentTokenCount", "thoughtsTokenCount"}
	cachedNames    = []string{"cached_tokens"}
	reasoningNames = []string{"reasoning_tokens"}
)

// decode decodes raw, a usage object, into f; false when encoding/json
// would have returned an error.
func (f *usageFields) decode(raw []byte) bool {
	return json.Valid(raw) && decodeMembers(raw, usageNames, func(name string, v []byte) bool {
		switch name {
		case "prompt_tokens":
			return setCount(&f.PromptTokens, v)
		case "completion_tokens":
			return setCount(&f.CompletionTokens, v)
		case "total_tokens":
			return setCount(&f.TotalTokens, v)
		case "input_tokens":
			return setCount(&f.InputTokens, v)
		case "output_tokens":
			return setCount(&f.OutputTokens, v)
		case "cache_read_input_tokens":
			return setCount(&f.CacheRead, v)
		case "cache_creation_input_tokens":
			return setCount(&f.CacheCreation, v)
		case "prompt_tokens_details":
			return setDetails(&f.PromptDetails, v, cachedNames, func(d *cachedDetails) **int64 { return &d.CachedTokens })
		case "input_tokens_details":
			return setDetails(&f.InputDetails, v, cachedNames, func(d *cachedDetails) **int64 { return &d.CachedTokens })
		case "completion_tokens_details":
			return setDetails(&f.CompletionDetails, v, reasoningNames, func(d *reasoningDetails) **int64 { return &d.ReasoningTokens })
		default: // output_tokens_details
			return setDetails(&f.OutputDetails, v, reasoningNames, func(d *reasoningDetails) **int64 { return &d.ReasoningTokens })
		}
	})
}

// decode decodes raw, Gemini's usageMetadata object, into g; false when
// encoding/json would have returned an error.
func (g *geminiUsage) decode(raw []byte) bool {
	return json.Valid(raw) && decodeMembers(raw, geminiNames, func(name string, v []byte) bool {
		switch name {
		case "promptTokenCount":
			return setCount(&g.Prompt, v)
		case "candidatesTokenCount":
			return setCount(&g.Candidates, v)
		case "totalTokenCount":
			return setCount(&g.Total, v)
		case "cachedContentTokenCount":
			return setCount(&g.Cached, v)
		default: // thoughtsTokenCount
			return setCount(&g.Thoughts, v)
		}
	})
}

// decodeMembers calls set with the name in names of each member of the
// valid JSON value raw that has one, and its value; false when raw is no
// object or set fails (every member is still visited, as encoding/json
// goes on after a type error).
func decodeMembers(raw []byte, names []string, set func(name string, v []byte) bool) bool {
	if i := skipSpace(raw, 0); i >= len(raw) || raw[i] != '{' {
		return false
	}
	ok := true
	members(raw, func(k []byte, vs, ve int) {
		if name := fieldName(names, k); name != "" && !set(name, raw[vs:ve]) {
			ok = false
		}
	})
	return ok
}

// fieldName finds k in names: exactly, else as encoding/json folds names
// ("" when none).
func fieldName(names []string, k []byte) string {
	for _, n := range names {
		if string(k) == n {
			return n
		}
	}
	for _, n := range names {
		if bytes.EqualFold(k, []byte(n)) {
			return n
		}
	}
	return ""
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
func setDetails[T any](dst **T, v []byte, names []string, count func(*T) **int64) bool {
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
	return decodeMembers(v, names, func(_ string, c []byte) bool { return setCount(count(*dst), c) })
}
