package llmstream

import (
	"bufio"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// openAIStream builds an OpenAI chat stream whose content deltas are texts,
// with the role chunk, finish chunk, usage chunk, a heartbeat comment and
// [DONE] around them.
func openAIStream(texts []string) string {
	head := `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":`
	var sb strings.Builder
	sb.WriteString(head + `{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n")
	for i, t := range texts {
		c, _ := json.Marshal(t)
		sb.WriteString(head + `{"content":` + string(c) + `},"logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n")
		if i == len(texts)/2 {
			sb.WriteString(": keep-alive\n\n")
		}
	}
	sb.WriteString(head + `{},"logprobs":null,"finish_reason":"stop"}],"usage":null}` + "\n\n")
	sb.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}` + "\n\n")
	sb.WriteString("data: [DONE]\n\n")
	return sb.String()
}

// streamParts splits a stream into its events' contents (delta texts) and
// the other events, in order.
func streamParts(t testing.TB, stream string) (content []string, others []string) {
	t.Helper()
	for _, ev := range strings.SplitAfter(stream, "\n\n") {
		if ev == "" {
			continue
		}
		data, ok := strings.CutPrefix(strings.TrimSuffix(ev, "\n\n"), "data: ")
		if !ok || !strings.Contains(data, `"content":"`) || strings.Contains(data, `"content":""`) {
			others = append(others, ev)
			continue
		}
		var c struct {
			Choices []struct {
				Delta struct{ Content string } `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			t.Fatalf("event %q: %v", ev, err)
		}
		content = append(content, c.Choices[0].Delta.Content)
	}
	return content, others
}

// recorder is a flushable ResponseWriter that keeps what was written.
type recorder struct {
	*httptest.ResponseRecorder
	flushes int
}

func (r *recorder) Flush() { r.flushes++ }

func TestSmoothKeepsEveryByteProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	words := []string{"a", "bc", "def ", "é", "中文", "😀", "👍🏽", `"q"`, `\`, "\n", "\u2028", "<&>", "x y z"}
	for i := 0; i < 300; i++ {
		var texts []string
		for n := 1 + rng.IntN(12); n > 0; n-- {
			var sb strings.Builder
			for k := rng.IntN(6); k >= 0; k-- {
				sb.WriteString(words[rng.IntN(len(words))])
			}
			texts = append(texts, sb.String())
		}
		in := openAIStream(texts)
		maxChars := 1 + rng.IntN(6)
		if i%10 == 0 {
			maxChars = 1000 // nothing to cut
		}
		rec := &recorder{ResponseRecorder: httptest.NewRecorder()}
		rec.Header().Set("Content-Type", "text/event-stream")
		sw := &smoothWriter{ResponseWriter: rec, rc: http.NewResponseController(rec), ctx: context.Background(),
			max: maxChars, interval: time.Nanosecond}
		sw.WriteHeader(http.StatusOK)
		for rest := in; len(rest) > 0; { // in reads of random sizes
			n := min(len(rest), 1+rng.IntN(300))
			if got, err := sw.Write([]byte(rest[:n])); err != nil || got != n {
				t.Fatalf("write: %d %v", got, err)
			}
			rest = rest[n:]
		}
		out := rec.Body.String()
		if maxChars == 1000 {
			if out != in {
				t.Fatalf("with nothing to cut the stream must pass unchanged:\n%q\n%q", in, out)
			}
			continue
		}
		inContent, inOthers := streamParts(t, in)
		outContent, outOthers := streamParts(t, out)
		if strings.Join(outContent, "") != strings.Join(inContent, "") {
			t.Fatalf("text changed:\nin  %q\nout %q", inContent, outContent)
		}
		if strings.Join(outOthers, "") != strings.Join(inOthers, "") {
			t.Fatalf("other events changed or moved:\nin  %q\nout %q", inOthers, outOthers)
		}
		for _, p := range outContent {
			if n := utf8.RuneCountInString(p); n > maxChars {
				t.Fatalf("piece %q has %d characters, max %d", p, n, maxChars)
			}
		}
		if rec.flushes < len(outContent) {
			t.Fatalf("%d flushes for %d pieces", rec.flushes, len(outContent))
		}
	}
}

// burstUpstream sends its tokens in bursts: each burst in one write, then
// a pause, like some providers do.
func burstUpstream(t testing.TB, bursts [][]string, pause time.Duration) *fakeUpstream {
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		for i, burst := range bursts {
			if i > 0 {
				time.Sleep(pause)
			}
			s := openAIStream(burst)
			// Only the content chunks of this burst (the stream helper adds
			// the frame around them): the first burst carries the role
			// chunk, the last the end.
			ev := strings.SplitAfter(s, "\n\n")
			from, to := 1, len(ev)-4
			if i == 0 {
				from = 0
			}
			if i == len(bursts)-1 {
				to = len(ev)
			}
			_, _ = w.Write([]byte(strings.Join(ev[from:to], "")))
			_ = rc.Flush()
		}
	}))
	return up
}

// arrivals posts a stream request and returns each content event's text
// and arrival time, and when the stream ended.
func arrivals(t testing.TB, url string) (texts []string, at []time.Time, end time.Time) {
	t.Helper()
	resp := send(t, "POST", url, `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}`, nil)
	defer resp.Body.Close()
	for ev := range readEvents(bufio.NewReader(resp.Body)) {
		now := time.Now()
		content, _ := streamParts(t, ev)
		for _, c := range content {
			texts = append(texts, c)
			at = append(at, now)
		}
	}
	return texts, at, time.Now()
}

func TestSmoothPacesBursts(t *testing.T) {
	burst := []string{"Hello", " wonderful", " world,", " this", " is", " a", " burst", " of", " ten", " tokens 中文😀."}
	up := burstUpstream(t, [][]string{burst, burst}, 300*time.Millisecond)
	const interval = 20 * time.Millisecond
	c := startCaddy(t, `route /smooth/* {
		uri strip_prefix /smooth
		llm_stream `+up.URL+` {
			smooth 4 20ms
		}
	}
	llm_stream `+up.URL)
	whole := strings.Repeat(strings.Join(burst, ""), 2)

	// Off by default: each burst arrives at once.
	texts, at, _ := arrivals(t, c.base()+"/v1/chat/completions")
	if strings.Join(texts, "") != whole || len(texts) != 20 {
		t.Fatalf("unsmoothed: %q", texts)
	}
	if spread := at[9].Sub(at[0]); spread > 15*time.Millisecond {
		t.Errorf("without smooth a burst should arrive at once, it took %s", spread)
	}

	texts, at, end := arrivals(t, c.base()+"/smooth/v1/chat/completions")
	if strings.Join(texts, "") != whole {
		t.Fatalf("smoothed text differs:\n%q\n%q", strings.Join(texts, ""), whole)
	}
	pieces := len(texts) / 2
	for _, p := range texts {
		if utf8.RuneCountInString(p) > 4 {
			t.Errorf("piece %q is longer than 4 characters", p)
		}
	}
	var gaps []time.Duration
	for i := 1; i < pieces; i++ {
		gaps = append(gaps, at[i].Sub(at[i-1]))
	}
	sort.Slice(gaps, func(i, j int) bool { return gaps[i] < gaps[j] })
	median := gaps[len(gaps)/2]
	t.Logf("a burst of 10 tokens became %d pieces; median gap %s, smallest %s; the burst took %s",
		pieces, median, gaps[0], at[pieces-1].Sub(at[0]))
	if median < interval-2*time.Millisecond || at[pieces-1].Sub(at[0]) < time.Duration(pieces-2)*interval {
		t.Errorf("pieces are not paced at %s: median gap %s", interval, median)
	}
	// The end is late by at most one interval per piece of the last burst
	// (plus scheduling slack).
	lastBurst := at[pieces]
	if late := end.Sub(lastBurst); late > time.Duration(pieces)*interval+150*time.Millisecond {
		t.Errorf("the stream ended %s after the last burst began arriving, for %d pieces", late, pieces)
	}
}
