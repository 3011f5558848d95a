package llmstream

import (
	"fmt"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/denyword"
	"io"
	"net/http"
	"testing"
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

var benchChunk = []byte(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}]}` + "\n\n")

// BenchmarkRelay measures the relay loop per chunk: write, flush, SSE
// parser with usage reading and the heartbeat/idle bookkeeping, for
// 1,000-chunk streams; "hide-usage" adds the event filter that keeps the
// include_usage chunk from clients that did not ask for it.
func BenchmarkRelay(b *testing.B) {
	const chunks = 1000
	var words []string
	for i := 0; i < 1000; i++ {
		words = append(words, fmt.Sprintf("禁词%d号", i), fmt.Sprintf("banned phrase %d", i))
	}
	deny := denyword.New(words[:1000])
	for _, mode := range []string{"pass-through", "hide-usage", "deny-1000-words"} {
		b.Run(mode, func(b *testing.B) {
			h := &Handler{Heartbeat: -1, IdleTimeout: 0}
			b.ReportAllocs()
			b.SetBytes(int64(len(benchChunk) * chunks))
			for b.Loop() {
				rl := newRelay(&discardWriter{hdr: http.Header{}}, h, true)
				rl.usage, rl.hideUsage = new(usage), mode == "hide-usage"
				if mode == "deny-1000-words" {
					rl.deny = deny
				}
				rl.frame = frameSSE
				rl.reading = true
				out := rl.copyBody(&chunkReader{chunk: benchChunk, n: chunks}, false)
				rl.stop()
				if out.err != nil {
					b.Fatal(out.err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*chunks), "ns/chunk")
		})
	}
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
		rl := newRelay(w, h, true)
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
