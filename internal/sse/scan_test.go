package sse

import (
	"math/rand/v2"
	"strings"
	"testing"
)

// randomStream builds an event stream from the field lines providers send,
// with LF and CRLF line ends, comments and blank lines between events.
func randomStream(r *rand.Rand) string {
	var sb strings.Builder
	lines := []string{"data: {\"a\":1}", "data:x", "data: two words", "event: message_delta", "event:ping",
		": keep-alive", "id: 7", "retry: 100", "data: ", "data: 漢字"}
	for e := r.IntN(8); e >= 0; e-- {
		eol := "\n"
		if r.IntN(3) == 0 {
			eol = "\r\n"
		}
		for l := 1 + r.IntN(4); l > 0; l-- {
			sb.WriteString(lines[r.IntN(len(lines))] + eol)
		}
		sb.WriteString(eol)
	}
	return sb.String()
}

// EventEnd and Fields read stored events the way the Parser reads them
// live: the same events, with the same names and data.
func TestScanAgreesWithParser(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		stream := randomStream(r)
		type ev struct{ name, data string }
		var live []ev
		p := Parser{OnEvent: func(e Event) {
			if len(e.Name) > 0 || len(e.Data) > 0 {
				live = append(live, ev{string(e.Name), string(e.Data)})
			}
		}}
		p.Feed([]byte(stream))
		var scanned []ev
		b := []byte(stream)
		for start := 0; start < len(b); {
			end := EventEnd(b, start)
			if end < 0 {
				t.Fatalf("stream %q: no end after %d", stream, start)
			}
			name, data := Fields(b[start:end])
			if len(name) > 0 || len(data) > 0 {
				scanned = append(scanned, ev{string(name), strings.TrimRight(string(data), "\r")})
			}
			start = end
		}
		if len(live) != len(scanned) {
			t.Fatalf("stream %q: parser saw %d events %q, scan %d %q", stream, len(live), live, len(scanned), scanned)
		}
		for j := range live {
			if live[j] != scanned[j] {
				t.Fatalf("stream %q: event %d: parser %q, scan %q", stream, j, live[j], scanned[j])
			}
		}
	}
}

func TestEventEndWaitsForCRLF(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
	}{
		{"data: a\n\n", 9},
		{"data: a\r\n\r\n", 11},
		{"data: a\r\n\r", -1}, // the LF may still come
		{"data: a\n", -1},
		{"\n", 1},
		{": c\n\ndata: b\n\n", 5},
	} {
		if got := EventEnd([]byte(tc.in), 0); got != tc.want {
			t.Errorf("EventEnd(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}
