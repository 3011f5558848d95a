package llmstream

import (
	"encoding/json"
	"reflect"
	"testing"
)

var usageDecodeSeeds = []string{
	`{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":5,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}`,
	`{"input_tokens":10,"input_tokens_details":{"cached_tokens":4},"output_tokens":20,"output_tokens_details":{"reasoning_tokens":7},"total_tokens":30}`,
	`{"input_tokens":3,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1,"service_tier":"standard"}`,
	`{"promptTokenCount":8,"candidatesTokenCount":4,"totalTokenCount":20,"cachedContentTokenCount":2,"thoughtsTokenCount":8,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}]}`,
	`{}`, ` { "prompt_tokens" : 1 } `, `{"prompt_tokens":null}`, `{"prompt_tokens":1,"prompt_tokens":null}`,
	`{"prompt_tokens":1.5}`, `{"prompt_tokens":1e3}`, `{"prompt_tokens":-0}`, `{"prompt_tokens":"9"}`,
	`{"prompt_tokens":true}`, `{"prompt_tokens":99999999999999999999}`, `{"prompt_tokens":-9223372036854775808}`,
	`{"PROMPT_TOKENS":4}`, `{"Prompt_Tokens":4,"prompt_tokens":5}`, `{"prompt_tokens":5,"PROMPT_TOKENS":4}`,
	`{"prompt_tok\u0065ns":6}`, `{"prompt_tokens_details":null}`, `{"prompt_tokens_details":5}`,
	`{"prompt_tokens_details":[]}`, `{"prompt_tokens_details":{"cached_tokens":"x"}}`,
	`{"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":{"other":2}}`,
	`{"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":{"cached_tokens":null}}`,
	`{"completion_tokens_details":{"REASONING_TOKENS":3}}`, `{"total_tokens":1,"unknown":{"a":[1,2,{"b":"c"}]},"output_tokens":2}`,
	`{"prompt_tokens":1,}`, `{"prompt_tokens":1`, `{"prompt_tokens":1} x`, `{"a":"\u00"}`, `[1,2]`,
	`{"promptTokenCount":"1"}`, `{"PROMPTTOKENCOUNT":2,"thoughtsTokenCount":null}`, "{\"prompt_\xfftokens\":1}",
	`{"\u212aeep":1,"prompt_to\u212aens":2,"total_\u212bokens":3}`, `{"total_tokenſ":3}`,
}

// The hand decoder must give what encoding/json gives for every input:
// the same success, and the same counts when it succeeds.
func TestUsageDecodeMatchesEncodingJSON(t *testing.T) {
	for _, s := range usageDecodeSeeds {
		compareUsageDecode(t, []byte(s))
	}
}

func FuzzUsageDecode(f *testing.F) {
	for _, s := range usageDecodeSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(compareUsageDecode)
}

func compareUsageDecode(t *testing.T, raw []byte) {
	if !isObject(raw) { // what readJSON decodes
		return
	}
	var mine, theirs usageFields
	ok, err := mine.decode(raw), json.Unmarshal(raw, &theirs)
	if ok != (err == nil) {
		t.Fatalf("%s: decoded %v, encoding/json: %v", raw, ok, err)
	}
	if ok && !reflect.DeepEqual(mine, theirs) {
		t.Fatalf("%s: decoded %s, encoding/json %s", raw, jsonOf(mine), jsonOf(theirs))
	}
	var gm, gt geminiUsage
	ok, err = gm.decode(raw), json.Unmarshal(raw, &gt)
	if ok != (err == nil) {
		t.Fatalf("%s: decoded (gemini) %v, encoding/json: %v", raw, ok, err)
	}
	if ok && !reflect.DeepEqual(gm, gt) {
		t.Fatalf("%s: decoded (gemini) %s, encoding/json %s", raw, jsonOf(gm), jsonOf(gt))
	}
}

func jsonOf(v any) string { b, _ := json.Marshal(v); return string(b) }

// BenchmarkUsageDecode compares, side by side, decoding an OpenAI usage
// object with encoding/json (as before) and by hand.
func BenchmarkUsageDecode(b *testing.B) {
	raw := []byte(usageDecodeSeeds[0])
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var f usageFields
			if json.Unmarshal(raw, &f) != nil {
				b.Fatal("not decoded")
			}
		}
	})
	b.Run("by-hand", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var f usageFields
			if !f.decode(raw) {
				b.Fatal("not decoded")
			}
		}
	})
}
