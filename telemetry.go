package llmstream

import (
	"bytes"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// OpenTelemetry: when Caddy's `tracing` directive covers the route, the
// request's span gets the attributes of the OpenTelemetry semantic
// conventions for generative AI (the gen-ai conventions as of schema
// 1.42.0, the "latest experimental" set: gen_ai.provider.name rather than
// the older gen_ai.system) and an event at the first token. No prompt or
// answer text goes into spans.

// genAIOperation is gen_ai.operation.name for a request path.
func genAIOperation(path string) string {
	switch {
	case strings.HasSuffix(path, "/chat/completions"), strings.HasSuffix(path, "/messages"), strings.HasSuffix(path, "/responses"):
		return "chat"
	case strings.HasSuffix(path, "/embeddings"), strings.Contains(path, ":embedContent"), strings.Contains(path, ":batchEmbedContents"):
		return "embeddings"
	case strings.Contains(path, ":generateContent"), strings.Contains(path, ":streamGenerateContent"):
		return "generate_content"
	case strings.HasSuffix(path, "/completions"):
		return "text_completion"
	}
	return ""
}

// traceGenAI enriches the request's span, if one is recording.
func (h *Handler) traceGenAI(x *exchange, snap relaySnapshot) {
	span := trace.SpanFromContext(x.r.Context())
	if !span.IsRecording() {
		return
	}
	attrs := make([]attribute.KeyValue, 0, 16)
	str := func(k, v string) {
		if v != "" {
			attrs = append(attrs, attribute.String(k, v))
		}
	}
	str("gen_ai.operation.name", genAIOperation(x.r.URL.Path))
	str("gen_ai.request.model", x.in.model)
	str("gen_ai.response.model", snap.answerModel)
	str("gen_ai.response.id", snap.answerID)
	if x.in.maxTokens > 0 {
		attrs = append(attrs, attribute.Int64("gen_ai.request.max_tokens", x.in.maxTokens))
	}
	if up := x.at.up; up != nil && !x.last.cached {
		str("gen_ai.provider.name", dialects[up.Provider].genAIName)
		str("server.address", up.base.Hostname())
		if p, err := strconv.Atoi(up.base.Port()); err == nil {
			attrs = append(attrs, attribute.Int("server.port", p))
		}
	}
	if u := x.usage; u.status != usageAbsent && u.status != usageCached {
		attrs = append(attrs,
			attribute.Int64("gen_ai.usage.input_tokens", u.prompt),
			attribute.Int64("gen_ai.usage.output_tokens", u.completion),
			attribute.Int64("gen_ai.usage.cache_read.input_tokens", u.cached),
			attribute.Int64("gen_ai.usage.cache_creation.input_tokens", u.cacheWrite),
			attribute.Int64("gen_ai.usage.reasoning.output_tokens", u.reasoning))
	}
	if x.usage.finishReason != "" {
		attrs = append(attrs, attribute.StringSlice("gen_ai.response.finish_reasons", []string{x.usage.finishReason}))
	}
	// Not in the conventions: the handler's own figures.
	str("llm_stream.usage_status", x.usage.status)
	str("llm_stream.cache", cacheResultOf(x))
	if x.priced {
		attrs = append(attrs, attribute.Float64("llm_stream.cost_usd", usd(x.cost)))
	}
	span.SetAttributes(attrs...)
	if !snap.firstToken.IsZero() {
		span.AddEvent("gen_ai.first_token", trace.WithTimestamp(snap.firstToken))
	}
}

func cacheResultOf(x *exchange) string {
	if x.cache == nil {
		return ""
	}
	return x.cache.result
}

var modelMember = []byte(`"model":"`)

// answerModel is the model named in an answer's first bytes (OpenAI,
// Anthropic's message_start, the Responses API), or "".
func answerModel(b []byte) string {
	i := bytes.Index(b, modelMember)
	if i < 0 {
		return ""
	}
	v := b[i+len(modelMember):]
	end := bytes.IndexByte(v, '"')
	if end <= 0 || end > 200 || bytes.IndexByte(v[:end], '\\') >= 0 {
		return ""
	}
	return string(v[:end])
}
