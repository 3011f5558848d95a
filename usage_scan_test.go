package llmstream

import (
	"bytes"
	"testing"
)

// usageScanSeeds are event stream reads as providers send them, with and
// without usage, and the near misses the one-pass search must not confuse.
var usageScanSeeds = []string{
	string(benchChunk),
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}` + "\n\n",
	"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
	"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"I think\"}}\n\n",
	"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
	`data: {"candidates":[{"content":{"parts":[{"text":"Hi"}]}}],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":9}}` + "\r\n\r\n",
	"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"token\"}\n\n",
	`k`, `_tok`, `_tokens`, `_tokens"`, `x_tokens"`, `To`, `TokenCount`, `TokenCount"`, `tokens"`, `Tokens"`,
	`_tokenS"`, `_Tokens"`, `tokenCount"`, `kkk_tokens"kk`, `_to_tokens"`, `ToTokenCount"`, `_tokensTokenCount"`,
	`"content":"ask me about max_tokens\"`,
}

// The one-pass search answers as searching for each name would, at every
// cut of every seed (a read may end anywhere).
func TestMayHoldUsageIsTheTwoNameSearch(t *testing.T) {
	for _, seed := range usageScanSeeds {
		for i := 0; i <= len(seed); i++ {
			for _, b := range []string{seed[:i], seed[i:]} {
				if got, want := mayHoldUsage([]byte(b)), twoNameSearch([]byte(b)); got != want {
					t.Errorf("mayHoldUsage(%q) = %v, want %v", b, got, want)
				}
			}
		}
	}
}

func FuzzMayHoldUsage(f *testing.F) {
	for _, s := range usageScanSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := mayHoldUsage(b), twoNameSearch(b); got != want {
			t.Errorf("mayHoldUsage(%q) = %v, want %v", b, got, want)
		}
	})
}

// twoNameSearch is what mayHoldUsage answers, written as its definition.
func twoNameSearch(b []byte) bool {
	return bytes.Contains(b, []byte(`_tokens"`)) || bytes.Contains(b, []byte(`TokenCount"`))
}

// BenchmarkMayHoldUsage: the one-pass search beside the two searches it
// replaced, on an OpenAI chunk (run on every read of every stream).
func BenchmarkMayHoldUsage(b *testing.B) {
	for _, c := range []struct {
		name string
		f    func([]byte) bool
	}{{"two-searches", twoNameSearch}, {"one-pass", mayHoldUsage}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if c.f(benchChunk) {
					b.Fatal("no usage in the chunk")
				}
			}
		})
	}
}
