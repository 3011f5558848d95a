package llmstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/denyword"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redact"
)

// provisionContentRules sets up prompt logging and deny words.
func (h *Handler) provisionContentRules() error {
	switch h.LogPrompts {
	case "", "off":
		h.LogPrompts = "off"
	case "redacted", "full":
	case "sealed":
		if h.Seal == nil {
			return errors.New("log_prompts sealed: recipients are required")
		}
		var err error
		if h.recipients, err = parseRecipients(h.Seal.Recipients); err != nil {
			return err
		}
	default:
		return fmt.Errorf("log_prompts: %q is not off, redacted, full or sealed", h.LogPrompts)
	}
	var kinds []redact.Kind
	for _, k := range h.Redact {
		if !redact.Valid(k) {
			return fmt.Errorf("redact: %q is not phone, id_card, email or api_key", k)
		}
		kinds = append(kinds, redact.Kind(k))
	}
	h.redactor = redact.New(kinds...)
	if h.LogPrompts == "full" {
		h.logger.Warn("log_prompts full writes prompts and answers verbatim: personal data reaches the logs")
	}

	words := append([]string(nil), h.DenyWords...)
	if h.DenyWordsFile != "" {
		b, err := os.ReadFile(h.DenyWordsFile)
		if err != nil {
			return fmt.Errorf("deny_words_file: %w", err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				words = append(words, line)
			}
		}
	}
	h.deny = denyword.New(words)
	switch h.DenyWordsScope {
	case "", "request":
		h.DenyWordsScope = "request"
		h.denyRequest = true
	case "response":
		h.denyResponse = true
	case "both":
		h.denyRequest, h.denyResponse = true, true
	default:
		return fmt.Errorf("deny_words_scope: %q is not request, response or both", h.DenyWordsScope)
	}
	if h.deny == nil {
		h.denyRequest, h.denyResponse = false, false
	}
	return nil
}

// maxLoggedText caps each text in the prompt log line.
const maxLoggedText = 64 << 10

// requestText is the text a request sends to the model: the string
// contents of messages, system, prompt and input (also inside content
// parts), one piece a line. Tool definitions and other members are left
// out. It walks the body's bytes (valid JSON, checked when it was read)
// without decoding it into values.
func requestText(body []byte) string {
	var top [len(textMembers)][]byte
	forEachMember(body, func(key, v []byte) {
		for i, k := range textMembers {
			if string(key) == k {
				top[i] = v
			}
		}
	})
	var sb strings.Builder
	for i, k := range textMembers {
		if top[i] != nil {
			collectText(&sb, top[i], k)
		}
	}
	return sb.String()
}

// textMembers are the top-level members that hold a request's text, in
// the order it is written.
var textMembers = [...]string{"system", "messages", "prompt", "input", "contents"}

// collectText walks a JSON value and writes the strings that are message
// text: strings directly under the top member, and the values of
// "content", "text" and "parts" members below it.
func collectText(sb *strings.Builder, v []byte, key string) {
	if len(v) == 0 {
		return
	}
	switch v[0] {
	case '"':
		switch key {
		case "system", "prompt", "input", "content", "text":
			if sb.Len() > 0 {
				sb.WriteByte('\n')
			}
			writeJSONString(sb, v)
		}
	case '[':
		for i := skipSpace(v, 1); i < len(v) && v[i] != ']'; {
			end := skipValue(v, i)
			if end <= i {
				return
			}
			collectText(sb, v[i:end], key)
			if i = skipSpace(v, end); i < len(v) && v[i] == ',' {
				i = skipSpace(v, i+1)
			}
		}
	case '{':
		var parts [3][]byte // content, text, parts
		forEachMember(v, func(k, e []byte) {
			switch string(k) {
			case "content":
				parts[0] = e
			case "text":
				parts[1] = e
			case "parts":
				parts[2] = e
			}
		})
		for i, k := range [...]string{"content", "text", "parts"} {
			if parts[i] != nil {
				collectText(sb, parts[i], k)
			}
		}
	}
}

// writeJSONString writes the value of a JSON string literal: its bytes
// when it has no escapes, else decoded.
func writeJSONString(sb *strings.Builder, lit []byte) {
	inner := lit[1 : len(lit)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		sb.Write(inner)
		return
	}
	var s string
	if json.Unmarshal(lit, &s) == nil {
		sb.WriteString(s)
	}
}

// deltaText is the answer text in one streamed event: OpenAI chat
// (`choices[].delta.content`) and completions (`choices[].text`),
// Anthropic `content_block_delta` (`delta.text`) and Responses API
// `response.output_text.delta` (`delta` as a string).
func deltaText(data []byte) string {
	if len(data) == 0 || data[0] != '{' {
		return ""
	}
	var v struct {
		Choices []struct {
			Delta struct {
				Content string `json:"content"`
			} `json:"delta"`
			Text string `json:"text"`
		} `json:"choices"`
		Delta json.RawMessage `json:"delta"`
	}
	if json.Unmarshal(data, &v) != nil {
		return ""
	}
	if len(v.Choices) > 0 {
		return v.Choices[0].Delta.Content + v.Choices[0].Text
	}
	if len(v.Delta) > 0 {
		var s string
		if v.Delta[0] == '"' && json.Unmarshal(v.Delta, &s) == nil {
			return s
		}
		var d struct {
			Text string `json:"text"`
		}
		if json.Unmarshal(v.Delta, &d) == nil {
			return d.Text
		}
	}
	return ""
}

// answerText is the text of a whole JSON answer: `choices[].message.
// content`, `choices[].text`, Anthropic `content[].text`, Responses API
// `output[].content[].text`, Gemini `candidates[].content.parts[].text`.
func answerText(body []byte) string {
	var v struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
			Text string `json:"text"`
		} `json:"choices"`
		Content []struct {
			Text string `json:"text"`
		} `json:"content"`
		Output []struct {
			Content []struct {
				Text string `json:"text"`
			} `json:"content"`
		} `json:"output"`
		Candidates []struct {
			Content struct {
				Parts []struct {
					Text string `json:"text"`
				} `json:"parts"`
			} `json:"content"`
		} `json:"candidates"`
	}
	if json.Unmarshal(body, &v) != nil {
		return ""
	}
	var sb strings.Builder
	for _, c := range v.Choices {
		sb.WriteString(c.Message.Content + c.Text)
	}
	for _, c := range v.Content {
		sb.WriteString(c.Text)
	}
	for _, o := range v.Output {
		for _, c := range o.Content {
			sb.WriteString(c.Text)
		}
	}
	for _, c := range v.Candidates {
		for _, p := range c.Content.Parts {
			sb.WriteString(p.Text)
		}
	}
	return sb.String()
}

// capText shortens s to at most max bytes on a rune boundary.
func capText(s string) string {
	if len(s) <= maxLoggedText {
		return s
	}
	cut := maxLoggedText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// logPrompt writes the `llm prompt` line: the request's text and the
// assembled answer, masked before zap sees them when log_prompts is
// redacted.
func (h *Handler) logPrompt(id, identity, model, prompt, answer string) {
	if h.LogPrompts == "off" {
		return
	}
	prompt, answer = capText(prompt), capText(answer)
	// Sealed entries are masked too when redact is set: defence in depth.
	if h.LogPrompts == "redacted" || h.LogPrompts == "sealed" && len(h.Redact) > 0 {
		prompt, answer = h.redactor.String(prompt), h.redactor.String(answer)
	}
	if h.LogPrompts == "sealed" {
		h.logSealed(id, identity, model, prompt, answer)
		return
	}
	h.logger.Info("llm prompt",
		zap.String("identity", identity),
		zap.String("model", model),
		zap.String("prompt", prompt),
		zap.String("answer", answer),
	)
}
