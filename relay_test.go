package llmstream

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/denyword"
)

// discardWriter is a ResponseWriter that drops what it gets and can flush.
type discardWriter struct{ hdr http.Header }

func (d *discardWriter) Header() http.Header         { return d.hdr }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) WriteHeader(int)             {}
func (d *discardWriter) Flush()                      {}

// chunkReader returns one chunk per Read, n times.
type chunkReader struct {
	chunk []byte
	n     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.n == 0 {
		return 0, io.EOF
	}
	c.n--
	return copy(p, c.chunk), nil
}

var benchChunk = []byte(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n")

// benchStream is a whole 1,000-chunk answer as include_usage makes it: every
// chunk carries "usage":null, then the usage chunk and [DONE].
var benchStream = func() []byte {
	var s []byte
	for range 1000 {
		s = append(s, benchChunk...)
	}
	s = append(s, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1000,"total_tokens":1009}}`+"\n\n"...)
	return append(s, "data: [DONE]\n\n"...)
}()

// BenchmarkRelay measures the relay loop per chunk: write, flush, SSE
// parser with usage reading and the heartbeat/idle bookkeeping, for
// 1,000-chunk streams; "hide-usage" adds the event filter that keeps the
// include_usage chunk from clients that did not ask for it. "paced" reads
// one chunk at a time (a model streaming at its own pace); "burst" reads
// 4 KiB at a time, cutting events anywhere (a backlog after a stall).
func BenchmarkRelay(b *testing.B) {
	const chunks = 1000
	var words []string
	for i := 0; i < 1000; i++ {
		words = append(words, fmt.Sprintf("禁词%d号", i), fmt.Sprintf("banned phrase %d", i))
	}
	deny := denyword.New(words[:1000])
	for _, reads := range []string{"paced", "burst"} {
		for _, mode := range []string{"pass-through", "hide-usage", "deny-1000-words"} {
			b.Run(reads+"/"+mode, func(b *testing.B) {
				h := &Handler{Heartbeat: -1, IdleTimeout: 0}
				b.ReportAllocs()
				b.SetBytes(int64(len(benchChunk) * chunks))
				for b.Loop() {
					rl := newRelay(&discardWriter{hdr: http.Header{}}, h.relayConfig(true))
					rl.usage, rl.hideUsage = new(usage), mode == "hide-usage"
					if mode == "deny-1000-words" {
						rl.deny = deny
					}
					rl.frame = frameSSE
					rl.reading = true
					var body io.Reader = &chunkReader{chunk: benchChunk, n: chunks}
					if reads == "burst" {
						body = &pieceReader{b: benchStream, n: 4096}
					}
					out := rl.copyBody(body, false)
					rl.stop()
					if out.err != nil {
						b.Fatal(out.err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*chunks), "ns/chunk")
			})
		}
	}
}

// pieceReader returns b in reads of at most n bytes.
type pieceReader struct {
	b []byte
	n int
}

func (r *pieceReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.n)], r.b)
	r.b = r.b[n:]
	return n, nil
}

// recordWriter keeps what the relay wrote.
type recordWriter struct {
	discardWriter
	got []byte
}

func (r *recordWriter) Write(b []byte) (int, error) { r.got = append(r.got, b...); return len(b), nil }

// TestHideUsageAcrossReadSplits cuts a stream at every byte and checks that
// exactly the include_usage chunk is dropped, whatever the read boundaries,
// and that usage is still read.
func TestHideUsageAcrossReadSplits(t *testing.T) {
	chunk := "data: {\"choices\":[{\"delta\":{\"content\":\"usage\\\":{ is text\"}}],\"usage\":null}\r\n\r\n"
	usageChunk := "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\r\n\r\n"
	stream := ": c\n\n" + chunk + chunk + usageChunk + "data: [DONE]\n\n"
	want := ": c\n\n" + chunk + chunk + "data: [DONE]\n\n"
	h := &Handler{Heartbeat: -1}
	for cut := 1; cut < len(stream); cut++ {
		w := &recordWriter{discardWriter: discardWriter{hdr: http.Header{}}}
		rl := newRelay(w, h.relayConfig(true))
		u := new(usage)
		rl.usage, rl.hideUsage, rl.frame, rl.reading = u, true, frameSSE, true
		rl.copyBody(&splitReader{parts: []string{stream[:cut], stream[cut:]}}, false)
		rl.stop()
		if string(w.got) != want {
			t.Fatalf("cut at %d: got %q", cut, w.got)
		}
		if u.total() != 7 {
			t.Fatalf("cut at %d: usage %+v", cut, u)
		}
	}
}

type splitReader struct{ parts []string }

func (s *splitReader) Read(p []byte) (int, error) {
	if len(s.parts) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.parts[0])
	if n < len(s.parts[0]) {
		s.parts[0] = s.parts[0][n:]
	} else {
		s.parts = s.parts[1:]
	}
	return n, nil
}

// TestHideUsageWithCommentsAcrossReads cuts a CRLF stream whose usage
// chunk follows a comment into three reads at every pair of places: the
// blank line that ends the comment must reach the client even when its CR
// and LF arrive in reads of their own (it was once dropped with the usage
// chunk that followed it).
func TestHideUsageWithCommentsAcrossReads(t *testing.T) {
	chunk := "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\r\n\r\n"
	usageChunk := "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\r\n\r\n"
	stream := chunk + ": keep-alive\r\n\r\n" + usageChunk + "data: [DONE]\r\n\r\n"
	want := chunk + ": keep-alive\r\n\r\n" + "data: [DONE]\r\n\r\n"
	for a := 1; a < len(stream); a++ {
		for b := a + 1; b < len(stream); b++ {
			w := &recordWriter{discardWriter: discardWriter{hdr: http.Header{}}}
			rl := newRelay(w, (&Handler{Heartbeat: -1}).relayConfig(true))
			rl.usage, rl.hideUsage, rl.frame, rl.reading = new(usage), true, frameSSE, true
			rl.copyBody(&splitReader{parts: []string{stream[:a], stream[a:b], stream[b:]}}, false)
			if string(w.got) != want {
				t.Fatalf("cuts %q | %q | %q:\ngot  %q", stream[:a], stream[a:b], stream[b:], w.got)
			}
		}
	}
}

// TestEventsAcrossRandomReads relays random event streams (LF, CRLF and CR
// line endings, comments, named events, events longer than the relay's read
// buffers) cut into random reads, with usage
// reading alone, with the include_usage chunk hidden, and with deny words
// that never match, and checks the bytes the client gets and the usage read.
func TestEventsAcrossRandomReads(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	words := denyword.New([]string{"never said"})
	for iter := range 3000 {
		eol := []string{"\n", "\r\n", "\r"}[iter%3]
		var stream, hidden strings.Builder
		add := func(ev string, keep bool) {
			ev = strings.ReplaceAll(ev, "\n", eol)
			stream.WriteString(ev)
			if keep {
				hidden.WriteString(ev)
			}
		}
		for i := range rng.IntN(12) {
			switch rng.IntN(5) {
			case 0:
				add(": keep-alive\n\n", true)
			case 4: // longer than half a small read buffer, at times than a large one
				add(fmt.Sprintf("data: {\"choices\":[{\"delta\":{\"content\":\"%s\"}}],\"usage\":null}\n\n", strings.Repeat("long ", rng.IntN(8000))), true)
			case 1:
				add("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n", true)
			default:
				add(fmt.Sprintf("data: {\"choices\":[{\"delta\":{\"content\":\"tok%d ü€\"}}],\"usage\":null}\n\n", i), true)
			}
		}
		add("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n", false)
		add("data: [DONE]\n\n", true)
		in := stream.String()
		var parts []string
		maxRead := []int{120, 3000, 50000}[rng.IntN(3)] // large reads move the relay to its large buffer
		for rest := in; len(rest) > 0; {
			n := min(len(rest), 1+rng.IntN(maxRead))
			parts, rest = append(parts, rest[:n]), rest[n:]
		}
		for _, mode := range []string{"usage", "hide", "deny"} {
			w := &recordWriter{discardWriter: discardWriter{hdr: http.Header{}}}
			rl := newRelay(w, (&Handler{Heartbeat: -1}).relayConfig(true))
			u := new(usage)
			rl.usage, rl.frame, rl.reading = u, frameSSE, true
			want := in
			switch mode {
			case "hide":
				rl.hideUsage, want = true, hidden.String()
			case "deny":
				rl.deny = words
			}
			out := rl.copyBody(&splitReader{parts: append([]string(nil), parts...)}, false)
			rl.stop()
			if out.err != nil {
				t.Fatalf("%s, stream %d: %v", mode, iter, out.err)
			}
			if got := string(w.got); got != want {
				i := 0
				for i < min(len(got), len(want)) && got[i] == want[i] {
					i++
				}
				t.Fatalf("%s, stream %d (%d bytes in %d reads, eol %q): got %d bytes, want %d; first difference at %d:\ngot  %q\nwant %q",
					mode, iter, len(in), len(parts), eol, len(got), len(want), i, clip(got, i), clip(want, i))
			}
			if u.total() != 7 {
				t.Fatalf("%s, stream %d: usage %+v", mode, iter, u)
			}
		}
	}
}

// TestOneWritePerRead checks that the include_usage filter, which keeps
// the start of an open event back until it ends, still writes each read to
// the client in one write (a write and a flush per read, as without the
// filter), not one for the completed event and one for the events after it.
func TestOneWritePerRead(t *testing.T) {
	for _, hide := range []bool{false, true} {
		w := &writeCounter{}
		w.hdr = http.Header{}
		rl := newRelay(w, (&Handler{Heartbeat: -1}).relayConfig(true))
		rl.usage, rl.hideUsage, rl.frame, rl.reading = new(usage), hide, frameSSE, true
		// reads that end inside an event, through the small and the large buffer
		body := &pieceReader{b: benchStream, n: 700}
		reads := (len(benchStream) + 699) / 700
		if out := rl.copyBody(body, false); out.err != nil {
			t.Fatal(out.err)
		}
		rl.stop()
		want := string(benchStream)
		if hide {
			want = strings.Replace(want, want[strings.Index(want, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","choices":[]`):strings.Index(want, "data: [DONE]")], "", 1)
		}
		if string(w.got) != want {
			t.Fatalf("hide %v: the client got other bytes than expected", hide)
		}
		// the read that holds the dropped usage chunk writes what is
		// before it and what is after it
		if w.writes > reads+1 || w.flushes > reads {
			t.Errorf("hide %v: %d reads made %d writes and %d flushes", hide, reads, w.writes, w.flushes)
		}
	}
}

// writeCounter keeps what it gets and counts writes and flushes.
type writeCounter struct {
	recordWriter
	writes, flushes int
}

func (c *writeCounter) Write(b []byte) (int, error) { c.writes++; return c.recordWriter.Write(b) }
func (c *writeCounter) Flush()                      { c.flushes++ }

// clip is s around i, for failure messages about long streams.
func clip(s string, i int) string {
	return s[max(0, i-60):min(len(s), i+60)]
}

// A whole JSON answer is passed on as it is read but goes out in one piece
// with its end (no client reads JSON before its end, and a flush per read
// costs a write each): the client gets nothing of it while the upstream is
// still writing; an event stream is flushed read by read as ever.
func TestWholeJSONAnswerIsNotFlushedByRead(t *testing.T) {
	for _, tc := range []struct {
		name, contentType, body string
		wantEarly, tls          bool
	}{
		{name: "json", contentType: "application/json", body: `{"model":"gpt-4o","messages":[]}`},
		{name: "json from HTTP/2 over TLS", contentType: "application/json", body: `{"model":"gpt-4o","messages":[]}`, tls: true},
		{name: "event stream", contentType: "text/event-stream", body: streamBody, wantEarly: true},
		{name: "event stream from HTTP/2 over TLS", contentType: "text/event-stream", body: streamBody, wantEarly: true, tls: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, rest := `{"id":"chatcmpl-1","object":"chat.completion",`, `"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}`
			if tc.wantEarly {
				first, rest = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", "data: [DONE]\n\n"
			}
			wrote, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			free := func() { once.Do(func() { close(release) }) }
			defer free() // a failed test must not leave the upstream waiting (before the cleanups stop Caddy)
			opts := []upstreamOption{answering(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", tc.contentType)
				w.Header().Set("X-Request-Id", "req_upstream")
				flushWrite(w, first)
				close(wrote)
				<-release
				_, _ = io.WriteString(w, rest)
			})}
			transport := ""
			if tc.tls {
				opts = append(opts, overTLS())
			}
			up := newUpstream(t, opts...)
			if tc.tls {
				transport = "transport http {\n\t\t\ttls_trust_pool file " + up.caFile + "\n\t\t}"
			}
			c := startCaddy(t, `llm_stream `+up.URL+` {
		api_key `+testKey+`
		`+transport+`
	}`)
			got := make(chan string, 1)
			go func() {
				resp := send(t, "POST", c.base()+"/v1/chat/completions", tc.body, nil)
				defer resp.Body.Close()
				b := make([]byte, 4096)
				n, _ := resp.Body.Read(b)
				got <- string(b[:n])
				rb, _ := io.ReadAll(resp.Body)
				got <- string(b[:n]) + string(rb)
			}()
			<-wrote
			// JSON: how long nothing may arrive; a stream: how long its first
			// event may take on a loaded machine
			wait := 500 * time.Millisecond
			if tc.wantEarly {
				wait = 10 * time.Second
			}
			select {
			case early := <-got:
				if !tc.wantEarly {
					t.Fatalf("the client had %q of a JSON answer before its end", early)
				}
				if early != first {
					t.Fatalf("first read %q, want %q", early, first)
				}
			case <-time.After(wait):
				if tc.wantEarly {
					t.Fatal("the first event did not reach the client before the stream went on")
				}
			}
			free()
			if !tc.wantEarly {
				<-got // the first read, after the release
			}
			if all := <-got; all != first+rest {
				t.Errorf("client got %q, want %q", all, first+rest)
			}
			if seen := up.requests(); tc.tls && (len(seen) != 1 || seen[0].Proto != "HTTP/2.0") {
				t.Errorf("the upstream was not reached over HTTP/2: %+v", seen)
			}
		})
	}
}

// What the client's response gets of the upstream's headers: the end-to-end
// fields, not the hop-by-hop ones (listed or named in Connection) nor the
// upstream's cookies; and what the response already had stays: Caddy's
// own Alt-Svc (its HTTP/3 advertisement, where the upstream's describes
// the upstream) and the handler's request id beside the provider's.
func TestResponseHeadersForTheClient(t *testing.T) {
	dst := http.Header{
		"Server":          {"Caddy"},
		"Alt-Svc":         {`h3=":443"; ma=2592000`},
		"X-Request-Id":    {"ours"},
		"X-Caddy-Ignored": {"kept"},
	}
	src := http.Header{
		"Content-Type":       {"text/event-stream"},
		"Openai-Version":     {"2020-10-01"},
		"X-Request-Id":       {"req_provider"},
		"Alt-Svc":            {`h3=":443"; ma=86400`},
		"Connection":         {"keep-alive, X-Hop-Trace", "x-caddy-ignored"},
		"X-Hop-Trace":        {"1"},
		"Keep-Alive":         {"timeout=5"},
		"Set-Cookie":         {"__cf_bm=abc; path=/; domain=.api.openai.com", "_cfuvid=def"},
		"Proxy-Authenticate": {"Basic"},
		"Transfer-Encoding":  {"chunked"},
		"Vary":               {"Origin", "Accept-Encoding"},
	}
	copyResponseHeaders(dst, src)
	want := http.Header{
		"Server":                {"Caddy"},
		"Alt-Svc":               {`h3=":443"; ma=2592000`},
		"X-Request-Id":          {"ours"},
		"X-Caddy-Ignored":       {"kept"},
		"Content-Type":          {"text/event-stream"},
		"Openai-Version":        {"2020-10-01"},
		"Vary":                  {"Origin", "Accept-Encoding"},
		"X-Upstream-Request-Id": {"req_provider"},
	}
	if !reflect.DeepEqual(dst, want) {
		t.Errorf("client's headers\n got %v\nwant %v", dst, want)
	}
	// Values are copies: the upstream's header may be reused.
	src["Vary"][0] = "changed"
	if dst.Get("Vary") != "Origin" {
		t.Error("the client's Vary shares the upstream's storage")
	}
}
