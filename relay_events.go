package llmstream

import (
	"bytes"
	"errors"
	"net/http"
	"strconv"
	"unicode/utf8"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// Event-aware relaying, used only when the client must not get every byte
// as it comes: the include_usage chunk it did not ask for is dropped, and
// with deny words in the response, events (or a whole answer) are held
// back until no forbidden word can reach the client. Everything here runs
// with the relay's mutex held.

// writeEvents relays a read of an event stream event by event where that
// matters, after the parser was fed it: usage is read from the events that
// hold it, and with filtering the include_usage chunk is dropped and events
// are held for deny words. The parser tells where events ended, so a read
// with no usage in it and no filtering costs no event scanning: one
// complete-or-not split. Called with mu held.
func (rl *relay) writeEvents(b []byte) error {
	filter := rl.filtering()
	first, last := rl.parser.Ends()
	if filter && len(rl.pend) == 0 && rl.wroteBody && rl.lastByte == '\r' && b[0] == '\n' {
		// The LF of a CRLF that the last read split: it ends what was
		// already written, not the next event.
		rl.emit(b[:1])
		b = b[1:]
		first, last = first-1, last-1 // the parser reports no end at 0 here
	}
	if !filter {
		rl.emit(b)
	}
	if rl.pendCR || (len(b) > 0 && b[len(b)-1] == '\r') {
		return rl.scanEvents(b, filter)
	}
	if rl.parser.AtBoundary() {
		// Everything is complete, comments after the last event included.
		if first < 0 {
			first = len(b)
		}
		last = len(b)
	}
	if first < 0 { // no event ended in this read
		rl.keepOpen(b, filter)
		return rl.flushOut()
	}
	ev := b[:first]
	if len(rl.pend) > 0 {
		rl.extendPend(ev)
		ev = rl.pend
	}
	var err error
	if rl.pendCut {
		if filter {
			rl.emit(ev) // its beginning went out unfiltered
		}
	} else {
		err = rl.passEvent(ev, filter)
	}
	mid := b[first:last]
	switch {
	case err != nil:
	case rl.deny != nil || mayHoldUsage(mid):
		for start := 0; start < len(mid) && err == nil; {
			end := sse.EventEnd(mid, start)
			if end < 0 {
				end = len(mid)
			}
			err = rl.passEvent(mid[start:end], filter)
			start = end
		}
	case filter:
		rl.emit(mid)
	}
	rl.keepTail(b[last:])
	return rl.endEvents(err)
}

// scanEvents is writeEvents for the reads whose ends the parser cannot
// place for us: one that ends in a CR (the LF that may follow belongs to
// the event before it) and the one after it. It splits pend+b into events
// itself. Called with mu held.
func (rl *relay) scanEvents(b []byte, filter bool) error {
	data := b
	if len(rl.pend) > 0 {
		rl.extendPend(b)
		data = rl.pend
	}
	start := 0
	var err error
	for err == nil {
		end := sse.EventEnd(data, start)
		if end < 0 {
			break
		}
		err = rl.passEvent(data[start:end], filter)
		start = end
	}
	rl.keepTail(data[start:])
	rl.pendCR = len(rl.pend) > 0 && rl.parser.AtBoundary()
	if err == nil && len(rl.pend) > sse.MaxEventData {
		rl.keepOpen(nil, filter)
	}
	return rl.endEvents(err)
}

// keepTail keeps t, the start of an event that has not ended, as pend,
// at the front of pend's storage (where carry expects it). What emit kept
// back is written first: pend's storage may lie under it.
func (rl *relay) keepTail(t []byte) {
	rl.writeRun()
	rl.pend, rl.pendCut = append(rl.pend[:0], t...), false
}

// endEvents flushes what a read wrote; an error (a deny-word match) drops
// what was kept of the stream.
func (rl *relay) endEvents(err error) error {
	if err != nil {
		rl.pend, rl.pendCR = rl.pend[:0], false
		_ = rl.flushOut()
		return err
	}
	return rl.flushOut()
}

// keepOpen keeps the bytes of an event that has not ended yet. Called with
// mu held.
func (rl *relay) keepOpen(b []byte, filter bool) {
	rl.extendPend(b)
	if len(rl.pend) > sse.MaxEventData {
		if filter {
			rl.emit(rl.pend) // not an event we would drop: pass it on
		}
		rl.pend, rl.pendCut = rl.pend[:0], true
	}
}

// passEvent reads usage from one complete event and, with filtering,
// writes, drops or holds it. Called with mu held.
func (rl *relay) passEvent(ev []byte, filter bool) error {
	hint := mayHoldUsage(ev)
	if hint && rl.usage != nil {
		name, data := sse.Fields(ev)
		rl.usage.readEvent(name, data)
	}
	switch {
	case !filter || rl.discarding:
	case hint && rl.hideUsage && isUsageChunk(ev):
		// dropped: the client did not ask for it
	case rl.deny != nil:
		if rl.hold(ev) {
			return errDenied
		}
	default:
		rl.emit(ev)
	}
	return nil
}

// hold queues an event for the deny-word check and writes the held events
// that no forbidden word can reach any more. It reports a match.
func (rl *relay) hold(ev []byte) bool {
	_, data := sse.Fields(ev)
	text := deltaText(data)
	if text != "" {
		if rl.deny.Feed(&rl.denyState, text) {
			rl.held = rl.held[:0]
			return true
		}
		rl.denyChars += utf8.RuneCountInString(text)
	}
	rl.held = append(rl.held, heldEvent{b: append([]byte(nil), ev...), end: rl.denyChars})
	done := bytes.Contains(ev, []byte("data: [DONE]"))
	keep := rl.deny.MaxLen() - 1
	n := 0
	for ; n < len(rl.held); n++ {
		if !done && rl.denyChars-rl.held[n].end < keep {
			break
		}
		rl.emit(rl.held[n].b)
	}
	rl.held = append(rl.held[:0], rl.held[n:]...)
	return false
}

// releaseHeld writes what is still held at the end of the answer (the
// matcher has seen all of it). Called with mu held.
func (rl *relay) releaseHeld() {
	for _, e := range rl.held {
		rl.emit(e.b)
	}
	_ = rl.flushOut()
	rl.held = rl.held[:0]
}

// holdPlainAnswer keeps a read of a whole answer held for the deny-word
// check. One longer than maxUsageBody is passed on unchecked from then on
// (logged by the caller through the metric). Called with mu held.
func (rl *relay) holdPlainAnswer(b []byte) error {
	if len(rl.jsonBuf)+len(b) <= maxUsageBody {
		rl.jsonBuf = append(rl.jsonBuf, b...)
		return nil
	}
	rl.heldOverrun = true
	if err := rl.commitHeld(); err != nil {
		return err
	}
	return rl.writeOut(b)
}

// releasePlain ends the hold of a whole answer at its end: a forbidden word
// makes it errDenied, else it leaves as it came. Called with mu held.
func (rl *relay) releasePlain() error {
	if !rl.heldOverrun && rl.deny != nil && rl.deny.Contains(answerText(rl.jsonBuf)) {
		rl.holdPlain = false
		return errDenied
	}
	if !rl.heldOverrun && rl.filterModels != nil && rl.heldStatus == http.StatusOK {
		rl.jsonBuf = rl.filterModels(rl.jsonBuf)
		rl.w.Header().Set("Content-Length", strconv.Itoa(len(rl.jsonBuf)))
	}
	return rl.commitHeld()
}

// commitHeld writes the held headers and body. Called with mu held.
func (rl *relay) commitHeld() error {
	rl.holdPlain = false
	rl.w.WriteHeader(rl.heldStatus)
	rl.committed = true
	if rl.discarding || len(rl.jsonBuf) == 0 {
		return nil
	}
	return rl.writeOut(rl.jsonBuf)
}

// brokenStreamError describes why a started answer ended early.
func brokenStreamError(err error) *apiError {
	if errors.Is(err, errFirstTokenTimeout) {
		return &apiError{Status: http.StatusGatewayTimeout, Type: typeTimeout, Code: "upstream_timeout",
			Message: errFirstTokenTimeout.Error()}
	}
	if errors.Is(err, errIdleTimeout) {
		return &apiError{Status: http.StatusGatewayTimeout, Type: typeTimeout, Code: "upstream_idle_timeout",
			Message: errIdleTimeout.Error()}
	}
	return &apiError{Status: http.StatusBadGateway, Type: typeUpstream, Code: "stream_broken",
		Message: "the upstream stream broke before it was complete"}
}
