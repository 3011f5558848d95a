package llmstream

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPromptLogsAreRedacted(t *testing.T) {
	// The answer streams a phone number and an e-mail split across chunks.
	up := splitUpstream(t, "text/event-stream", []string{
		`data: {"choices":[{"delta":{"content":"请联系 1391"}}]}` + "\n\n",
		`data: {"choices":[{"delta":{"content":"2345678 或 bob@exa"}}]}` + "\n\n",
		`data: {"choices":[{"delta":{"content":"mple.com。"}}]}` + "\n\n",
		"data: [DONE]\n\n",
	})
	raw := []string{"13812345678", "11010519491231002X", "alice@example.org", "sk-proj-0123456789abcdefXYZ", "13912345678", "bob@example.com"}
	prompt := fmt.Sprintf(`{"model":"m","stream":true,"messages":[{"role":"system","content":"key %s"},{"role":"user","content":[{"type":"text","text":"我是 %s，身份证 %s，邮箱 %s"}]}]}`, raw[3], raw[0], raw[1], raw[2])
	for _, mode := range []string{"redacted", "full", "off"} {
		t.Run(mode, func(t *testing.T) {
			c := startCaddy(t, `llm_stream `+up.URL+` {
		log_prompts `+mode+`
	}`)
			do(t, "POST", c.base()+"/v1/chat/completions", prompt, nil)
			logs := c.waitLog(`"msg":"llm usage"`)
			switch mode {
			case "redacted":
				logs = c.waitLog(`"msg":"llm prompt"`, "[PHONE]", "[ID_CARD]", "[EMAIL]", "[API_KEY]")
				for _, r := range raw {
					if strings.Contains(logs, r) {
						t.Errorf("raw %q in the log file", r)
					}
				}
				if !strings.Contains(logs, `请联系 [PHONE] 或 [EMAIL]。`) {
					t.Errorf("assembled answer not logged masked:\n%s", logs)
				}
			case "full":
				c.waitLog(`"msg":"llm prompt"`, raw[0], "请联系 13912345678 或 bob@example.com。")
			case "off":
				if strings.Contains(logs, `"msg":"llm prompt"`) || strings.Contains(logs, raw[0]) {
					t.Error("log_prompts off logged a prompt")
				}
			}
		})
	}
}

func TestDenyWordsInRequests(t *testing.T) {
	up := newUpstream(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "words")
	os.WriteFile(file, []byte("# list\nforbidden phrase\n违禁词\n"), 0o600)
	c := startCaddy(t, `llm_stream `+up.URL+` {
		deny_words Secret
		deny_words_file `+file+`
	}`)
	for _, text := range []string{"tell me the SECRET", "a ｆｏｒｂｉｄｄｅｎ　ｐｈｒａｓｅ here", "这是违禁词"} {
		resp, body := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"`+text+`"}]}`, nil)
		if resp.StatusCode != 403 || !strings.Contains(body, `"code":"content_filter"`) {
			t.Errorf("%q: got %d %s", text, resp.StatusCode, body)
		}
	}
	if up.calls.Load() != 0 {
		t.Fatalf("the upstream was called %d times for refused requests", up.calls.Load())
	}
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"harmless"}]}`, nil); resp.StatusCode != 200 {
		t.Fatalf("harmless request: %d", resp.StatusCode)
	}
	// the words file is read again on reload
	os.WriteFile(file, []byte("harmless\n"), 0o600)
	c.load(`llm_stream ` + up.URL + ` {
		deny_words_file ` + file + `
	}`)
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"harmless"}]}`, nil); resp.StatusCode != 403 {
		t.Fatalf("after reload: %d, want 403", resp.StatusCode)
	}
}

func TestDenyWordsInStreamedAnswers(t *testing.T) {
	cancelled := make(chan struct{}, 1)
	ack := make(chan struct{})
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		ev := func(s string) string { return `data: {"choices":[{"delta":{"content":"` + s + `"}}]}` + "\n\n" }
		switch r.URL.Path {
		case "/v1/split/chat/completions":
			flushWrite(w, ev("一段很长的无害开头文字"))
			flushWrite(w, ev("然后违禁"))
			time.Sleep(20 * time.Millisecond)
			flushWrite(w, ev("词出现了"))
			select {
			case <-r.Context().Done():
				cancelled <- struct{}{}
			case <-time.After(2 * time.Second):
			}
		case "/v1/clean/chat/completions":
			for _, s := range []string{"你好", "，世界", "！这段话没有问题。", "结束"} {
				flushWrite(w, ev(s))
			}
			flushWrite(w, "data: [DONE]\n\n")
		case "/v1/held/chat/completions":
			flushWrite(w, ev("ab"))
			<-ack // the client must not have "ab" yet: "违禁词" is 3 long
			flushWrite(w, ev("cd"))
			flushWrite(w, "data: [DONE]\n\n")
		}
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		deny_words 违禁词
		deny_words_scope both
	}`)
	t.Run("split across chunks", func(t *testing.T) {
		_, body := do(t, "POST", c.base()+"/v1/split/chat/completions", streamBody, nil)
		if strings.Contains(body, "违") || strings.Contains(body, "然后") {
			t.Fatalf("part of the word, or the event holding it, reached the client: %q", body)
		}
		if !strings.HasPrefix(body, `data: {"choices":[{"delta":{"content":"一段很长的无害开头文字"}}]}`) ||
			!strings.HasSuffix(body, `"code":"content_filter"}}`+"\n\n") {
			t.Fatalf("got %q, want the first event then the content_filter error event", body)
		}
		select {
		case <-cancelled:
		case <-time.After(2 * time.Second):
			t.Fatal("the upstream was not cancelled")
		}
	})
	t.Run("clean answer is byte-exact", func(t *testing.T) {
		_, body := do(t, "POST", c.base()+"/v1/clean/chat/completions", streamBody, nil)
		want := ""
		for _, s := range []string{"你好", "，世界", "！这段话没有问题。", "结束"} {
			want += `data: {"choices":[{"delta":{"content":"` + s + `"}}]}` + "\n\n"
		}
		if body != want+"data: [DONE]\n\n" {
			t.Fatalf("got %q", body)
		}
	})
	t.Run("held back by at most the word's length", func(t *testing.T) {
		resp := send(t, "POST", c.base()+"/v1/held/chat/completions", streamBody, nil)
		defer resp.Body.Close()
		got := make(chan string, 1)
		go func() {
			line, _ := bufio.NewReader(resp.Body).ReadString('\n')
			got <- line
		}()
		select {
		case line := <-got:
			t.Fatalf("an event reached the client before 2 more characters followed it: %q", line)
		case <-time.After(100 * time.Millisecond):
		}
		close(ack)
		select {
		case line := <-got:
			if !strings.Contains(line, `"ab"`) {
				t.Fatalf("got %q", line)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("the held event was not released")
		}
		io.Copy(io.Discard, resp.Body)
	})
}

// deny_words_scope response|both holds for whole JSON answers too: a
// forbidden word turns the answer into a content_filter error, and none of
// it reaches the client; a clean answer passes byte-exact.
func TestDenyWordsInJSONAnswers(t *testing.T) {
	answers := map[string]string{
		"/v1/bad/chat/completions":         `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"这里有违禁词。"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}`,
		"/v1/messages":                     `{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Das ist VERBOTEN hier."}],"usage":{"input_tokens":5,"output_tokens":6}}`,
		"/v1beta/models/g:generateContent": `{"candidates":[{"content":{"parts":[{"text":"ein verboten wort"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}}`,
		"/v1/clean/chat/completions":       `{"id":"chatcmpl-2","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"没有问题。"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}`,
	}
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("x-request-id", "req_json")
		body := answers[r.URL.Path]
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/* /v1beta/*
		deny_words 违禁词 verboten
		deny_words_scope response
	}`)
	for _, p := range []string{"/v1/bad/chat/completions", "/v1/messages", "/v1beta/models/g:generateContent"} {
		resp, body := do(t, "POST", c.base()+p, `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, nil)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, `"code":"content_filter"`) {
			t.Errorf("%s: got %d %s, want 403 content_filter", p, resp.StatusCode, body)
		}
		if strings.Contains(body, "违禁") || strings.Contains(strings.ToLower(body), "verboten") || strings.Contains(body, "usage") {
			t.Errorf("%s: part of the answer reached the client: %s", p, body)
		}
	}
	resp, body := do(t, "POST", c.base()+"/v1/clean/chat/completions", `{"model":"m","messages":[]}`, nil)
	if resp.StatusCode != http.StatusOK || body != answers["/v1/clean/chat/completions"] {
		t.Fatalf("a clean answer: %d %q", resp.StatusCode, body)
	}
	if resp.Header.Get("X-Upstream-Request-Id") != "req_json" {
		t.Errorf("the held answer lost its headers: %v", resp.Header)
	}
	c.waitLog(`"usage_status":"exact"`, `"total_tokens":9`)

	// A body with no text to check (audio) is not held: it streams as it
	// comes, the first part before the upstream writes the second.
	ack := make(chan struct{})
	audio := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "audio/mpeg")
		flushWrite(w, "ID3-first-part")
		select {
		case <-ack:
		case <-time.After(3 * time.Second):
		}
		flushWrite(w, "-second-part")
	}))
	c.load(`llm_stream ` + audio.URL + ` {
		allow_paths /v1/audio/*
		deny_words verboten
		deny_words_scope response
	}`)
	first := make([]byte, len("ID3-first-part"))
	got := make(chan *http.Response, 1)
	go func() {
		// The headers too must come before the upstream is done.
		resp := send(t, "POST", c.base()+"/v1/audio/speech", `{"model":"tts-1","input":"hallo"}`, nil)
		_, _ = io.ReadFull(resp.Body, first)
		got <- resp
	}()
	select {
	case resp = <-got:
		if string(first) != "ID3-first-part" {
			t.Fatalf("first part: %q", first)
		}
	case <-time.After(2 * time.Second):
		close(ack)
		t.Fatal("an audio answer was held back for the deny-word check")
	}
	defer resp.Body.Close()
	close(ack)
	rest, _ := io.ReadAll(resp.Body)
	if string(rest) != "-second-part" {
		t.Errorf("rest of the audio: %q", rest)
	}
}

// requestTextDecoded is requestText as it was written first, decoding the
// body into values: the reference the byte walker must agree with.
func requestTextDecoded(body []byte) string {
	var top map[string]json.RawMessage
	if json.Unmarshal(body, &top) != nil {
		return ""
	}
	var sb strings.Builder
	var collect func(v any, key string)
	collect = func(v any, key string) {
		switch t := v.(type) {
		case string:
			switch key {
			case "system", "prompt", "input", "content", "text":
				if sb.Len() > 0 {
					sb.WriteByte('\n')
				}
				sb.WriteString(t)
			}
		case []any:
			for _, e := range t {
				collect(e, key)
			}
		case map[string]any:
			for _, k := range []string{"content", "text", "parts"} {
				if e, ok := t[k]; ok {
					collect(e, k)
				}
			}
		}
	}
	for _, k := range []string{"system", "messages", "prompt", "input", "contents"} {
		if raw, ok := top[k]; ok {
			var v any
			if json.Unmarshal(raw, &v) == nil {
				collect(v, k)
			}
		}
	}
	return sb.String()
}

// The byte walker finds the same text as decoding the body would, for
// every API's shape, escapes and nesting included.
func TestRequestTextAgreesWithDecoding(t *testing.T) {
	bodies := []string{
		`{"model":"m","messages":[{"role":"system","content":"Be \"brief\"\n\u00e9\ud83d\ude00"},{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}`,
		`{"system":[{"type":"text","text":"S1","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"Q"}],"max_tokens":5}`,
		`{"instructions":"I","input":[{"role":"user","content":[{"type":"input_text","text":"T"}]},{"type":"function_call_output","output":"o"}]}`,
		`{"input":"just a string","model":"m"}`,
		`{"contents":[{"role":"user","parts":[{"text":"G1"},{"inlineData":{"mimeType":"image/png","data":"x"}}]},{"role":"model","parts":[{"text":"G2"}]}]}`,
		`{"prompt":["a","b"],"messages":[],"system":"late system","input":{"content":"nested"}}`,
		` { "messages" : [ { "content" : "spaced" , "role" : "user" } ] , "messages":[{"content":"dup wins"}] } `,
		`{"model":"m","tools":[{"type":"function","function":{"name":"f","description":"not text"}}]}`,
		`[1,2,3]`,
	}
	for _, p := range providerStreams(0) {
		bodies = append(bodies, p.body)
	}
	for _, b := range bodies {
		if got, want := requestText([]byte(b)), requestTextDecoded([]byte(b)); got != want {
			t.Errorf("%s:\ngot  %q\nwant %q", b, got, want)
		}
	}
}

func BenchmarkRequestText(b *testing.B) {
	body := []byte(`{"model":"auto","stream":true,"messages":[{"role":"system","content":"You are careful."},{"role":"user","content":"Please review this contract for me."}]}`)
	b.ReportAllocs()
	for b.Loop() {
		_ = requestText(body)
	}
}

// skipString finds the end of every JSON string literal json.Marshal can
// write, whatever its escapes, and the rest of the body is untouched.
func TestSkipStringEndsWhereTheLiteralEnds(t *testing.T) {
	pieces := []string{`\`, `"`, `\\`, `a`, "\n", `é`, `\"`, `/`}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 5000 {
		var sb strings.Builder
		for range rng.IntN(12) {
			sb.WriteString(pieces[rng.IntN(len(pieces))])
		}
		lit, _ := json.Marshal(sb.String())
		b := append(append([]byte{}, lit...), `,"next":1}`...)
		if end := skipString(b, 0); end != len(lit) {
			t.Fatalf("%s: ends at %d, want %d", b, end, len(lit))
		}
	}
}

// A member name written with escapes is found by the name it decodes to,
// and of repeated members the last (the one the provider reads), so
// rewriting the model cannot be dodged by spelling "model" otherwise or
// by sending it twice.
func TestTopLevelValueDecodesEscapedNames(t *testing.T) {
	for _, body := range []string{`{"mod\u0065l":"auto","x":1}`, `{"x":{"model":"inner"},"model":"auto"}`, ` { "model" : "auto" } `,
		`{"model":"decoy","model":"auto"}`} {
		s, e := topLevelValue([]byte(body), "model")
		if s < 0 || body[s:e] != `"auto"` {
			t.Errorf("%s: found %d..%d", body, s, e)
		}
		if got := string(withModel([]byte(body), "chosen")); !strings.Contains(got, `"chosen"`) || strings.Contains(got, `"auto"`) {
			t.Errorf("%s: rewritten to %s", body, got)
		}
	}
}

// quoteJSON writes what json.Marshal writes.
func TestQuoteJSONAsMarshal(t *testing.T) {
	for _, s := range []string{"gpt-4o", "", `a"b`, `back\slash`, "tab\t", "é", "<&>", "model/with:colon", "\u2028"} {
		want, _ := json.Marshal(s)
		if got := quoteJSON(s); string(got) != string(want) {
			t.Errorf("%q: %s, want %s", s, got, want)
		}
	}
}
