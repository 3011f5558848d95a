package cache

import (
	"bytes"
	"encoding/json"
	"strings"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// A stored answer may serve the other kind of request: a plain request
// from a streamed answer (the chunks assembled into one chat.completion
// object) and a streaming request from a plain answer (the object sent as
// chunks). Both speak OpenAI's chat completions format; anything else is
// served only in the form it was stored in.

type chunk struct {
	ID                string          `json:"id"`
	Object            string          `json:"object"`
	Created           int64           `json:"created"`
	Model             string          `json:"model"`
	ServiceTier       *string         `json:"service_tier"`
	SystemFingerprint *string         `json:"system_fingerprint"`
	Choices           []chunkChoice   `json:"choices"`
	Usage             json.RawMessage `json:"usage"`
}

type chunkChoice struct {
	Index        int             `json:"index"`
	Delta        message         `json:"delta"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason *string         `json:"finish_reason"`
}

// message is an assistant message, or a delta of one. Its field order is
// the order OpenAI writes them in.
type message struct {
	Role      string     `json:"role,omitempty"`
	Content   *string    `json:"content"`
	ToolCalls []toolCall `json:"tool_calls,omitempty"`
	Refusal   *string    `json:"refusal"`
}

type toolCall struct {
	Index    *int   `json:"index,omitempty"`
	ID       string `json:"id,omitempty"`
	Type     string `json:"type,omitempty"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

// completion is a chat.completion object in OpenAI's field order.
type completion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	Choices           []completionChoice `json:"choices"`
	Usage             json.RawMessage    `json:"usage,omitempty"`
	ServiceTier       *string            `json:"service_tier,omitempty"`
	SystemFingerprint *string            `json:"system_fingerprint,omitempty"`
}

type completionChoice struct {
	Index        int             `json:"index"`
	Message      message         `json:"message"`
	Logprobs     json.RawMessage `json:"logprobs"`
	FinishReason *string         `json:"finish_reason"`
}

// StreamToJSON assembles the chat.completion object a plain request would
// have got from an OpenAI chat completion event stream. It reports false
// for any other stream.
func StreamToJSON(stream []byte) ([]byte, bool) {
	var (
		out     completion
		ok      = true
		byIndex = map[int]int{} // choice index → position in out.Choices
		content []*strings.Builder
		refusal []*strings.Builder
	)
	p := sse.Parser{OnEvent: func(ev sse.Event) {
		if !ok || len(ev.Data) == 0 || bytes.Equal(ev.Data, []byte("[DONE]")) {
			return
		}
		var c chunk
		if json.Unmarshal(ev.Data, &c) != nil || c.Object != "chat.completion.chunk" || ev.Truncated {
			ok = false
			return
		}
		if out.ID == "" {
			out.ID, out.Object, out.Created, out.Model = c.ID, "chat.completion", c.Created, c.Model
		}
		if c.SystemFingerprint != nil {
			out.SystemFingerprint = c.SystemFingerprint
		}
		if c.ServiceTier != nil {
			out.ServiceTier = c.ServiceTier
		}
		if len(c.Usage) > 0 && !bytes.Equal(c.Usage, []byte("null")) {
			out.Usage = c.Usage
		}
		for _, ch := range c.Choices {
			i, seen := byIndex[ch.Index]
			if !seen {
				i = len(out.Choices)
				byIndex[ch.Index] = i
				out.Choices = append(out.Choices, completionChoice{Index: ch.Index, Logprobs: json.RawMessage("null")})
				content = append(content, nil)
				refusal = append(refusal, nil)
			}
			cc := &out.Choices[i]
			if ch.Delta.Role != "" {
				cc.Message.Role = ch.Delta.Role
			}
			if ch.Delta.Content != nil {
				if content[i] == nil {
					content[i] = new(strings.Builder)
				}
				content[i].WriteString(*ch.Delta.Content)
			}
			if ch.Delta.Refusal != nil {
				if refusal[i] == nil {
					refusal[i] = new(strings.Builder)
				}
				refusal[i].WriteString(*ch.Delta.Refusal)
			}
			for _, tc := range ch.Delta.ToolCalls {
				mergeToolCall(&cc.Message, tc)
			}
			if ch.FinishReason != nil {
				cc.FinishReason = ch.FinishReason
			}
		}
	}}
	p.Feed(stream)
	p.Feed([]byte("\n\n")) // an unterminated last event
	if !ok || out.ID == "" {
		return nil, false
	}
	for i := range out.Choices {
		m := &out.Choices[i].Message
		if content[i] != nil {
			s := content[i].String()
			m.Content = &s
		}
		if refusal[i] != nil && refusal[i].Len() > 0 {
			s := refusal[i].String()
			m.Refusal = &s
		}
		for j := range m.ToolCalls {
			m.ToolCalls[j].Index = nil
		}
	}
	return marshal(out), true
}

func mergeToolCall(m *message, d toolCall) {
	idx := 0
	if d.Index != nil {
		idx = *d.Index
	}
	for i := range m.ToolCalls {
		if *m.ToolCalls[i].Index == idx {
			t := &m.ToolCalls[i]
			t.Function.Name += d.Function.Name
			t.Function.Arguments += d.Function.Arguments
			return
		}
	}
	d.Index = &idx
	m.ToolCalls = append(m.ToolCalls, d)
}

// JSONToStream sends a chat.completion object as the event stream a
// streaming request would have got: per choice a chunk with the role and
// the whole content (and tool calls), a chunk with the finish reason, then
// the usage chunk (`"choices":[]`) and `data: [DONE]`. It reports false
// for anything that is not a chat.completion.
func JSONToStream(body []byte) ([]byte, bool) {
	var c completion
	if json.Unmarshal(body, &c) != nil || c.Object != "chat.completion" {
		return nil, false
	}
	var out bytes.Buffer
	type outChoice struct {
		Index        int             `json:"index"`
		Delta        any             `json:"delta"`
		Logprobs     json.RawMessage `json:"logprobs"`
		FinishReason *string         `json:"finish_reason"`
	}
	send := func(choices []outChoice, usage json.RawMessage) {
		ck := struct {
			ID                string          `json:"id"`
			Object            string          `json:"object"`
			Created           int64           `json:"created"`
			Model             string          `json:"model"`
			ServiceTier       *string         `json:"service_tier,omitempty"`
			SystemFingerprint *string         `json:"system_fingerprint,omitempty"`
			Choices           []outChoice     `json:"choices"`
			Usage             json.RawMessage `json:"usage,omitempty"`
		}{c.ID, "chat.completion.chunk", c.Created, c.Model, c.ServiceTier, c.SystemFingerprint, choices, usage}
		out.WriteString("data: ")
		out.Write(marshal(ck))
		out.WriteString("\n\n")
	}
	null := json.RawMessage("null")
	for _, ch := range c.Choices {
		delta := ch.Message
		for j := range delta.ToolCalls {
			j := j
			delta.ToolCalls[j].Index = &j
		}
		send([]outChoice{{Index: ch.Index, Delta: delta, Logprobs: null}}, nil)
		send([]outChoice{{Index: ch.Index, Delta: struct{}{}, Logprobs: null, FinishReason: ch.FinishReason}}, nil)
	}
	if len(c.Usage) > 0 && !bytes.Equal(c.Usage, null) {
		send([]outChoice{}, c.Usage)
	}
	out.WriteString("data: [DONE]\n\n")
	return out.Bytes(), true
}

// marshal writes JSON the way the providers do: compact, with <, > and &
// as they are.
func marshal(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}
