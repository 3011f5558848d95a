package sse

import (
	"strings"
	"testing"
)

type got struct {
	name, data string
}

// reference parses a whole stream the plain way (split into lines first),
// following the SSE specification's dispatch rules.
func reference(s string) (events []got, boundary bool) {
	s = strings.ReplaceAll(s, "\r\n", "\n")
	s = strings.ReplaceAll(s, "\r", "\n")
	lines := strings.Split(s, "\n")
	last := lines[len(lines)-1] // unterminated tail
	lines = lines[:len(lines)-1]
	var name string
	var data []string
	open, hasData := false, false
	for _, l := range lines {
		if l == "" {
			if open {
				events = append(events, got{name, strings.Join(data, "\n")})
				_ = hasData
			}
			name, data, open, hasData = "", nil, false, false
			continue
		}
		if l[0] == ':' {
			continue
		}
		open = true
		f, v, ok := strings.Cut(l, ":")
		if ok && strings.HasPrefix(v, " ") {
			v = v[1:]
		}
		switch f {
		case "data":
			data = append(data, v)
			hasData = true
		case "event":
			name = v
		}
	}
	return events, last == "" && !open
}

func feedSplit(p *Parser, s string, cuts []int) {
	prev := 0
	for _, c := range cuts {
		if c <= prev || c >= len(s) {
			continue
		}
		p.Feed([]byte(s[prev:c]))
		prev = c
	}
	p.Feed([]byte(s[prev:]))
}

func collect(s string, cuts []int) ([]got, *Parser) {
	var out []got
	p := &Parser{OnEvent: func(e Event) { out = append(out, got{string(e.Name), string(e.Data)}) }}
	feedSplit(p, s, cuts)
	return out, p
}

func TestParserEvents(t *testing.T) {
	tests := []struct {
		name     string
		in       string
		want     []got
		boundary bool
		dataEv   int
	}{
		{"openai chunks", "data: {\"a\":1}\n\ndata: [DONE]\n\n", []got{{"", `{"a":1}`}, {"", "[DONE]"}}, true, 2},
		{"crlf", "data: x\r\n\r\n", []got{{"", "x"}}, true, 1},
		{"cr only", "data: x\r\rdata: y\r\r", []got{{"", "x"}, {"", "y"}}, true, 2},
		{"anthropic named", "event: message_start\ndata: {\"type\":\"message_start\"}\n\n", []got{{"message_start", `{"type":"message_start"}`}}, true, 1},
		{"multi-line data", "data: a\ndata:b\ndata\n\n", []got{{"", "a\nb\n"}}, true, 1},
		{"comments only", ": keep-alive\n\n: PROCESSING\n\n", nil, true, 0},
		{"mid event", "data: x\n", nil, false, 0},
		{"mid line", "data: x", nil, false, 0},
		{"id and retry", "id: 7\nretry: 100\n\n", []got{{"", ""}}, true, 0},
		{"event replaced", "event: a\nevent: b\ndata: 1\n\n", []got{{"b", "1"}}, true, 1},
		{"utf8", "data: 你好\n\n", []got{{"", "你好"}}, true, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// every way of cutting the input in two and in single bytes
			splits := [][]int{nil}
			for i := 1; i < len(tc.in); i++ {
				splits = append(splits, []int{i})
			}
			var bytewise []int
			for i := 1; i < len(tc.in); i++ {
				bytewise = append(bytewise, i)
			}
			splits = append(splits, bytewise)
			for _, cuts := range splits {
				evs, p := collect(tc.in, cuts)
				if len(evs) != len(tc.want) {
					t.Fatalf("cuts %v: got %d events %q, want %q", cuts, len(evs), evs, tc.want)
				}
				for i := range evs {
					if evs[i] != tc.want[i] {
						t.Fatalf("cuts %v: event %d got %q, want %q", cuts, i, evs[i], tc.want[i])
					}
				}
				if p.AtBoundary() != tc.boundary {
					t.Fatalf("cuts %v: AtBoundary got %v, want %v", cuts, p.AtBoundary(), tc.boundary)
				}
				if p.DataEvents() != tc.dataEv {
					t.Fatalf("cuts %v: DataEvents got %d, want %d", cuts, p.DataEvents(), tc.dataEv)
				}
			}
		})
	}
}

func TestSawFieldIgnoresComments(t *testing.T) {
	var p Parser
	p.Feed([]byte(": PROCESSING\n\n: keep-alive\n\n"))
	if p.SawField() {
		t.Fatal("comments counted as a field")
	}
	p.Feed([]byte("event: x"))
	if p.SawField() { // field line not yet terminated
		t.Fatal("unterminated line counted as a field")
	}
	p.Feed([]byte("\n"))
	if !p.SawField() {
		t.Fatal("event field not seen")
	}
}

func TestTruncatedData(t *testing.T) {
	big := strings.Repeat("x", MaxEventData+10)
	evs := 0
	p := &Parser{OnEvent: func(e Event) {
		evs++
		if !e.Truncated || len(e.Data) != MaxEventData {
			t.Fatalf("got truncated=%v len=%d", e.Truncated, len(e.Data))
		}
	}}
	p.Feed([]byte("data: " + big + "\n\n"))
	if evs != 1 {
		t.Fatalf("got %d events, want 1", evs)
	}
}

func FuzzParser(f *testing.F) {
	f.Add("data: {\"a\":1}\n\ndata: [DONE]\n\n", uint8(3))
	f.Add("event: x\r\ndata: y\r\n\r\n: c\n\n", uint8(1))
	f.Add("data: a\rdata: b\r\r", uint8(7))
	// LF-only reads take a faster path; these cross between the two
	f.Add("data: x\n\nevent: e\ndata:y\n\n: c\ndata\ndat\n\ndata: [DONE]\n\n", uint8(2))
	f.Add("data: a\r\n\r\ndata: b\n\ndata: c\r\rdata:d\n\n", uint8(5))
	f.Fuzz(func(t *testing.T, in string, step uint8) {
		want, boundary := reference(in)
		var cuts []int
		if step > 0 {
			for i := int(step); i < len(in); i += int(step) {
				cuts = append(cuts, i)
			}
		}
		evs, p := collect(in, cuts)
		if len(evs) != len(want) {
			t.Fatalf("got %q, want %q", evs, want)
		}
		for i := range evs {
			if evs[i] != want[i] {
				t.Fatalf("event %d: got %q, want %q", i, evs[i], want[i])
			}
		}
		if p.AtBoundary() != boundary {
			t.Fatalf("AtBoundary got %v, want %v", p.AtBoundary(), boundary)
		}
		checkEnds(t, in, append(cuts, len(in)))
	})
}

// checkEnds feeds s in pieces and checks Ends after each piece against the
// reference parser: both ends fall between events, the prefix up to the
// last end holds all events dispatched so far, no blank line comes before
// the first end, and a CRLF is never split by an end.
func checkEnds(t *testing.T, s string, cuts []int) {
	n := 0
	p := &Parser{OnEvent: func(Event) { n++ }}
	prev := 0
	for _, c := range cuts {
		if c <= prev || c > len(s) {
			continue
		}
		before := n
		piece := s[prev:c]
		p.Feed([]byte(piece))
		first, last := p.Ends()
		if last < 0 {
			if n != before || first >= 0 {
				t.Fatalf("piece %q: no end reported, but %d events ended", piece, n-before)
			}
			prev = c
			continue
		}
		for _, end := range []int{first, last} {
			if _, boundary := reference(s[:prev+end]); !boundary {
				t.Fatalf("piece %q: end %d is inside an event", piece, end)
			}
			if end < len(piece) && piece[end] == '\n' && piece[end-1] == '\r' {
				t.Fatalf("piece %q: end %d splits a CRLF", piece, end)
			}
		}
		if evs, _ := reference(s[:prev+last]); len(evs) != n {
			t.Fatalf("piece %q: last end %d holds %d events, want %d", piece, last, len(evs), n)
		}
		if evs, _ := reference(s[:prev+first]); len(evs) > before+1 {
			t.Fatalf("piece %q: first end %d comes after %d events", piece, first, len(evs)-before)
		}
		prev = c
	}
}

// BenchmarkParser feeds OpenAI chunks in reads of one chunk ("lf", the
// common case; "crlf", the slower path for streams with CRs) and of 4 KiB
// cutting events anywhere ("lf-4k").
func BenchmarkParser(b *testing.B) {
	chunk := `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n"
	for _, c := range []struct {
		name, chunk string
		read        int
	}{
		{"lf", chunk, len(chunk)},
		{"crlf", strings.ReplaceAll(chunk, "\n", "\r\n"), len(chunk) + 2},
		{"lf-4k", chunk, 4096},
	} {
		b.Run(c.name, func(b *testing.B) {
			stream := []byte(strings.Repeat(c.chunk, 1000))
			b.SetBytes(int64(len(stream)))
			b.ReportAllocs()
			var p Parser
			for b.Loop() {
				for rest := stream; len(rest) > 0; {
					n := min(c.read, len(rest))
					p.Feed(rest[:n])
					rest = rest[n:]
				}
			}
			if p.DataEvents() == 0 {
				b.Fatal("no events seen")
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*1000), "ns/chunk")
		})
	}
}
