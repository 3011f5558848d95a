package llmstream

import (
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
// parser and the heartbeat/idle bookkeeping, for 1,000-chunk streams.
func BenchmarkRelay(b *testing.B) {
	const chunks = 1000
	h := &Handler{Heartbeat: -1, IdleTimeout: 0}
	b.ReportAllocs()
	b.SetBytes(int64(len(benchChunk) * chunks))
	for b.Loop() {
		rl := newRelay(&discardWriter{hdr: http.Header{}}, h, true, func(error) {})
		rl.frame = frameSSE
		rl.reading = true
		out := rl.copyBody(&chunkReader{chunk: benchChunk, n: chunks}, false)
		rl.stop()
		if out.err != nil {
			b.Fatal(out.err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*chunks), "ns/chunk")
}
