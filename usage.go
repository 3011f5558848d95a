package llmstream

import (
	"bytes"
	"cmp"
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Usage status: how much of the token usage is known.
const (
	usageExact   = "exact"   // the upstream reported it and the answer completed
	usagePartial = "partial" // some was reported, but the answer did not complete
	usageAbsent  = "absent"  // nothing was reported (never guessed as zero)
	usageCached  = "cached"  // an answer replayed from the cache: no upstream call was paid
	// a stopped generation whose upstream reported nothing: completion
	// tokens are the data events relayed, prompt tokens the body's size / 4
	usageEstimated = "estimated"
)

// usage is what the upstream reported about tokens, in one meaning for
// every provider: prompt counts every input token, those read from the
// provider's prompt cache (cached) and those written to it (cacheWrite)
// included; completion counts every output token, reasoning included.
// Providers that count them apart (Anthropic's cache tokens, Gemini's
// thoughts) are added up to it.
type usage struct {
	prompt, completion, totalTokens int64
	cached, cacheWrite, reasoning   int64
	// Anthropic reports input_tokens without the cache tokens, in
	// message_start and again (sometimes) in message_delta.
	uncached  int64
	anthropic bool
	// why the answer ended, when the provider says so with its usage (a
	// JSON answer, Anthropic's message_delta, Gemini's last chunk)
	finishReason string
	seen         bool
	status       string
}

func (u *usage) total() int64 {
	if u.totalTokens > 0 {
		return u.totalTokens
	}
	return u.prompt + u.completion
}

// usageFields covers the usage shapes of OpenAI (chat, completions,
// embeddings), the Responses API, Anthropic, Gemini (usageMetadata) and
// Ollama's native API.
type usageFields struct {
	PromptTokens      *int64            `json:"prompt_tokens"`
	CompletionTokens  *int64            `json:"completion_tokens"`
	TotalTokens       *int64            `json:"total_tokens"`
	PromptDetails     *cachedDetails    `json:"prompt_tokens_details"`
	CompletionDetails *reasoningDetails `json:"completion_tokens_details"`

	// Responses API; Anthropic's input_tokens leaves the cache out.
	InputTokens   *int64            `json:"input_tokens"`
	OutputTokens  *int64            `json:"output_tokens"`
	InputDetails  *cachedDetails    `json:"input_tokens_details"`
	OutputDetails *reasoningDetails `json:"output_tokens_details"`
	CacheRead     *int64            `json:"cache_read_input_tokens"`
	CacheCreation *int64            `json:"cache_creation_input_tokens"`
}

type cachedDetails struct {
	CachedTokens *int64 `json:"cached_tokens"`
}

type reasoningDetails struct {
	ReasoningTokens *int64 `json:"reasoning_tokens"`
}

// geminiUsage is Gemini's usageMetadata: the prompt count includes cached
// content, the candidates count leaves the thoughts out.
type geminiUsage struct {
	Prompt     *int64 `json:"promptTokenCount"`
	Candidates *int64 `json:"candidatesTokenCount"`
	Total      *int64 `json:"totalTokenCount"`
	Cached     *int64 `json:"cachedContentTokenCount"`
	Thoughts   *int64 `json:"thoughtsTokenCount"`
}

func (u *usage) set(dst *int64, v *int64) {
	if v != nil {
		*dst = *v
		u.seen = true
	}
}

func (u *usage) apply(f *usageFields) {
	u.set(&u.prompt, f.PromptTokens)
	u.set(&u.completion, f.CompletionTokens)
	u.set(&u.totalTokens, f.TotalTokens)
	u.set(&u.completion, f.OutputTokens)
	if f.PromptDetails != nil {
		u.set(&u.cached, f.PromptDetails.CachedTokens)
	}
	if f.CompletionDetails != nil {
		u.set(&u.reasoning, f.CompletionDetails.ReasoningTokens)
	}
	if f.InputDetails != nil {
		u.set(&u.cached, f.InputDetails.CachedTokens)
	}
	if f.OutputDetails != nil {
		u.set(&u.reasoning, f.OutputDetails.ReasoningTokens)
	}
	if f.CacheRead != nil || f.CacheCreation != nil {
		u.anthropic = true
	}
	u.set(&u.cached, f.CacheRead)
	u.set(&u.cacheWrite, f.CacheCreation)
	if u.anthropic {
		u.set(&u.uncached, f.InputTokens)
		u.prompt = u.uncached + u.cached + u.cacheWrite
	} else {
		u.set(&u.prompt, f.InputTokens)
	}
}

func (u *usage) applyGemini(g *geminiUsage) {
	u.set(&u.prompt, g.Prompt)
	u.set(&u.totalTokens, g.Total)
	u.set(&u.cached, g.Cached)
	u.set(&u.reasoning, g.Thoughts)
	var candidates int64
	u.set(&candidates, g.Candidates)
	u.completion = candidates + u.reasoning
}

var (
	usageWord    = []byte("usage")
	noChoices    = []byte(`"choices":[]`)
	messageStart = []byte("message_start")
	messageDelta = []byte("message_delta")
)

// mayHoldUsage is the cheap test run on every read of an event stream: it
// reports whether b may hold a usage object, by the token counts every
// usage object has (`_tokens"` in OpenAI, Anthropic and Responses usage,
// `TokenCount"` in Gemini's usageMetadata). Only what passes is parsed.
// It is one search, for the k both names share: k is rare in JSON chunks
// (once, in "chat.completion.chunk"), where the names' first bytes are
// not (`_` in "finish_reason" and "system_fingerprint"), and searching for
// each name would pass over the bytes twice. `"usage":null`, which every
// chunk carries once include_usage is on, does not stop it.
func mayHoldUsage(b []byte) bool {
	for i := 0; ; i++ {
		k := bytes.IndexByte(b[i:], 'k')
		if k < 0 {
			return false
		}
		i += k
		switch {
		case i >= 3 && string(b[i-3:i]) == "_to" && bytes.HasPrefix(b[i+1:], tokensRest),
			i >= 2 && string(b[i-2:i]) == "To" && bytes.HasPrefix(b[i+1:], tokenCountRest):
			return true
		}
	}
}

// What follows the k of `_tokens"` and of `TokenCount"`.
var (
	tokensRest     = []byte(`ens"`)
	tokenCountRest = []byte(`enCount"`)
)

// hasUsageObject reports whether JSON text holds a usage object
// (`"usage":{` or Gemini's `"usageMetadata":{`), not just `"usage":null`,
// which every chunk carries once include_usage is on. It searches for the
// word without its quote: bytes.Index keys on the first byte, and `"` is
// the commonest byte in JSON.
func hasUsageObject(b []byte) bool {
	for {
		i := bytes.Index(b, usageWord)
		if i < 0 {
			return false
		}
		rest := b[i+len(usageWord):]
		rest = bytes.TrimPrefix(rest, []byte("Metadata"))
		if len(rest) >= 3 && rest[0] == '"' && rest[1] == ':' {
			v := bytes.TrimLeft(rest[2:], " \t\r\n")
			if len(v) > 0 && v[0] == '{' {
				return true
			}
		}
		b = rest
	}
}

// readEvent takes usage from one SSE event: OpenAI chunks (the final
// `"choices":[]` chunk), Responses API `response.completed`, Anthropic
// `message_start` (input tokens) and `message_delta` (output tokens so
// far), Gemini `usageMetadata`.
func (u *usage) readEvent(name, data []byte) {
	switch {
	case bytes.Equal(name, messageStart):
		var ev struct {
			Message struct {
				Usage usageFields `json:"usage"`
			} `json:"message"`
		}
		if json.Unmarshal(data, &ev) == nil {
			u.apply(&ev.Message.Usage)
		}
	case bytes.Equal(name, messageDelta):
		var ev struct {
			Usage usageFields `json:"usage"`
			Delta struct {
				StopReason string `json:"stop_reason"`
			} `json:"delta"`
		}
		if json.Unmarshal(data, &ev) == nil {
			u.apply(&ev.Usage)
			u.finishReason = cmp.Or(ev.Delta.StopReason, u.finishReason)
		}
	case hasUsageObject(data):
		u.readJSON(data)
	}
}

// readJSON takes usage from a whole JSON answer (or event data). It walks
// the top-level members' bytes and decodes only the few that hold usage
// and the finish reason: an answer's text is never decoded.
func (u *usage) readJSON(body []byte) {
	var usageRaw, responseRaw, gemini, choices, candidates, stop, promptEval, eval []byte
	forEachMember(body, func(key, v []byte) {
		switch string(key) {
		case "usage":
			usageRaw = v
		case "response":
			responseRaw = v
		case "usageMetadata":
			gemini = v
		case "choices": // why it ended: OpenAI, Anthropic, Gemini
			choices = v
		case "stop_reason":
			stop = v
		case "candidates":
			candidates = v
		case "prompt_eval_count": // Ollama's native API, in its last NDJSON line (done: true)
			promptEval = v
		case "eval_count":
			eval = v
		}
	})
	u.finishReason = cmp.Or(firstMember(choices, "finish_reason"), u.finishReason)
	u.finishReason = cmp.Or(firstMember(candidates, "finishReason"), u.finishReason)
	if s, ok := jsonString(stop); ok {
		u.finishReason = cmp.Or(s, u.finishReason)
	}
	if usageRaw == nil {
		usageRaw = member(responseRaw, "usage")
	}
	switch {
	case isObject(usageRaw):
		var f usageFields
		if f.decode(usageRaw) {
			u.apply(&f)
		}
	case isObject(gemini):
		var g geminiUsage
		if g.decode(gemini) {
			u.applyGemini(&g)
		}
	case promptEval != nil || eval != nil:
		f := usageFields{PromptTokens: jsonInt(promptEval), CompletionTokens: jsonInt(eval)}
		if f.PromptTokens != nil || f.CompletionTokens != nil {
			u.apply(&f)
		}
	}
}

// firstMember is the string member key of the first object in a raw JSON
// array ("" when there is none).
func firstMember(array []byte, key string) string {
	if len(array) == 0 || array[0] != '[' {
		return ""
	}
	i := skipSpace(array, 1)
	s, _ := jsonString(member(array[i:skipValue(array, i)], key))
	return s
}

func isObject(v []byte) bool { return len(v) > 0 && v[0] == '{' }

// jsonInt is a raw JSON integer (nil when v is none).
func jsonInt(v []byte) *int64 {
	n, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil {
		return nil
	}
	return &n
}

// readNDJSONUsage reads usage from the lines of an NDJSON answer as they
// pass: Ollama's last line ({"done":true,…,"prompt_eval_count":…,
// "eval_count":…}), or any line with a usage object. Only lines that may
// hold it are parsed. Called with the relay's lock held.
func (rl *relay) readNDJSONUsage(b []byte) {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			if len(rl.ndjsonLine)+len(b) <= maxUsageBody {
				rl.ndjsonLine = append(rl.ndjsonLine, b...)
			}
			return
		}
		line := b[:i]
		if len(rl.ndjsonLine) > 0 {
			rl.ndjsonLine = append(rl.ndjsonLine, line...)
			line = rl.ndjsonLine
		}
		if bytes.Contains(line, evalCountKey) || mayHoldUsage(line) && hasUsageObject(line) {
			rl.usage.readJSON(line)
		}
		rl.ndjsonLine = rl.ndjsonLine[:0]
		b = b[i+1:]
	}
}

var evalCountKey = []byte(`eval_count"`)

// finish sets the status once the answer ended.
func (u *usage) finish(complete bool) {
	switch {
	case !u.seen:
		u.status = usageAbsent
	case complete:
		u.status = usageExact
	default:
		u.status = usagePartial
	}
}

// estimate fills in the usage of a stopped generation that the upstream
// never reported (it reports usage at the end, and the end never came), so
// that what was paid for still counts against the caller's token limits:
// streams send about one token per data event, and prompts run about four
// bytes per token.
func (u *usage) estimate(in *inbound, dataEvents int) {
	if u.seen {
		return
	}
	u.prompt = int64(len(in.body)) / 4
	u.completion = int64(dataEvents)
	u.status = usageEstimated
}

// isUsageChunk reports whether an SSE event is the extra OpenAI usage
// chunk (`"choices":[]` with a usage object) that include_usage adds.
func isUsageChunk(ev []byte) bool {
	return mayHoldUsage(ev) && hasUsageObject(ev) && bytes.Contains(ev, noChoices)
}

// wantsUsageInjection reports whether a request is a streamed chat
// completion whose client did not ask for the usage chunk.
func wantsUsageInjection(path string, in *inbound) bool {
	if !in.stream || !in.isJSON || !strings.HasSuffix(path, "/chat/completions") {
		return false
	}
	s, e := topLevelValue(in.body, "stream_options")
	if s < 0 {
		return true
	}
	var so struct {
		IncludeUsage bool `json:"include_usage"`
	}
	_ = json.Unmarshal(in.body[s:e], &so)
	return !so.IncludeUsage
}

// withIncludeUsage returns the body with stream_options.include_usage set
// to true: inserted as the first member (of the body, or of an existing
// stream_options object), every other byte unchanged.
func withIncludeUsage(body []byte) []byte {
	s, e := topLevelValue(body, "stream_options")
	if s < 0 {
		open := bytes.IndexByte(body, '{') + 1
		member := `"stream_options":{"include_usage":true}`
		if rest := bytes.TrimLeft(body[open:], " \t\r\n"); len(rest) > 0 && rest[0] != '}' {
			member += ","
		}
		return splice(body, open, open, member)
	}
	opts := body[s:e]
	if bytes.TrimSpace(opts)[0] != '{' {
		return splice(body, s, e, `{"include_usage":true}`) // null or junk
	}
	if vs, ve := topLevelValue(opts, "include_usage"); vs >= 0 {
		return splice(body, s+vs, s+ve, "true")
	}
	open := s + bytes.IndexByte(opts, '{') + 1
	member := `"include_usage":true`
	if rest := bytes.TrimLeft(body[open:e], " \t\r\n"); len(rest) > 0 && rest[0] != '}' {
		member += ","
	}
	return splice(body, open, open, member)
}

// splice replaces b[from:to] with s in a new slice.
func splice(b []byte, from, to int, s string) []byte {
	out := make([]byte, 0, len(b)-(to-from)+len(s))
	out = append(out, b[:from]...)
	out = append(out, s...)
	return append(out, b[to:]...)
}

// llmPlaceholders are the {llm.*} placeholders of one request.
type llmPlaceholders struct {
	model, chosen         string
	upstream, identity    string
	usage                 usage
	ttft                  time.Duration
	cache                 string
	requestID, upstreamID string
	cost                  int64
	priced                bool
}

func (p *llmPlaceholders) get(key string) (any, bool) {
	name, ok := strings.CutPrefix(key, "llm.")
	if !ok {
		return nil, false
	}
	switch name {
	case "model":
		return p.model, true
	case "model_chosen":
		return p.chosen, true
	case "upstream":
		return p.upstream, true
	case "identity":
		return p.identity, true
	case "usage.prompt_tokens":
		return p.usage.prompt, true
	case "usage.completion_tokens":
		return p.usage.completion, true
	case "usage.total_tokens":
		return p.usage.total(), true
	case "usage.cached_tokens":
		return p.usage.cached, true
	case "usage.cache_write_tokens":
		return p.usage.cacheWrite, true
	case "usage.reasoning_tokens":
		return p.usage.reasoning, true
	case "usage.status":
		return p.usage.status, true
	case "ttft_ms":
		return p.ttft.Milliseconds(), true
	case "cache":
		return p.cache, true
	case "request_id":
		return p.requestID, true
	case "upstream_request_id":
		return p.upstreamID, true
	case "cost_usd":
		if p.priced {
			return usd(p.cost), true
		}
	}
	return nil, false
}

// chosenModel is the model a route rule chose instead of the one asked
// for, or "".
func chosenModel(x *exchange) string {
	if x.asked == "" {
		return ""
	}
	return x.in.model
}

// usd converts nano-dollars to US dollars.
func usd(nano int64) float64 { return float64(nano) / nanoUSD }

// costField is the usage line's cost_usd, when the model has a price.
func costField(x *exchange) zap.Field {
	if !x.priced {
		return zap.Skip()
	}
	return zap.Float64("cost_usd", usd(x.cost))
}

// recordUsage writes the usage record of a request: one `llm usage` log
// line and the {llm.*} placeholders for access logs and headers.
func (h *Handler) recordUsage(x *exchange, snap relaySnapshot) {
	r, identity, in, at, res, u, cs := x.r, x.identity, x.in, x.at, &x.last, x.usage, x.cache
	duration := time.Since(x.start)
	upstream := ""
	switch {
	case res.cached:
		upstream = "cache"
	case at.up != nil:
		upstream = at.up.URL
	}
	cacheResult := ""
	if cs != nil {
		cacheResult = cs.result
		metrics.cache.WithLabelValues(h.modelLabel(in.model), cacheResult).Inc()
	}
	status := res.code
	if !res.done {
		status = res.status
	}
	if !h.authRequired() {
		identity = "" // an address is for limits only, not for the log
	}
	var ttft time.Duration
	if !snap.firstToken.IsZero() {
		ttft = snap.firstToken.Sub(x.start)
	}
	upstreamID := snap.upstreamID
	if upstreamID == "" && res.header != nil {
		upstreamID = upstreamRequestID(res.header) // an error answer's
	}
	var tps float64
	if gen := duration - ttft; u.completion > 0 && ttft > 0 && gen > 0 {
		tps = float64(u.completion) / gen.Seconds()
	}
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		// Looked up only when a placeholder is used (access logs, headers
		// of later handlers): nothing is copied into the replacer's map.
		p := &llmPlaceholders{model: cmp.Or(x.asked, in.model), chosen: chosenModel(x), upstream: upstream, identity: identity, usage: *u,
			ttft: ttft, cache: cacheResult, requestID: in.id, upstreamID: upstreamID, cost: x.cost, priced: x.priced}
		repl.Map(p.get)
	}
	h.keepUsageRecord(x, snap, ttft, tps, cacheResult)
	model := h.modelLabel(in.model)
	metrics.requests.WithLabelValues(model, upstream, strconv.Itoa(status)).Inc()
	metrics.duration.WithLabelValues(model, upstream).Observe(duration.Seconds())
	if ttft > 0 {
		metrics.ttft.WithLabelValues(model, upstream).Observe(ttft.Seconds())
	}
	if u.status != usageAbsent {
		idLabel := ""
		if len(h.clientKeys) > 0 {
			idLabel = identity // a configured key name, never a raw key
		}
		if x.priced && x.cost > 0 {
			costCounter(model, idLabel).Add(usd(x.cost))
		}
		for _, k := range [...]struct {
			kind string
			n    int64
		}{
			{"prompt", u.prompt}, {"completion", u.completion},
			{"cached_prompt", u.cached}, {"cache_write", u.cacheWrite}, {"reasoning", u.reasoning},
		} {
			if k.n > 0 || k.kind == "prompt" || k.kind == "completion" {
				metrics.tokens.WithLabelValues(model, idLabel, k.kind, u.status).Add(float64(k.n))
			}
		}
	}
	// Checked first: with the log level above INFO, the 23 fields are not
	// built at all (they cost a 1.5 KB allocation per request).
	ce := h.logger.Check(zap.InfoLevel, "llm usage")
	if ce == nil {
		return
	}
	ce.Write(
		zap.String("identity", identity),
		zap.String("client_ip", clientIP(r)),
		zap.String("model", cmp.Or(x.asked, in.model)),
		zap.String("model_chosen", chosenModel(x)),
		zap.String("upstream", upstream),
		zap.Int("status", status),
		zap.Int64("prompt_tokens", u.prompt),
		zap.Int64("completion_tokens", u.completion),
		zap.Int64("total_tokens", u.total()),
		zap.String("usage_status", u.status),
		zap.Int64("cached_tokens", u.cached),
		zap.Int64("cache_write_tokens", u.cacheWrite),
		zap.Int64("reasoning_tokens", u.reasoning),
		costField(x),
		zap.String("finish_reason", u.finishReason),
		zap.Duration("ttft", ttft),
		zap.Duration("duration", duration),
		zap.Float64("tokens_per_second", tps),
		zap.String("cache", cacheResult),
		zap.String("request_id", in.id),
		zap.String("upstream_request_id", upstreamID),
		zap.Bool("stopped", res.stopped),
	)
}

// answerCost is what the answer cost at the configured prices, in
// nano-dollars; false when its model has no price. An answer from the
// cache costs nothing; usage never read costs nothing here (settle keeps
// the reservation of such an answer).
func (h *Handler) answerCost(x *exchange) (int64, bool) {
	if h.prices == nil {
		return 0, false
	}
	r, ok := h.rateOf(x)
	if !ok {
		return 0, false
	}
	if x.last.cached || x.usage.status == usageAbsent {
		return 0, true
	}
	return r.cost(x.usage), true
}

// requestUsage makes usage exact for a streamed chat completion whose
// client did not ask for it: the upstream body asks for the usage chunk,
// and the relay keeps it from the client. (After the cache stage: the
// cache keys on the client's own body.)
func (x *exchange) requestUsage() {
	x.hideUsage = wantsUsageInjection(x.r.URL.Path, x.in)
	if x.hideUsage {
		x.in.body = withIncludeUsage(x.in.body)
	}
}

// finish is the last stage: the cache flight ends (and a complete answer
// is stored), usage is settled with the limits, and the metrics, the usage
// line and the prompt log are written.
func (h *Handler) finish(x *exchange) {
	rl, u := x.rl, x.usage
	rl.stop()
	h.cacheFinish(x.cache, &x.last)
	snap := rl.snapshot()
	metrics.interToken.merge(rl.model, &snap.gaps)
	u.finish(x.last.complete)
	if x.wasStopped() {
		u.estimate(x.in, snap.dataEvents)
	}
	if x.last.cached && u.status != usageAbsent {
		u.status = usageCached
	}
	x.cost, x.priced = h.answerCost(x)
	h.settle(x.admission, u, x.cost)
	h.rememberResponse(x, snap)
	h.recordUsage(x, snap)
	h.traceGenAI(x, snap)
	if rl.answer != nil {
		answer := rl.answer.String()
		if answer == "" && len(rl.jsonBuf) > 0 {
			answer = answerText(rl.jsonBuf)
		}
		h.logPrompt(x.in.id, x.identity, x.in.model, x.prompt, answer)
	}
}
