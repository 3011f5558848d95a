// Package llmmock is llm_mock, a stand-in model API for demos, tests and
// benchmarks: it answers like OpenAI and Anthropic do, headers included,
// at a configured pace. It is kept apart from llm_stream (the way
// reverse_proxy keeps forwardauth apart): neither depends on the other.
package llmmock

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cfparse"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/pace"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/wire"
)

func init() {
	caddy.RegisterModule(Mock{})
	httpcaddyfile.RegisterHandlerDirective("llm_mock", parseMockCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("llm_mock", httpcaddyfile.Before, "reverse_proxy")
}

const defaultMockText = "Caddy relays every token the moment the model produces it, " +
	"so the answer appears word by word instead of all at once. " +
	"The API key stays on the server and never reaches the browser."

// Mock is a stand-in model API for demos, tests and benchmarks. It answers
// OpenAI-style `POST …/chat/completions` (streamed as server-sent events
// ending in `data: [DONE]`, with a usage chunk when
// `stream_options.include_usage` is set, or as one JSON object),
// Anthropic-style `POST …/messages` (named events) and `GET …/models`,
// producing words of a fixed text at a fixed pace. It needs no key and
// checks none.
type Mock struct {
	// The text the model answers with, split into tokens at spaces. Default:
	// a sentence about this module.
	Text string `json:"text,omitempty"`

	// The number of tokens in an answer; the text repeats as needed. A
	// request's `max_tokens` lowers it. Default: the words of Text.
	Tokens int `json:"tokens,omitempty"`

	// The time between two streamed tokens. A negative value sends them
	// without pause. Default: 50ms.
	Interval caddy.Duration `json:"interval,omitempty"`

	// Extra wait before the first token, like a reasoning model. Default: 0.
	FirstTokenDelay caddy.Duration `json:"first_token_delay,omitempty"`

	// The model names listed by `GET /v1/models`. When set, a request for
	// any other model gets 404 `model_not_found`, as a provider answers.
	// Default: `mock-1` is listed and any name is answered.
	Models []string `json:"models,omitempty"`

	// Adds `"mock_sent_ns"` (Unix nanoseconds when the chunk was written) to
	// every streamed chunk, for latency benchmarks. Default: off.
	Stamp bool `json:"stamp,omitempty"`

	words     []string
	servesAny bool // no models configured: any name is answered
}

// mockSeq numbers answers, for unique ids.
var mockSeq atomic.Uint64

// CaddyModule returns the Caddy module information.
func (Mock) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_mock",
		New: func() caddy.Module { return new(Mock) },
	}
}

// Provision fills in defaults.
func (m *Mock) Provision(caddy.Context) error {
	if m.Text == "" {
		m.Text = defaultMockText
	}
	m.words = strings.Fields(m.Text)
	if m.Tokens <= 0 {
		m.Tokens = len(m.words)
	}
	if m.Interval == 0 {
		m.Interval = caddy.Duration(50 * time.Millisecond)
	}
	if len(m.Models) == 0 {
		m.servesAny = true
		m.Models = []string{"mock-1"}
	}
	return nil
}

type mockRequest struct {
	Model         string `json:"model"`
	Stream        bool   `json:"stream"`
	MaxTokens     int    `json:"max_tokens"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Messages []struct {
		Content any `json:"content"`
	} `json:"messages"`
	Prompt any `json:"prompt"`
}

// ServeHTTP answers like a model API.
func (m *Mock) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	switch {
	case r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/models"):
		m.serveModels(w)
		return nil
	case r.Method != http.MethodPost:
		writeError(w, http.StatusNotFound, "not_found", "unknown endpoint "+r.Method+" "+r.URL.Path)
		return nil
	}
	var req mockRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_json", "the request body is not valid JSON")
		return nil
	}
	if req.Model == "" {
		req.Model = m.Models[0]
	}
	anthropic := strings.HasSuffix(r.URL.Path, "/messages")
	providerHeaders(w.Header(), anthropic)
	if !m.serves(req.Model) {
		writeError(w, http.StatusNotFound, "model_not_found", "The model `"+req.Model+"` does not exist or you do not have access to it.")
		return nil
	}
	n := m.Tokens
	if req.MaxTokens > 0 && req.MaxTokens < n {
		n = req.MaxTokens
	}
	prompt := promptTokens(req)
	id := fmt.Sprintf("%d%06d", time.Now().Unix(), mockSeq.Add(1)%1000000)
	switch {
	case anthropic:
		m.serveAnthropic(w, r, req, id, n, prompt)
	case req.Stream:
		m.serveChatStream(w, r, req, id, n, prompt)
	default:
		m.serveChatJSON(w, req, id, n, prompt)
	}
	return nil
}

// serves reports whether the mock answers for a model name.
func (m *Mock) serves(model string) bool {
	if m.servesAny {
		return true
	}
	for _, name := range m.Models {
		if name == model {
			return true
		}
	}
	return false
}

// providerHeaders sets what providers send on every answer: their own
// request id (OpenAI `x-request-id`, Anthropic `request-id`), processing
// time and rate-limit state, and what their edge adds (the hosted APIs sit
// behind Cloudflare: its ray id, cache status and cookies). Real answers
// carry about twenty headers; a proxy's per-response work and memory
// depend on how many, so the mock sends as many.
func providerHeaders(h http.Header, anthropic bool) {
	id := "req_" + newID()
	if anthropic {
		h.Set("Request-Id", id)
		h.Set("Anthropic-Organization-Id", "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")
		h.Set("Anthropic-Ratelimit-Requests-Limit", "4000")
		h.Set("Anthropic-Ratelimit-Requests-Remaining", "3999")
		h.Set("Anthropic-Ratelimit-Requests-Reset", time.Now().Add(time.Minute).UTC().Format(time.RFC3339))
		h.Set("Anthropic-Ratelimit-Tokens-Limit", "400000")
		h.Set("Anthropic-Ratelimit-Tokens-Remaining", "399000")
		h.Set("Anthropic-Ratelimit-Input-Tokens-Limit", "2000000")
		h.Set("Anthropic-Ratelimit-Output-Tokens-Limit", "400000")
		h.Set("X-Robots-Tag", "none")
		edgeHeaders(h, ".anthropic.com")
		return
	}
	h.Set("X-Request-Id", id)
	h.Set("Access-Control-Expose-Headers", "X-Request-ID")
	h.Set("Openai-Organization", "user-llm-mock")
	h.Set("Openai-Processing-Ms", "12")
	h.Set("Openai-Project", "proj_llm_mock")
	h.Set("Openai-Version", "2020-10-01")
	h.Set("X-Envoy-Upstream-Service-Time", "14")
	h.Set("X-Ratelimit-Limit-Requests", "10000")
	h.Set("X-Ratelimit-Remaining-Requests", "9999")
	h.Set("X-Ratelimit-Reset-Requests", "6ms")
	h.Set("X-Ratelimit-Limit-Tokens", "30000000")
	h.Set("X-Ratelimit-Remaining-Tokens", "29999000")
	h.Set("X-Ratelimit-Reset-Tokens", "2ms")
	edgeHeaders(h, ".api.openai.com")
}

// edgeHeaders are what Cloudflare, in front of the hosted APIs, adds.
func edgeHeaders(h http.Header, domain string) {
	h.Set("Strict-Transport-Security", "max-age=31536000; includeSubDomains; preload")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cf-Cache-Status", "DYNAMIC")
	h.Set("Cf-Ray", newID()[:16]+"-FRA")
	h.Add("Set-Cookie", "__cf_bm=llm-mock; path=/; domain="+domain+"; HttpOnly; Secure; SameSite=None")
	h.Add("Set-Cookie", "_cfuvid=llm-mock; path=/; domain="+domain+"; HttpOnly; Secure; SameSite=None")
}

// token returns the i-th token: a word, with a leading space after the first.
func (m *Mock) token(i int) string {
	w := m.words[i%len(m.words)]
	if i > 0 {
		return " " + w
	}
	return w
}

// promptTokens is the mock's token count for a prompt: its words, plus a
// few per message, like real tokenizers' framing.
func promptTokens(req mockRequest) int {
	n := 0
	count := func(v any) {
		b, _ := json.Marshal(v)
		n += len(strings.Fields(string(b)))
	}
	for _, msg := range req.Messages {
		n += 4
		count(msg.Content)
	}
	if req.Prompt != nil {
		count(req.Prompt)
	}
	return n
}

func (m *Mock) serveModels(w http.ResponseWriter) {
	wire.WriteModelList(w, m.Models, "llm_mock", 1700000000)
}

// writeError answers with an error in the OpenAI shape.
func writeError(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	b, _ := json.Marshal(map[string]any{"error": map[string]string{
		"message": message, "type": "invalid_request_error", "code": code}})
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// newID returns a random id.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func usageJSON(prompt, completion int) string {
	return fmt.Sprintf(`{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}`, prompt, completion, prompt+completion)
}

func (m *Mock) serveChatJSON(w http.ResponseWriter, req mockRequest, id string, n, prompt int) {
	var sb strings.Builder
	for i := 0; i < n; i++ {
		sb.WriteString(m.token(i))
	}
	content, _ := json.Marshal(sb.String())
	body := fmt.Sprintf(`{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":%q,`+
		`"choices":[{"index":0,"message":{"role":"assistant","content":%s,"refusal":null},"logprobs":null,"finish_reason":"stop"}],`+
		`"usage":%s,"system_fingerprint":"fp_llm_mock"}`,
		id, time.Now().Unix(), req.Model, content, usageJSON(prompt, n))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write([]byte(body))
}

// pacer writes events at the configured pace and stops when the client
// leaves.
type pacer struct {
	w  http.ResponseWriter
	rc *http.ResponseController
	r  *http.Request
	pace.Sleeper
}

func (m *Mock) startStream(w http.ResponseWriter, r *http.Request) *pacer {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	p := &pacer{w: w, rc: http.NewResponseController(w), r: r}
	_ = p.rc.Flush()
	if m.FirstTokenDelay > 0 && !p.wait(time.Duration(m.FirstTokenDelay)) {
		return nil
	}
	return p
}

// wait sleeps for d; false when the client left meanwhile.
func (p *pacer) wait(d time.Duration) bool { return p.Sleep(p.r.Context(), d) }

func (p *pacer) send(s string) bool {
	if _, err := p.w.Write([]byte(s)); err != nil {
		return false
	}
	return p.rc.Flush() == nil
}

func (m *Mock) stamp() string {
	if !m.Stamp {
		return ""
	}
	return `,"mock_sent_ns":` + strconv.FormatInt(time.Now().UnixNano(), 10)
}

func (m *Mock) serveChatStream(w http.ResponseWriter, r *http.Request, req mockRequest, id string, n, prompt int) {
	p := m.startStream(w, r)
	if p == nil {
		return
	}
	created := time.Now().Unix()
	usage := ""
	if req.StreamOptions.IncludeUsage {
		usage = `,"usage":null`
	}
	model, _ := json.Marshal(req.Model)
	head := fmt.Sprintf(`data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s,"system_fingerprint":"fp_llm_mock","choices":[{"index":0,`, id, created, model)
	chunk := func(delta, finish string) string {
		return head + `"delta":` + delta + `,"logprobs":null,"finish_reason":` + finish + `}]` + usage + m.stamp() + "}\n\n"
	}
	if !p.send(chunk(`{"role":"assistant","content":"","refusal":null}`, "null")) {
		return
	}
	interval := time.Duration(m.Interval)
	for i := 0; i < n; i++ {
		if !p.wait(interval) {
			return
		}
		content, _ := json.Marshal(m.token(i))
		if !p.send(chunk(`{"content":`+string(content)+`}`, "null")) {
			return
		}
	}
	if !p.send(chunk(`{}`, `"stop"`)) {
		return
	}
	if req.StreamOptions.IncludeUsage {
		final := fmt.Sprintf(`data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s,"system_fingerprint":"fp_llm_mock","choices":[],"usage":%s}`+"\n\n",
			id, created, model, usageJSON(prompt, n))
		if !p.send(final) {
			return
		}
	}
	p.send("data: [DONE]\n\n")
}

func (m *Mock) serveAnthropic(w http.ResponseWriter, r *http.Request, req mockRequest, id string, n, prompt int) {
	model, _ := json.Marshal(req.Model)
	if !req.Stream {
		var sb strings.Builder
		for i := 0; i < n; i++ {
			sb.WriteString(m.token(i))
		}
		text, _ := json.Marshal(sb.String())
		body := fmt.Sprintf(`{"id":"msg_%s","type":"message","role":"assistant","model":%s,"content":[{"type":"text","text":%s}],`+
			`"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":%d,"output_tokens":%d}}`, id, model, text, prompt, n)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(body))
		return
	}
	p := m.startStream(w, r)
	if p == nil {
		return
	}
	event := func(name, data string) bool { return p.send("event: " + name + "\ndata: " + data + "\n\n") }
	if !event("message_start", fmt.Sprintf(`{"type":"message_start","message":{"id":"msg_%s","type":"message","role":"assistant","content":[],"model":%s,"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":%d,"output_tokens":1}}}`, id, model, prompt)) ||
		!event("content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`) ||
		!event("ping", `{"type": "ping"}`) {
		return
	}
	for i := 0; i < n; i++ {
		if !p.wait(time.Duration(m.Interval)) {
			return
		}
		text, _ := json.Marshal(m.token(i))
		if !event("content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":`+string(text)+`}}`) {
			return
		}
	}
	_ = event("content_block_stop", `{"type":"content_block_stop","index":0}`) &&
		event("message_delta", fmt.Sprintf(`{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":%d}}`, n)) &&
		event("message_stop", `{"type":"message_stop"}`)
}

func parseMockCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Mock)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the mock from Caddyfile tokens. Syntax:
//
//	llm_mock {
//	    text              <text>
//	    tokens            <n>
//	    interval          <duration>
//	    first_token_delay <duration>
//	    models            <name>...
//	    stamp
//	}
func (m *Mock) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "text":
			if !d.NextArg() {
				return d.ArgErr()
			}
			m.Text = d.Val()
		case "tokens":
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n <= 0 {
				return d.Errf("bad token count '%s'", d.Val())
			}
			m.Tokens = n
		case "interval":
			if err := cfparse.Duration(d, &m.Interval); err != nil {
				return err
			}
			if m.Interval == 0 {
				m.Interval = -1 // "interval 0": no pause
			}
		case "first_token_delay":
			if err := cfparse.Duration(d, &m.FirstTokenDelay); err != nil {
				return err
			}
		case "models":
			m.Models = d.RemainingArgs()
			if len(m.Models) == 0 {
				return d.ArgErr()
			}
		case "stamp":
			m.Stamp = true
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Mock)(nil)
	_ caddyhttp.MiddlewareHandler = (*Mock)(nil)
	_ caddyfile.Unmarshaler       = (*Mock)(nil)
)
