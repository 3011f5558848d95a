package cache

import (
	"strings"
	"testing"
)

// A streamed answer with a tool call, as OpenAI sends it, assembles into
// the object a plain request gets; that object streams back into chunks
// that assemble to the same bytes.
func TestConvertToolCallsRoundTrip(t *testing.T) {
	head := `data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000001,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[{"index":0,`
	stream := head + `"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}]}` + "\r\n\r\n" +
		head + `"delta":{},"logprobs":null,"finish_reason":"tool_calls"}]}` + "\n\n" +
		`data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000001,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":80,"completion_tokens":15,"total_tokens":95}}` + "\n\n" +
		"data: [DONE]\n\n"
	want := `{"id":"chatcmpl-9","object":"chat.completion","created":1700000001,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}],"refusal":null},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":80,"completion_tokens":15,"total_tokens":95},"system_fingerprint":"fp_1"}`
	got, ok := StreamToJSON([]byte(stream))
	if !ok || string(got) != want {
		t.Fatalf("assembled %s\nwant      %s", got, want)
	}
	back, ok := JSONToStream(got)
	if !ok || !strings.HasSuffix(string(back), "data: [DONE]\n\n") {
		t.Fatalf("streamed back %s", back)
	}
	again, ok := StreamToJSON(back)
	if !ok || string(again) != want {
		t.Fatalf("round trip %s\nwant       %s", again, want)
	}
}

func TestConvertRefusesOtherFormats(t *testing.T) {
	for _, s := range []string{
		"event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
		"data: {\"candidates\":[]}\n\n",
		"data: not json\n\n",
		"",
	} {
		if _, ok := StreamToJSON([]byte(s)); ok {
			t.Errorf("%q converted", s)
		}
	}
	if _, ok := JSONToStream([]byte(`{"type":"message","content":[]}`)); ok {
		t.Error("an Anthropic message converted")
	}
}
