// Package sse observes a Server-Sent Events byte stream as it is relayed.
//
// The Parser never buffers the stream for the relay: it is fed the bytes
// after (or while) they are written to the client and keeps just enough state
// to know where events begin and end, which fields have been seen, and — only
// when asked for — the name and data of each complete event. Line endings may
// be LF, CR or CRLF, and any of them may be split across reads.
package sse

import "bytes"

// MaxEventData bounds the data the parser assembles for OnEvent. Longer
// events are still parsed and dispatched, with Truncated set.
const MaxEventData = 1 << 20

// Event is a complete event handed to OnEvent. Its slices are only valid
// during the call.
type Event struct {
	Name      []byte // the "event:" field; empty means "message"
	Data      []byte // "data:" lines joined with "\n"
	Truncated bool   // Data was cut at MaxEventData
}

// Parser tracks event boundaries in an SSE stream. The zero value is ready
// to use. It is not safe for concurrent use.
type Parser struct {
	// OnEvent, when set, is called for every dispatched event that carried
	// at least one field. Leave it nil to keep the parser allocation-free.
	OnEvent func(Event)

	inLine    bool // inside a line (some bytes of it seen, no terminator yet)
	pendingCR bool // the previous byte was a CR: a following LF belongs to it
	eventOpen bool // a field line was seen since the last blank line

	// current line
	comment  bool
	nameDone bool
	name     [8]byte
	nameLen  int
	valStart bool // the next value byte is the first one (skip one space)

	sawField   bool
	dataEvents int

	// where events ended in the slice given to the last Feed
	pos, first, last int

	// assembled only when OnEvent is set
	evName    []byte
	evData    []byte
	evHasData bool
	evTrunc   bool
}

// AtBoundary reports whether the bytes fed so far end between events, where
// a comment such as a heartbeat can be inserted without changing any event.
func (p *Parser) AtBoundary() bool { return !p.inLine && !p.eventOpen }

// InLine reports whether the bytes fed so far end inside a line.
func (p *Parser) InLine() bool { return p.inLine }

// SawField reports whether any field line (data, event, id, retry or an
// unknown field) has been seen. Comments alone leave it false.
func (p *Parser) SawField() bool { return p.sawField }

// DataEvents is the number of dispatched events that carried data.
func (p *Parser) DataEvents() int { return p.dataEvents }

// Ends reports where blank lines ended in the bytes given to the last Feed,
// the points at which that slice can be split into whole events (each with
// the comments before it): the offsets just after the first and the last
// blank line (after the LF of a CRLF when the same slice holds it), or
// -1, -1 when it has none.
func (p *Parser) Ends() (first, last int) { return p.first, p.last }

// Feed observes the next bytes of the stream.
func (p *Parser) Feed(b []byte) {
	p.first, p.last = -1, -1
	if !p.pendingCR && bytes.IndexByte(b, '\r') < 0 {
		p.feedLF(b)
		return
	}
	n := len(b)
	for len(b) > 0 {
		if p.pendingCR {
			p.pendingCR = false
			if b[0] == '\n' {
				if p.last == n-len(b) {
					p.last++ // the LF belongs to the blank line's CR
					if p.first == p.last-1 {
						p.first = p.last
					}
				}
				b = b[1:]
				continue
			}
		}
		end := LineEnd(b)
		if end < 0 {
			p.consume(b)
			return
		}
		p.pos = n - len(b) + end + 1
		p.consume(b[:end])
		p.endLine()
		if b[end] == '\r' {
			p.pendingCR = true
		}
		b = b[end+1:]
	}
}

// feedLF is Feed for bytes with no CR in them, what nearly every stream
// sends: one search per line, for its LF.
func (p *Parser) feedLF(b []byte) {
	for off := 0; off < len(b); {
		end := off // a blank line, or the end of a line begun in an earlier Feed
		if b[off] != '\n' {
			i := bytes.IndexByte(b[off:], '\n')
			if i < 0 {
				p.consume(b[off:])
				return
			}
			end += i
			p.consume(b[off:end])
		}
		off = end + 1
		p.pos = off
		p.endLine()
	}
}

// LineEnd returns the index of the first CR or LF in b, or -1.
func LineEnd(b []byte) int {
	n := bytes.IndexByte(b, '\n')
	seg := b
	if n >= 0 {
		seg = b[:n]
	}
	if c := bytes.IndexByte(seg, '\r'); c >= 0 {
		return c
	}
	return n
}

// consume takes bytes of the current line (no terminators).
func (p *Parser) consume(b []byte) {
	if len(b) == 0 {
		return
	}
	if !p.inLine {
		p.inLine = true
		p.comment = b[0] == ':'
		p.nameDone = false
		p.nameLen = 0
		p.valStart = true
	}
	if p.comment {
		return
	}
	if !p.nameDone && p.nameLen == 0 && bytes.HasPrefix(b, dataField) {
		// the commonest line, named without a search for its colon
		p.nameLen = copy(p.name[:], "data")
		p.nameDone = true
		b = b[len(dataField):]
	}
	if !p.nameDone {
		i := bytes.IndexByte(b, ':')
		part := b
		if i >= 0 {
			part = b[:i]
		}
		for _, c := range part {
			if p.nameLen < len(p.name) {
				p.name[p.nameLen] = c
			}
			p.nameLen++
		}
		if i < 0 {
			return
		}
		p.nameDone = true
		b = b[i+1:]
		if p.OnEvent != nil && p.field() == "event" {
			p.evName = p.evName[:0] // a later "event:" line replaces an earlier one
		}
	}
	if p.OnEvent == nil || len(b) == 0 {
		return
	}
	if p.valStart {
		p.valStart = false
		if b[0] == ' ' {
			b = b[1:]
		}
	}
	switch p.field() {
	case "data":
		p.appendData(b)
	case "event":
		p.evName = append(p.evName, b...)
	}
}

func (p *Parser) field() string {
	if p.nameLen > len(p.name) {
		return ""
	}
	switch string(p.name[:p.nameLen]) { // no allocation: compared in place
	case "data":
		return "data"
	case "event":
		return "event"
	}
	return "other"
}

func (p *Parser) appendData(b []byte) {
	room := MaxEventData - len(p.evData)
	if len(b) > room {
		b = b[:room]
		p.evTrunc = true
	}
	p.evData = append(p.evData, b...)
}

// endLine handles a line terminator.
func (p *Parser) endLine() {
	if !p.inLine { // blank line: dispatch
		if p.first < 0 {
			p.first = p.pos
		}
		p.last = p.pos
		p.dispatch()
		return
	}
	p.inLine = false
	if p.comment {
		return
	}
	p.sawField = true
	p.eventOpen = true
	if p.field() == "data" {
		// Each data line ends with a newline; dispatch drops the last one,
		// as the SSE specification says.
		if p.OnEvent != nil {
			p.appendData(newline)
		}
		p.evHasData = true
	}
}

var (
	newline   = []byte{'\n'}
	dataField = []byte("data:")
)

func (p *Parser) dispatch() {
	if !p.eventOpen {
		return
	}
	p.eventOpen = false
	if p.evHasData {
		p.dataEvents++
	}
	if p.OnEvent != nil {
		data := p.evData
		if len(data) > 0 && data[len(data)-1] == '\n' && !p.evTrunc {
			data = data[:len(data)-1]
		}
		p.OnEvent(Event{Name: p.evName, Data: data, Truncated: p.evTrunc})
	}
	p.evName = p.evName[:0]
	p.evData = p.evData[:0]
	p.evHasData = false
	p.evTrunc = false
}
