package llmstream

import (
	"bufio"
	"compress/gzip"
	"crypto/tls"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// providerStream is what one provider sends for one request, in the shape
// providers send it in 2026: its own headers, the body in the pieces it is
// written (and flushed) in, pauses between them, and the usage it reports.
type providerStream struct {
	name        string
	path        string // the request path (and query)
	body        string // the request body
	contentType string
	header      map[string]string
	pieces      []string
	pause       map[int]time.Duration // before piece i
	headersLate time.Duration         // the headers wait this long too (a reasoning model)
	gzip        bool                  // compress whenever the request allows it

	// the usage the handler must read, in its one meaning: prompt counts
	// every input token (cached and cache writes included), completion
	// every output token (reasoning included)
	prompt, completion, total     int64
	cached, cacheWrite, reasoning int64
}

func (p *providerStream) answer() string { return strings.Join(p.pieces, "") }

// sseEvents joins events (name, data) into text/event-stream bytes.
func sseEvents(sep string, events ...[2]string) []string {
	var out []string
	for _, ev := range events {
		s := ""
		if ev[0] != "" {
			s = "event: " + ev[0] + sep
		}
		out = append(out, s+"data: "+ev[1]+sep+sep)
	}
	return out
}

var openAIHeaders = map[string]string{
	"x-request-id":                   "req_8f2a6c1d0e9b4c7a",
	"openai-processing-ms":           "412",
	"openai-version":                 "2020-10-01",
	"openai-organization":            "user-abc",
	"x-ratelimit-limit-requests":     "10000",
	"x-ratelimit-remaining-requests": "9999",
	"x-ratelimit-reset-requests":     "6ms",
	"x-ratelimit-limit-tokens":       "30000000",
	"x-ratelimit-remaining-tokens":   "29999990",
	"x-ratelimit-reset-tokens":       "0s",
	// Cloudflare in front of the API: its cookie and its HTTP/3
	// advertisement describe the provider's edge, not us.
	"set-cookie": "__cf_bm=8kQe2; path=/; expires=Sun, 29-Nov-26 10:30:00 GMT; domain=.api.openai.com; HttpOnly; Secure",
	"alt-svc":    `h3=":443"; ma=86400`,
	"cf-ray":     "8e4a2b1c9d0f3e21-FRA",
}

var anthropicHeaders = map[string]string{
	"request-id":                              "req_011CV8t2cLQ4bGvFqWzd3mXk",
	"anthropic-organization-id":               "0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
	"anthropic-ratelimit-requests-limit":      "4000",
	"anthropic-ratelimit-requests-remaining":  "3999",
	"anthropic-ratelimit-requests-reset":      "2026-11-29T10:00:01Z",
	"anthropic-ratelimit-input-tokens-limit":  "2000000",
	"anthropic-ratelimit-output-tokens-limit": "400000",
}

// providerStreams are the fixtures. Their shapes follow the providers'
// API references: the Responses API's typed events (reasoning summaries,
// function-call argument deltas, response.completed with usage),
// Anthropic's extended thinking and tool use (ping, thinking_delta,
// signature_delta, input_json_delta), Gemini's streamGenerateContent with
// alt=sse (CRLF line ends), and a reasoning model silent before its first
// token.
func providerStreams(silence time.Duration) []*providerStream {
	responses := sseEvents("\n",
		[2]string{"response.created", `{"type":"response.created","sequence_number":0,"response":{"id":"resp_68a1f0c2","object":"response","created_at":1764410000,"status":"in_progress","model":"o4-mini-2025-04-16","output":[],"usage":null}}`},
		[2]string{"response.in_progress", `{"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_68a1f0c2","object":"response","status":"in_progress","output":[],"usage":null}}`},
		[2]string{"response.output_item.added", `{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"rs_01","type":"reasoning","summary":[]}}`},
		[2]string{"response.reasoning_summary_part.added", `{"type":"response.reasoning_summary_part.added","sequence_number":3,"item_id":"rs_01","output_index":0,"summary_index":0,"part":{"type":"summary_text","text":""}}`},
		[2]string{"response.reasoning_summary_text.delta", `{"type":"response.reasoning_summary_text.delta","sequence_number":4,"item_id":"rs_01","output_index":0,"summary_index":0,"delta":"**Checking the weather tool**"}`},
		[2]string{"response.reasoning_summary_text.done", `{"type":"response.reasoning_summary_text.done","sequence_number":5,"item_id":"rs_01","output_index":0,"summary_index":0,"text":"**Checking the weather tool**"}`},
		[2]string{"response.output_item.added", `{"type":"response.output_item.added","sequence_number":6,"output_index":1,"item":{"id":"fc_01","type":"function_call","status":"in_progress","arguments":"","call_id":"call_x1","name":"get_weather"}}`},
		[2]string{"response.function_call_arguments.delta", `{"type":"response.function_call_arguments.delta","sequence_number":7,"item_id":"fc_01","output_index":1,"delta":"{\"city\":"}`},
		[2]string{"response.function_call_arguments.delta", `{"type":"response.function_call_arguments.delta","sequence_number":8,"item_id":"fc_01","output_index":1,"delta":"\"Paris\"}"}`},
		[2]string{"response.function_call_arguments.done", `{"type":"response.function_call_arguments.done","sequence_number":9,"item_id":"fc_01","output_index":1,"arguments":"{\"city\":\"Paris\"}"}`},
		[2]string{"response.output_item.added", `{"type":"response.output_item.added","sequence_number":10,"output_index":2,"item":{"id":"msg_01","type":"message","status":"in_progress","content":[],"role":"assistant"}}`},
		[2]string{"response.content_part.added", `{"type":"response.content_part.added","sequence_number":11,"item_id":"msg_01","output_index":2,"content_index":0,"part":{"type":"output_text","annotations":[],"text":""}}`},
		[2]string{"response.output_text.delta", `{"type":"response.output_text.delta","sequence_number":12,"item_id":"msg_01","output_index":2,"content_index":0,"delta":"Il fait beau","logprobs":[]}`},
		[2]string{"response.output_text.delta", `{"type":"response.output_text.delta","sequence_number":13,"item_id":"msg_01","output_index":2,"content_index":0,"delta":" à Paris — 21 °C.","logprobs":[]}`},
		[2]string{"response.output_text.done", `{"type":"response.output_text.done","sequence_number":14,"item_id":"msg_01","output_index":2,"content_index":0,"text":"Il fait beau à Paris — 21 °C.","logprobs":[]}`},
		[2]string{"response.completed", `{"type":"response.completed","sequence_number":15,"response":{"id":"resp_68a1f0c2","object":"response","created_at":1764410000,"status":"completed","model":"o4-mini-2025-04-16","usage":{"input_tokens":81,"input_tokens_details":{"cached_tokens":64},"output_tokens":138,"output_tokens_details":{"reasoning_tokens":96},"total_tokens":219}}}`},
	)
	anthropic := sseEvents("\n",
		[2]string{"message_start", `{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2}}}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}`},
		[2]string{"ping", `{"type": "ping"}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user wants the weather; I should call get_weather."}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":0}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ncisco, CA\"}"}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":1}`},
		[2]string{"message_delta", `{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}`},
		[2]string{"message_stop", `{"type":"message_stop"}`},
	)
	gemini := sseEvents("\r\n",
		[2]string{"", `{"candidates": [{"content": {"parts": [{"text": "Hallo"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 9,"totalTokenCount": 9,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 9}]},"modelVersion": "gemini-2.5-flash","responseId": "kFAqaeXnBcOvkdUP1"}`},
		[2]string{"", `{"candidates": [{"content": {"parts": [{"text": ", Welt! Wie geht's?"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 9,"totalTokenCount": 9},"modelVersion": "gemini-2.5-flash","responseId": "kFAqaeXnBcOvkdUP1"}`},
		[2]string{"", `{"candidates": [{"content": {"parts": [{"text": ""}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 9,"candidatesTokenCount": 12,"totalTokenCount": 45,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 9}],"thoughtsTokenCount": 24},"modelVersion": "gemini-2.5-flash","responseId": "kFAqaeXnBcOvkdUP1"}`},
	)
	reasoning := sseEvents("\n",
		[2]string{"", `{"id":"chatcmpl-CfRk2","object":"chat.completion.chunk","created":1764410000,"model":"o3-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null,"obfuscation":"Yk2"}`},
		[2]string{"", `{"id":"chatcmpl-CfRk2","object":"chat.completion.chunk","created":1764410000,"model":"o3-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"42"},"finish_reason":null}],"usage":null,"obfuscation":"q"}`},
		[2]string{"", `{"id":"chatcmpl-CfRk2","object":"chat.completion.chunk","created":1764410000,"model":"o3-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null,"obfuscation":"Ab"}`},
		[2]string{"", `{"id":"chatcmpl-CfRk2","object":"chat.completion.chunk","created":1764410000,"model":"o3-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[],"usage":{"prompt_tokens":16,"completion_tokens":1811,"total_tokens":1827,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":1792,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"xy"}`},
	)
	reasoning = append(reasoning, "data: [DONE]\n\n")
	// An event cut in two with a pause longer than the heartbeat in the
	// middle: no heartbeat may land inside it.
	cut := sseEvents("\n",
		[2]string{"", `{"id":"chatcmpl-cut","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":[{"index":0,"delta":{"role":"assistant","content":"Bonjour"},"finish_reason":null}],"usage":null}`},
		[2]string{"", `{"id":"chatcmpl-cut","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":[{"index":0,"delta":{"content":" tout le monde"},"finish_reason":"stop"}],"usage":null}`},
		[2]string{"", `{"id":"chatcmpl-cut","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4,"total_tokens":11}}`},
	)
	half := len(cut[1]) / 2
	cut = append([]string{cut[0], cut[1][:half], cut[1][half:]}, cut[2:]...)
	cut = append(cut, "data: [DONE]\n\n")

	// Anthropic with prompt caching: input_tokens leaves out the tokens read
	// from and written to the cache; message_delta repeats the counts.
	anthropicCached := sseEvents("\n",
		[2]string{"message_start", `{"type":"message_start","message":{"id":"msg_01Cache7","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":22,"cache_creation_input_tokens":512,"cache_read_input_tokens":2048,"cache_creation":{"ephemeral_5m_input_tokens":512,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Section 4.2 says the tenant pays."}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":0}`},
		[2]string{"message_delta", `{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":22,"cache_creation_input_tokens":512,"cache_read_input_tokens":2048,"output_tokens":57}}`},
		[2]string{"message_stop", `{"type":"message_stop"}`},
	)
	// Ollama's native chat API: NDJSON, usage in the last line.
	ollama := []string{
		`{"model":"llama3.2","created_at":"2026-11-29T10:00:00.1Z","message":{"role":"assistant","content":"Hello"},"done":false}` + "\n",
		`{"model":"llama3.2","created_at":"2026-11-29T10:00:00.2Z","message":{"role":"assistant","content":" there!"},"done":false}` + "\n",
		`{"model":"llama3.2","created_at":"2026-11-29T10:00:00.3Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}` + "\n",
	}

	return []*providerStream{
		{name: "anthropic prompt cache", path: "/v1/messages", contentType: "text/event-stream; charset=utf-8", header: anthropicHeaders,
			body:   `{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"system":[{"type":"text","text":"<contract>…</contract>","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"Who pays?"}]}`,
			pieces: anthropicCached,
			prompt: 2582, completion: 57, total: 2639, cached: 2048, cacheWrite: 512},
		{name: "anthropic cached json answer", path: "/v1/messages", contentType: "application/json", header: anthropicHeaders,
			body:   `{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Who pays, in short?"}]}`,
			pieces: []string{`{"id":"msg_01Plain","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"The tenant."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":30,"cache_creation_input_tokens":0,"cache_read_input_tokens":2560,"output_tokens":5}}`},
			prompt: 2590, completion: 5, total: 2595, cached: 2560},
		{name: "gemini cached content json answer", path: "/v1beta/models/gemini-2.5-pro:generateContent", contentType: "application/json; charset=UTF-8",
			header: map[string]string{"x-goog-request-id": "gem-2"},
			body:   `{"cachedContent":"cachedContents/abc","contents":[{"role":"user","parts":[{"text":"Summarise"}]}]}`,
			pieces: []string{`{"candidates":[{"content":{"parts":[{"text":"A lease."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4130,"candidatesTokenCount":3,"totalTokenCount":4161,"cachedContentTokenCount":4096,"thoughtsTokenCount":28},"modelVersion":"gemini-2.5-pro","responseId":"gem2resp"}`},
			prompt: 4130, completion: 31, total: 4161, cached: 4096, reasoning: 28},
		{name: "responses api json answer", path: "/v1/responses", contentType: "application/json", header: openAIHeaders,
			body:   `{"model":"gpt-5","input":"Hi again"}`,
			pieces: []string{`{"id":"resp_0b1c","object":"response","created_at":1764410000,"status":"completed","model":"gpt-5-2025-08-07","output":[{"id":"msg_0b1c","type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"text":"Hello again."}],"role":"assistant"}],"usage":{"input_tokens":1290,"input_tokens_details":{"cached_tokens":1152},"output_tokens":210,"output_tokens_details":{"reasoning_tokens":192},"total_tokens":1500}}`},
			prompt: 1290, completion: 210, total: 1500, cached: 1152, reasoning: 192},
		{name: "ollama native ndjson", path: "/api/chat", contentType: "application/x-ndjson",
			body:   `{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}`,
			pieces: ollama, pause: map[int]time.Duration{1: silence / 6},
			prompt: 26, completion: 282, total: 308},
		{name: "responses api", path: "/v1/responses", contentType: "text/event-stream; charset=utf-8", header: openAIHeaders,
			body:   `{"model":"o4-mini","stream":true,"input":"Weather in Paris?","tools":[{"type":"function","name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}],"reasoning":{"summary":"auto"}}`,
			pieces: responses, pause: map[int]time.Duration{4: silence / 4, 12: silence / 4},
			prompt: 81, completion: 138, total: 219, cached: 64, reasoning: 96},
		{name: "anthropic thinking and tool use", path: "/v1/messages", contentType: "text/event-stream; charset=utf-8", header: anthropicHeaders,
			body:   `{"model":"claude-sonnet-4-5","max_tokens":2048,"stream":true,"thinking":{"type":"enabled","budget_tokens":1024},"tools":[{"name":"get_weather","input_schema":{"type":"object"}}],"messages":[{"role":"user","content":"Weather in SF?"}]}`,
			pieces: anthropic, pause: map[int]time.Duration{2: silence / 3},
			prompt: 472, completion: 89, total: 561},
		{name: "gemini alt=sse", path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", contentType: "text/event-stream",
			header: map[string]string{"x-goog-request-id": "gem-1", "server-timing": "gfet4t7; dur=412"},
			body:   `{"contents":[{"role":"user","parts":[{"text":"Sag hallo"}]}]}`,
			pieces: gemini, pause: map[int]time.Duration{1: silence / 4},
			prompt: 9, completion: 36, total: 45, reasoning: 24}, // Gemini counts thoughts apart from candidates
		{name: "reasoning model silent before its first token", path: "/v1/chat/completions", contentType: "text/event-stream; charset=utf-8", header: openAIHeaders,
			body:   `{"model":"o3","stream":true,"stream_options":{"include_usage":true},"reasoning_effort":"high","messages":[{"role":"user","content":"6*7?"}]}`,
			pieces: reasoning, pause: map[int]time.Duration{0: silence},
			prompt: 16, completion: 1811, total: 1827, reasoning: 1792},
		{name: "reasoning model whose headers wait too", path: "/v1/chat/completions", contentType: "text/event-stream; charset=utf-8", header: openAIHeaders,
			body:   `{"model":"o3","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"6*7?"}]}`,
			pieces: reasoning, headersLate: silence,
			prompt: 16, completion: 1811, total: 1827, reasoning: 1792},
		{name: "event cut by a pause", path: "/v1/chat/completions", contentType: "text/event-stream; charset=utf-8", header: openAIHeaders,
			body:   `{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"salut"}]}`,
			pieces: cut, pause: map[int]time.Duration{2: silence / 2},
			prompt: 7, completion: 4, total: 11},
		{name: "gzip json answer", path: "/v1/chat/completions", contentType: "application/json", header: openAIHeaders, gzip: true,
			body:   `{"model":"gpt-4.1","messages":[{"role":"user","content":"salut"}]}`,
			pieces: []string{`{"id":"chatcmpl-gz","object":"chat.completion","created":1,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Salut !","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":null}`},
			prompt: 9, completion: 3, total: 12},
	}
}

// newProviderServer serves the fixtures over TLS with HTTP/2, as every
// hosted model API does.
func newProviderServer(t *testing.T, streams []*providerStream) *fakeUpstream {
	byKey := map[string]*providerStream{}
	for _, s := range streams {
		byKey[s.body] = s
	}
	return newUpstream(t, overTLS(), answering(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s := byKey[string(b)]
		if s == nil || r.URL.RequestURI() != s.path {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		s.serve(w, r)
	}))
}

// serve writes the fixture as the provider does: headers (late, when
// headersLate), then the pieces with their pauses, gzip-compressed when
// the fixture says so.
func (s *providerStream) serve(w http.ResponseWriter, r *http.Request) {
	if s.headersLate > 0 {
		select {
		case <-time.After(s.headersLate):
		case <-r.Context().Done():
			return
		}
	}
	for k, v := range s.header {
		w.Header().Set(k, v)
	}
	w.Header().Set("Content-Type", s.contentType)
	var out io.Writer = w
	if s.gzip && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") || s.gzip && r.Header.Get("Accept-Encoding") == "identity" {
		// Some providers compress a whole answer even when asked for
		// identity; the handler decodes it.
		w.Header().Set("Content-Encoding", "gzip")
		zw := gzip.NewWriter(w)
		defer zw.Close()
		out = zw
	}
	w.WriteHeader(http.StatusOK)
	for i, p := range s.pieces {
		if d := s.pause[i]; d > 0 {
			_ = http.NewResponseController(w).Flush()
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(out, p)
		if out == io.Writer(w) {
			_ = http.NewResponseController(w).Flush()
		}
	}
}

// Every fixture is relayed byte-exact (heartbeats only between events)
// with its usage read exactly, from an HTTP/2-over-TLS upstream, to
// HTTP/1.1 and HTTP/2 clients.
func TestProviderStreamsRelayedExactly(t *testing.T) {
	const silence = 600 * time.Millisecond // a reasoning model's minutes, scaled down
	streams := providerStreams(silence)
	up := newProviderServer(t, streams)
	directives := `llm_stream ` + up.URL + ` {
		api_key sk-test-provider-key
		allow_paths /v1/* /v1beta/* /api/*
		heartbeat 50ms
		idle_timeout 3s
		first_byte_timeout 3s
		transport http {
			tls_trust_pool file ` + up.caFile + `
		}
	}`
	for _, client := range []struct {
		name  string
		c     *instance
		proto string
		do    *http.Client
	}{
		{name: "HTTP/1.1 client", proto: "HTTP/1.1"},
		{name: "HTTP/2 client", proto: "HTTP/2.0"},
	} {
		t.Run(client.name, func(t *testing.T) {
			var c *instance
			hc := &http.Client{Transport: &http.Transport{DisableCompression: true}}
			if client.proto == "HTTP/2.0" {
				c = startCaddyTLS(t, directives)
				hc = &http.Client{Transport: &http.Transport{DisableCompression: true, ForceAttemptHTTP2: true,
					TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // Caddy's internal CA, in a test
			} else {
				c = startCaddy(t, directives)
			}
			for _, s := range streams {
				t.Run(s.name, func(t *testing.T) {
					req, _ := http.NewRequest(http.MethodPost, c.base()+s.path, strings.NewReader(s.body))
					req.Header.Set("Content-Type", "application/json")
					resp, err := hc.Do(req)
					if err != nil {
						t.Fatal(err)
					}
					defer resp.Body.Close()
					if resp.Proto != client.proto {
						t.Fatalf("the client spoke %s, want %s", resp.Proto, client.proto)
					}
					got, err := io.ReadAll(bufio.NewReader(resp.Body))
					if err != nil {
						t.Fatal(err)
					}
					checkRelayed(t, s, resp, string(got))
					// The client's HTTP/3 advertisement is Caddy's (on for
					// HTTPS sites), never the provider's; its cookies stay.
					wantAlt := ""
					if c.tls {
						wantAlt = `h3=":` + strconv.Itoa(c.port) + `"`
					}
					if alt := resp.Header.Get("Alt-Svc"); !strings.HasPrefix(alt, wantAlt) || wantAlt == "" && alt != "" {
						t.Errorf("Alt-Svc %q, want Caddy's own (%q…)", alt, wantAlt)
					}
					if sc := resp.Header.Values("Set-Cookie"); len(sc) > 0 {
						t.Errorf("the provider's cookies reached the client: %q", sc)
					}
					id := resp.Header.Get("X-Request-Id")
					line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(c.waitLog(`"request_id":"` + id + `"`))
					upID := s.header["x-request-id"] + s.header["request-id"]
					if upID == "" {
						upID = answerID([]byte(s.answer()))
					}
					for _, want := range []string{
						`"upstream_request_id":"` + upID + `"`,
						`"usage_status":"exact"`,
						`"prompt_tokens":` + itoa(s.prompt) + `,`,
						`"completion_tokens":` + itoa(s.completion) + `,`,
						`"total_tokens":` + itoa(s.total) + `,`,
						`"cached_tokens":` + itoa(s.cached) + `,`,
						`"cache_write_tokens":` + itoa(s.cacheWrite) + `,`,
						`"reasoning_tokens":` + itoa(s.reasoning) + `,`,
					} {
						if !strings.Contains(line, want) {
							t.Errorf("usage line lacks %s: %s", want, line)
						}
					}
				})
			}
		})
	}
	for i, r := range up.requests() {
		if r.Proto != "HTTP/2.0" {
			t.Errorf("request %d reached the provider over %s, want HTTP/2.0 (TLS, ALPN h2)", i, r.Proto)
		}
		if enc := r.Header.Get("Accept-Encoding"); enc != "identity" {
			t.Errorf("request %d asked the provider for %q, want identity", i, enc)
		}
	}
}

// checkRelayed compares what the client got with what the provider sent:
// byte for byte once the heartbeat comments are taken out, and each
// heartbeat at an event boundary.
func checkRelayed(t *testing.T, s *providerStream, resp *http.Response, got string) {
	t.Helper()
	want := s.answer()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	// (When heartbeats started the stream before the provider's headers
	// came, its id can only go to the usage line.)
	if up := resp.Header.Get("X-Upstream-Request-Id"); s.headersLate == 0 && (s.header["x-request-id"] != "" && up != s.header["x-request-id"] ||
		s.header["request-id"] != "" && up != s.header["request-id"]) {
		t.Errorf("X-Upstream-Request-Id = %q", up)
	}
	if strings.Contains(got, "sk-test-provider-key") {
		t.Fatal("the key reached the client")
	}
	if !strings.HasPrefix(s.contentType, "text/event-stream") {
		if got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
		return
	}
	const hb = ": keep-alive\n\n"
	sep := "\n\n"
	if strings.Contains(want, "\r\n") {
		sep = "\r\n\r\n"
	}
	beats := 0
	for i := strings.Index(got, hb); i >= 0; {
		beats++
		if i > 0 && !strings.HasSuffix(got[:i], sep) {
			t.Fatalf("a heartbeat inside an event at byte %d: %q", i, got[max(0, i-60):i+len(hb)])
		}
		got = got[:i] + got[i+len(hb):]
		if j := strings.Index(got[i:], hb); j >= 0 {
			i += j
		} else {
			i = -1
		}
	}
	if got != want {
		i := firstDiff(got, want)
		t.Fatalf("not byte-exact at %d: got %q, want %q", i, clip(got, i), clip(want, i))
	}
	if strings.Contains(s.name, "silent") || strings.Contains(s.name, "wait") {
		// 600ms of silence with a 50ms heartbeat.
		if beats < 5 {
			t.Errorf("%d heartbeats during the silence, want at least 5", beats)
		}
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
