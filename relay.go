package llmstream

import (
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cache"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/denyword"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// Per-stream read buffers. A stream starts with a small buffer (paced model
// output arrives in reads of a few hundred bytes) and moves to a large one
// only when a read fills the small one, so thousands of open slow streams
// cost little memory while bursts still move in large reads.
const (
	smallBuf = 1 << 10
	largeBuf = 32 << 10
)

var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}
	largePool = sync.Pool{New: func() any { b := make([]byte, largeBuf); return &b }}
)

var heartbeatComment = []byte(": keep-alive\n\n")

// framing is how the answer is delimited for the client, which decides how a
// broken stream is ended.
type framing int

const (
	framePlain  framing = iota // anything else: a broken body aborts the connection
	frameSSE                   // text/event-stream: final `data: {"error":…}` event
	frameNDJSON                // application/x-ndjson: final {"error":…} line
)

var errClientGone = errors.New("client disconnected")

// relay copies one upstream answer to the client. It owns every write to the
// client once created: the relay loop and the heartbeat timer take mu for
// each write. One time.AfterFunc timer per stream serves both the heartbeat
// and the idle timeout, so a waiting stream holds no goroutine.
type relay struct {
	w  http.ResponseWriter
	rc *http.ResponseController
	mu sync.Mutex // held by the relay loop and the timer for each write

	relayTimers
	relayState
	relayPending
	relayObservers
	relayFilters
}

// relayTimers: one timer per stream serves the heartbeat, the idle
// timeout and the first-token timeout.
//
// The relay's times are durations since t0, its creation, read with
// time.Since: a monotonic clock read, half the cost of time.Now (which
// reads the wall clock too), and the relay reads the clock on every read.
type relayTimers struct {
	heartbeat         time.Duration // <= 0: off
	idle              time.Duration
	firstTokenTimeout time.Duration // <= 0: off
	timer             *time.Timer
	cancel            context.CancelCauseFunc // the current attempt's
	t0                time.Time               // the relay's creation: what the times below count from
	attemptStart      time.Duration
	lastRead          time.Duration
	lastWrite         time.Duration
	paced             bool // writes may wait (smooth): the idle timeout counts from their end
}

// relayState is where the answer to the client stands.
type relayState struct {
	streamed  bool // the client asked for a stream
	committed bool // response headers written
	// a whole JSON answer: written as it is read but not flushed read by
	// read (no client reads JSON before its end; net/http sends the rest,
	// in one piece with the end, when the handler returns)
	whole       bool
	frame       framing
	reading     bool // the body is being read: the idle timeout applies
	wroteBody   bool // some upstream body bytes reached the client
	lastByte    byte
	done        bool
	discarding  bool // draining: the client left, the answer is read but not written
	clientEnded bool // the client's answer was ended (a stop): nothing more is written
	parser      sse.Parser
}

// relayPending is what one read leaves behind: the start of the event
// still open at its end (see carry) and the writes not flushed yet.
type relayPending struct {
	// the start of the event still open at the end of the last read — not
	// written yet when events are filtered, a copy kept for reading usage
	// otherwise — and whether its beginning had to be given up (longer
	// than sse.MaxEventData)
	pend    []byte
	pendCut bool
	pendCR  bool // pend ends with a CR whose LF may come next: scanEvents
	// the writes of one read, flushed once; run is what emit has not
	// written yet: slices that follow each other in memory go out as one
	// write
	emitted bool
	run     []byte
	werr    error
}

// relayObservers watch the bytes as they are written, never instead.
type relayObservers struct {
	usage         *usage           // filled from the answer, when set
	jsonBuf       []byte           // a plain JSON answer, kept (bounded) to read its usage
	ndjsonLine    []byte           // NDJSON: the line not ended yet, kept (bounded) to read its usage
	firstToken    time.Time        // when the first data event reached the client
	model         string           // the model's metrics label
	gaps          gapCounts        // inter-token gaps, merged into the metric at the end
	lastDataEvent time.Duration    // for the inter-token gap (since t0)
	answer        *strings.Builder // the assembled answer text, for log_prompts
	// the provider's id for this answer: its id header, else the answer's
	// own id, the first id in its first bytes (a Responses API follow-up
	// names it in previous_response_id)
	upstreamID  string
	answerID    string
	answerModel string // the model the answer names, sniffed with its id
	sniffID     bool
	// the response cache's flight this answer is shared through and
	// stored from: it sees every upstream read (timed from t0)
	tee *cache.Flight
}

// relayFilters change what the client gets, only when asked for
// (relay_events.go).
type relayFilters struct {
	hideUsage bool // drop the include_usage chunk the client did not ask for
	// deny words in the response: events are held until enough text
	// followed them that no word can still start in them
	deny      *denyword.Matcher
	denyState denyword.State
	denyChars int // characters of answer text fed so far
	held      []heldEvent
	// a plain answer held whole, headers too, until deny words were
	// checked on it; one longer than maxUsageBody passes unchecked
	holdPlain   bool
	heldStatus  int
	heldOverrun bool
	// rewrites a held model list to the models the caller may use
	filterModels func([]byte) []byte
}

// heldEvent is an event held back for deny words, with the count of
// answer characters fed when it ended.
type heldEvent struct {
	b   []byte
	end int
}

// errDenied ends a relay whose answer produced a forbidden word.
var errDenied = errors.New("the answer contains a forbidden word")

// maxUsageBody bounds how much of a plain JSON answer is kept to read its
// usage.
const maxUsageBody = 4 << 20

// relayConfig is what a relay is built with.
type relayConfig struct {
	heartbeat, idle, firstTokenTimeout time.Duration
	stream                             bool // the client asked for a stream
	paced                              bool // writes may wait (smooth)
	usage                              *usage
	hideUsage                          bool
	model                              string            // the metrics label
	deny                               *denyword.Matcher // deny words in the response
	keepAnswer                         bool              // assemble the answer text (log_prompts)
	filterModels                       func([]byte) []byte
	tee                                *cache.Flight // the cache flight the answer is shared through
}

// relayConfig is the handler's part of a relay's configuration.
func (h *Handler) relayConfig(stream bool) relayConfig {
	return relayConfig{
		heartbeat:         time.Duration(h.Heartbeat),
		idle:              time.Duration(h.IdleTimeout),
		firstTokenTimeout: time.Duration(h.FirstTokenTimeout),
		stream:            stream,
	}
}

// openRelay builds the exchange's relay, which owns every write to the
// client from now on.
func (h *Handler) openRelay(x *exchange) {
	c := h.relayConfig(x.in.stream)
	c.paced = h.Smooth != nil
	c.usage, c.hideUsage, c.model = x.usage, x.hideUsage, h.modelLabel(x.in.model)
	if h.denyResponse {
		c.deny = h.deny
	}
	c.keepAnswer = h.LogPrompts != "off"
	if len(h.AllowModels) > 0 && isModelList(x.r) {
		c.filterModels = h.filterModelList
	}
	if x.cache != nil {
		c.tee = x.cache.lead
	}
	x.rl = newRelay(h.smoothing(x.w, x.r.Context()), c)
}

func newRelay(w http.ResponseWriter, c relayConfig) *relay {
	rl := &relay{
		w:  w,
		rc: http.NewResponseController(w),
		relayTimers: relayTimers{
			heartbeat:         c.heartbeat,
			idle:              c.idle,
			firstTokenTimeout: c.firstTokenTimeout,
			paced:             c.paced,
			t0:                time.Now(),
		},
		relayState:     relayState{streamed: c.stream},
		relayObservers: relayObservers{usage: c.usage, model: c.model, tee: c.tee},
		relayFilters:   relayFilters{hideUsage: c.hideUsage, deny: c.deny, filterModels: c.filterModels},
	}
	if c.keepAnswer {
		rl.keepAnswer()
	}
	if c.stream {
		// A request with "stream": true expects an event stream; heartbeats
		// may start before the upstream's headers arrive (reasoning models
		// can take minutes).
		rl.frame = frameSSE
		rl.mu.Lock() // the timer may fire before arm returns
		rl.arm()
		rl.mu.Unlock()
	}
	return rl
}

// relaySnapshot is what the finish stage reads of a relay that stopped.
type relaySnapshot struct {
	firstToken  time.Time
	upstreamID  string
	answerID    string
	answerModel string
	dataEvents  int
	gaps        gapCounts
}

// snapshot returns what the finish stage needs, under the relay's lock.
func (rl *relay) snapshot() relaySnapshot {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	return relaySnapshot{firstToken: rl.firstToken, upstreamID: rl.upstreamID, answerID: rl.answerID, answerModel: rl.answerModel,
		dataEvents: rl.parser.DataEvents(), gaps: rl.gaps}
}

// keepAnswer makes the relay assemble the answer text (for log_prompts).
// Only then does the parser assemble each event's data.
func (rl *relay) keepAnswer() {
	rl.answer = new(strings.Builder)
	rl.parser.OnEvent = func(ev sse.Event) {
		if rl.answer.Len() < maxLoggedText {
			rl.answer.WriteString(deltaText(ev.Data))
		}
	}
}

// since is the time since the relay's creation (see relayTimers).
func (rl *relay) since() time.Duration { return time.Since(rl.t0) }

// sawTokens notes the n data events the current read completed: the first
// token's time, and the inter-token gaps (events that arrive in one read
// are 0 s apart).
func (rl *relay) sawTokens(n int) {
	now := rl.lastRead // no second clock read
	if rl.firstToken.IsZero() {
		rl.firstToken = rl.t0.Add(now)
	} else {
		rl.gaps.observe((now - rl.lastDataEvent).Seconds())
	}
	rl.gaps.observeZeros(n - 1)
	rl.lastDataEvent = now
}

// arm starts the timer if something needs it. Called with mu held.
func (rl *relay) arm() {
	d := rl.nextTick(rl.since())
	if d <= 0 {
		return
	}
	if rl.timer == nil {
		rl.timer = time.AfterFunc(d, rl.tick)
	} else {
		rl.timer.Reset(d)
	}
}

// nextTick is the delay to the next heartbeat or idle deadline; 0 when
// neither applies. Called with mu held (or before the relay is shared).
func (rl *relay) nextTick(now time.Duration) time.Duration {
	var next time.Duration
	if rl.heartbeat > 0 && rl.frame == frameSSE {
		next = rl.lastWrite + rl.heartbeat - now
		if next <= 0 {
			next = rl.heartbeat // mid-event: try again a period later
		}
	}
	if rl.reading && rl.idle > 0 {
		if d := max(rl.lastRead+rl.idle-now, time.Millisecond); next == 0 || d < next {
			next = d
		}
	}
	if rl.awaitingFirstToken() {
		if d := max(rl.attemptStart+rl.firstTokenTimeout-now, time.Millisecond); next == 0 || d < next {
			next = d
		}
	}
	return next
}

// awaitingFirstToken reports whether first_token_timeout applies now: an
// event stream whose current attempt has sent no data event yet.
func (rl *relay) awaitingFirstToken() bool {
	return rl.firstTokenTimeout > 0 && rl.reading && rl.frame == frameSSE && !rl.parser.SawField()
}

// canFailOver reports whether the client has seen nothing of an answer yet
// (at most heartbeats and comments between events), so another attempt can
// still answer it invisibly.
func (rl *relay) canFailOver() bool {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if !rl.wroteBody {
		return true
	}
	return rl.frame == frameSSE && !rl.parser.SawField() && !rl.parser.InLine()
}

// setAttempt makes cancel the one the timers use, for a new attempt.
func (rl *relay) setAttempt(cancel context.CancelCauseFunc) {
	rl.mu.Lock()
	rl.cancel = cancel
	rl.attemptStart = rl.since()
	rl.reading = false
	rl.mu.Unlock()
}

// tick runs on the timer: it ends a stream silent past the idle timeout,
// or sends a heartbeat comment between events.
func (rl *relay) tick() {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.done {
		return
	}
	now := rl.since()
	if rl.reading && rl.idle > 0 && now-rl.lastRead >= rl.idle {
		rl.cancel(errIdleTimeout)
		return
	}
	if rl.awaitingFirstToken() && now-rl.attemptStart >= rl.firstTokenTimeout {
		rl.cancel(errFirstTokenTimeout)
		return
	}
	if rl.heartbeat > 0 && rl.frame == frameSSE && !rl.discarding && now-rl.lastWrite >= rl.heartbeat && rl.parser.AtBoundary() {
		if !rl.committed {
			rl.commitStream()
		}
		if _, err := rl.w.Write(heartbeatComment); err == nil {
			_ = rl.rc.Flush()
		}
		rl.lastWrite = now
		metrics.heartbeats.Inc()
	}
	if d := rl.nextTick(now); d > 0 {
		rl.timer.Reset(d)
	}
}

// stop ends the relay's timer work; after it returns, nothing else writes.
func (rl *relay) stop() {
	rl.mu.Lock()
	rl.done = true
	if rl.timer != nil {
		rl.timer.Stop()
	}
	rl.mu.Unlock()
}

// isCommitted reports whether response headers have been written (by a
// heartbeat while waiting for the upstream).
func (rl *relay) isCommitted() bool {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	return rl.committed
}

// commitStream writes the headers of an event stream that starts before
// (or without) the upstream's answer: for heartbeats, or a stop's clean
// end. Called with mu held.
func (rl *relay) commitStream() {
	writeStreamHeaders(rl.w.Header(), "text/event-stream")
	rl.w.WriteHeader(http.StatusOK)
	rl.committed, rl.frame = true, frameSSE
}

// closeCutEvent appends to msg what ends an event the stream was cut in
// (a line end and a blank line), so that what follows is an event of its
// own. Called with mu held.
func (rl *relay) closeCutEvent(msg []byte) []byte {
	if rl.parser.InLine() {
		msg = append(msg, '\n')
	}
	if rl.parser.InLine() || !rl.parser.AtBoundary() {
		msg = append(msg, '\n')
	}
	return msg
}

// writeStreamHeaders sets what keeps every hop from buffering a stream.
func writeStreamHeaders(hdr http.Header, contentType string) {
	hdr.Set("Content-Type", contentType)
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("X-Accel-Buffering", "no") // nginx: no proxy_buffering for this response
	hdr.Del("Content-Length")
	hdr.Del("ETag")
	hdr.Del("Last-Modified")
}

// framingOf classifies a response by its content type.
func framingOf(contentType string) framing {
	ct := strings.ToLower(contentType)
	switch {
	case strings.HasPrefix(ct, "text/event-stream"):
		return frameSSE
	case strings.HasPrefix(ct, "application/x-ndjson"), strings.HasPrefix(ct, "application/jsonl"):
		return frameNDJSON
	}
	return framePlain
}

// isJSONAnswer reports whether an answer is JSON (what has text to check).
func isJSONAnswer(h http.Header) bool {
	return strings.HasPrefix(strings.ToLower(h.Get("Content-Type")), "application/json")
}

// outcome is how a relayed body ended.
type outcome struct {
	err        error // nil: the upstream finished the body
	clientGone bool
	bytes      int64
}

// start writes the response headers for an upstream answer (unless a
// heartbeat already committed a stream) and switches to the body phase.
func (rl *relay) begin(resp *http.Response, streaming bool) {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	f := framingOf(resp.Header.Get("Content-Type"))
	switch {
	case rl.committed:
		// Headers are out as an event stream; keep that framing.
		f = frameSSE
	case (rl.deny != nil || rl.filterModels != nil) && f == framePlain && !streaming && isJSONAnswer(resp.Header):
		// A whole JSON answer is checked for deny words (or a model list
		// filtered) before any of it, headers included, leaves. Other
		// bodies (audio, files) have no text to check: they pass as they
		// come.
		copyResponseHeaders(rl.w.Header(), resp.Header)
		rl.holdPlain, rl.heldStatus = true, resp.StatusCode
	default:
		hdr := rl.w.Header()
		copyResponseHeaders(hdr, resp.Header)
		stream := streaming || f != framePlain
		if stream {
			writeStreamHeaders(hdr, resp.Header.Get("Content-Type"))
		}
		rl.whole = !stream && isJSONAnswer(resp.Header)
		rl.w.WriteHeader(resp.StatusCode)
		if stream {
			// The client learns at once that its answer is coming, even
			// while the first events are held back (deny words).
			_ = rl.rc.Flush()
		}
		rl.committed = true
	}
	rl.frame = f
	if f == framePlain && (rl.usage != nil || rl.holdPlain) && cap(rl.jsonBuf) == 0 &&
		resp.ContentLength > 0 && resp.ContentLength <= maxUsageBody {
		rl.jsonBuf = make([]byte, 0, resp.ContentLength) // kept in one allocation, not grown read by read
	}
	rl.reading = true
	rl.upstreamID = upstreamRequestID(resp.Header)
	rl.answerID, rl.answerModel, rl.sniffID = "", "", true
	if rl.tee != nil {
		rl.tee.Start(rl.streamed, resp.Header.Get("Content-Type"))
	}
	rl.attemptStart = rl.since()
	rl.lastRead = rl.attemptStart
	rl.lastWrite = rl.lastRead
	if rl.timer != nil {
		rl.timer.Stop()
	}
	rl.arm()
}

// copyBody relays the upstream body, flushing after every read, until it
// ends, breaks or the client goes away. With drain, a client that left
// does not stop the reading: the rest is read (for usage) but not written.
func (rl *relay) copyBody(body io.Reader, drain bool) outcome {
	var out outcome
	bp := smallPool.Get().(*[]byte)
	pool := &smallPool
	defer func() {
		rl.movePend(*bp, nil)
		pool.Put(bp)
	}()
	for {
		buf := *bp
		off := rl.carry(buf)
		n, rerr := body.Read(buf[off:])
		if n > 0 {
			b := buf[off : off+n]
			now := rl.since()
			if rl.tee != nil {
				rl.tee.Append(b, now)
			}
			rl.mu.Lock()
			if rl.sniffID {
				rl.sniffAnswerID(b, out.bytes)
			}
			rl.lastRead = now
			werr := rl.write(b)
			if rl.paced {
				rl.lastRead = rl.since()
			}
			rl.mu.Unlock()
			out.bytes += int64(n)
			if werr == errDenied {
				out.err = errDenied
				return out
			}
			if werr != nil {
				if !drain {
					out.clientGone = true
					out.err = errClientGone
					return out
				}
				rl.mu.Lock()
				rl.discarding = true
				rl.mu.Unlock()
			}
			if off+n == len(buf) && pool == &smallPool {
				// A burst: move to the large buffer for the rest.
				large := largePool.Get().(*[]byte)
				rl.movePend(buf, *large)
				smallPool.Put(bp)
				bp, pool = large, &largePool
			}
		}
		if rerr == io.EOF {
			rl.mu.Lock()
			if len(rl.held) > 0 && !rl.discarding {
				rl.releaseHeld()
			}
			if len(rl.pend) > 0 && rl.filtering() && !rl.discarding {
				if rl.pendCR {
					_ = rl.passEvent(rl.pend, true) // complete but for an LF that never came
				} else {
					rl.emit(rl.pend) // an unterminated last event
				}
				_ = rl.flushOut()
				rl.pend = rl.pend[:0]
			}
			if rl.usage != nil && len(rl.jsonBuf) > 0 {
				rl.usage.readJSON(rl.jsonBuf)
			}
			if rl.usage != nil && len(rl.ndjsonLine) > 0 {
				rl.readNDJSONUsage([]byte{'\n'}) // a last line without its newline
			}
			if rl.holdPlain {
				if err := rl.releasePlain(); err != nil {
					rl.mu.Unlock()
					out.err = err
					return out
				}
			}
			gone := rl.discarding
			rl.mu.Unlock()
			out.clientGone = gone
			return out
		}
		if rerr != nil {
			out.err = rerr
			return out
		}
	}
}

// sniffAnswerID looks for the answer's own id in its first bytes; it is
// the upstream id too when the provider sent no id header. Called with mu
// held.
func (rl *relay) sniffAnswerID(b []byte, before int64) {
	if id := answerID(b); id != "" {
		rl.answerID, rl.sniffID = id, false
		rl.answerModel = answerModel(b)
		if rl.upstreamID == "" {
			rl.upstreamID = id
		}
	} else if before+int64(len(b)) >= maxIDSniff {
		rl.sniffID = false
	}
}

// carry moves the start of the event left open by the last read (pend) to
// the front of buf and returns where the next read goes: right after it, so
// that the event, once complete, and the events after it leave in one
// write. An open event too long to share the buffer stays where it is.
// pend is the relay loop's alone (the timer never reads it): carry and
// movePend need no lock.
func (rl *relay) carry(buf []byte) int {
	n := len(rl.pend)
	if n == 0 || n > len(buf)/2 {
		rl.movePend(buf, nil)
		return 0
	}
	if &rl.pend[0] != &buf[0] {
		copy(buf, rl.pend)
	}
	rl.pend = buf[:n]
	return n
}

// movePend moves pend out of buf, when it lives there, before buf is read
// into or given back: into the front of to (the next read buffer), or to
// storage of its own when to is nil.
func (rl *relay) movePend(buf, to []byte) {
	if cap(rl.pend) > 0 && &rl.pend[:1][0] == &buf[0] {
		rl.pend = append(to[:0], rl.pend...)
	}
}

// follows reports whether b starts where a ends in memory, so that
// a[:len(a)+len(b)] is a followed by b.
func follows(a, b []byte) bool {
	n := len(a)
	return n > 0 && len(b) > 0 && cap(a) > n && &a[:n+1][n] == &b[0]
}

// extendPend appends b to pend, which costs no copy when b was read
// right after it (see carry).
func (rl *relay) extendPend(b []byte) {
	if follows(rl.pend, b) {
		rl.pend = rl.pend[:len(rl.pend)+len(b)]
		return
	}
	rl.pend = append(rl.pend, b...)
}

// write observes one upstream read and passes it on. Called with mu held.
func (rl *relay) write(b []byte) error {
	switch rl.frame {
	case frameSSE:
		events := rl.parser.DataEvents()
		rl.parser.Feed(b)
		if n := rl.parser.DataEvents() - events; n > 0 {
			rl.sawTokens(n)
		}
		if rl.usage != nil || rl.filtering() {
			return rl.writeEvents(b)
		}
	case framePlain:
		if rl.holdPlain {
			return rl.holdPlainAnswer(b)
		}
		if rl.usage != nil && len(rl.jsonBuf)+len(b) <= maxUsageBody {
			rl.jsonBuf = append(rl.jsonBuf, b...)
		}
	case frameNDJSON:
		if rl.usage != nil {
			rl.readNDJSONUsage(b)
		}
	}
	if rl.discarding {
		return nil
	}
	return rl.writeOut(b)
}

// filtering reports whether events are written only once complete: the
// include_usage chunk is dropped, or events are held for deny words.
func (rl *relay) filtering() bool { return rl.hideUsage || rl.deny != nil }

// writeOut writes to the client and flushes. Called with mu held, after
// lastRead was set.
func (rl *relay) writeOut(b []byte) error {
	rl.emit(b)
	return rl.flushOut()
}

// emit writes b to the client, unless an earlier write of this read failed
// or the client left. flushOut ends the read's writes. Called with mu held.
func (rl *relay) emit(b []byte) {
	if len(b) == 0 || rl.werr != nil || rl.discarding {
		return
	}
	rl.lastByte = b[len(b)-1]
	rl.wroteBody = true
	rl.emitted = true
	if follows(rl.run, b) {
		rl.run = rl.run[:len(rl.run)+len(b)]
		return
	}
	rl.writeRun()
	rl.run = b
}

// writeRun writes what emit has kept back. It must run before the bytes
// under the run change: before pend is refilled and before the flush.
func (rl *relay) writeRun() {
	if len(rl.run) > 0 && rl.werr == nil {
		_, rl.werr = rl.w.Write(rl.run)
	}
	rl.run = nil
}

func (rl *relay) flushOut() error {
	rl.writeRun()
	err := rl.werr
	if rl.emitted && err == nil {
		rl.lastWrite = rl.lastRead
		if !rl.whole {
			err = rl.rc.Flush()
		}
	}
	rl.emitted, rl.werr = false, nil
	return err
}

// fail ends a started answer whose upstream broke: a final error event for
// event streams, a final error line for NDJSON. It reports false when the
// framing has no way to say so, and the connection must be aborted.
func (rl *relay) fail(e *apiError) bool {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.clientEnded {
		return true
	}
	var msg []byte
	switch rl.frame {
	case frameSSE:
		msg = rl.closeCutEvent(msg) // before ours
		msg = append(msg, "data: "...)
		msg = append(msg, e.body()...)
		msg = append(msg, "\n\n"...)
	case frameNDJSON:
		if rl.lastByte != 0 && rl.lastByte != '\n' {
			msg = append(msg, '\n')
		}
		msg = append(msg, e.body()...)
		msg = append(msg, '\n')
	default:
		return false
	}
	if _, err := rl.w.Write(msg); err == nil {
		_ = rl.rc.Flush()
	}
	return true
}

// copyResponseHeaders copies upstream response headers for the client,
// without hop-by-hop fields (those named in the upstream's Connection
// header too) and cookies for the upstream's domain. They are left out of
// the copy, not deleted after it: what the client's response already has
// stays, such as Caddy's own Alt-Svc (its HTTP/3 advertisement; the
// upstream's describes the upstream). The handler's own X-Request-Id stays;
// the provider's id is passed on as X-Upstream-Request-Id.
func copyResponseHeaders(dst, src http.Header) {
	copyHeaders(dst, src, responseDrop)
	if up := upstreamRequestID(src); up != "" {
		dst[headerUpstreamRequestID] = []string{up}
	}
}

// responseDrop are the upstream's fields the client never gets besides the
// hop-by-hop ones: its request id (the client gets ours, and the
// provider's as X-Upstream-Request-Id) and its cookies.
var responseDrop = []string{headerRequestID, "Set-Cookie"}

// decodedBody returns the response body, decoding gzip if the upstream sent
// it although we asked for identity.
func decodedBody(resp *http.Response) (io.Reader, error) {
	if !strings.EqualFold(resp.Header.Get("Content-Encoding"), "gzip") {
		return resp.Body, nil
	}
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		return nil, err
	}
	zr.Multistream(false)
	resp.Header.Del("Content-Encoding")
	resp.Header.Del("Content-Length")
	return zr, nil
}

// failDenied ends an answer that produced a forbidden word: what was held
// back is dropped and the stream ends with the filter's error; a whole
// answer held back is replaced by the error. It returns the status the
// client got, or 0 when the headers were already out.
func (rl *relay) failDenied() int {
	metrics.denyWordBlocks.WithLabelValues("response").Inc()
	e := &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "content_filter",
		Message: "the answer was stopped: it contained words that are not allowed here"}
	if rl.fail(e) {
		return 0
	}
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.committed {
		return 0
	}
	rl.w.Header().Del("Content-Length")
	e.write(rl.w)
	rl.committed = true
	return e.Status
}

// writeStored writes a stored answer in one go: a plain JSON body, or an
// event stream whose include_usage chunk was located when it was stored
// (dropped here unless the client asked for it; usage is read from it).
// Called after begin, instead of copyBody.
func (rl *relay) writeStored(e *cache.Entry) attemptResult {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	rl.lastRead = rl.since()
	rl.firstToken = rl.t0.Add(rl.lastRead)
	body := e.Body
	rl.sniffAnswerID(body[:min(len(body), maxIDSniff)], 0)
	switch rl.frame {
	case frameSSE:
		ev := body[e.UsageFrom:e.UsageTo]
		if rl.usage != nil {
			name, data := sse.Fields(ev)
			rl.usage.readEvent(name, data)
		}
		if rl.hideUsage {
			rl.emit(body[:e.UsageFrom])
			rl.emit(body[e.UsageTo:])
		} else {
			rl.emit(body)
		}
	default:
		if rl.usage != nil {
			rl.usage.readJSON(body)
		}
		rl.emit(body)
	}
	if err := rl.flushOut(); err != nil {
		metrics.disconnects.Inc()
		return attemptResult{done: true, code: 499, cached: true}
	}
	return attemptResult{done: true, complete: true, code: http.StatusOK, cached: true}
}

// endStopped ends the answer of a stopped generation: an event stream gets
// the clean end its format has (`data: [DONE]`, or Anthropic's
// message_stop), so clients finish as after a complete answer. A request
// stopped before its answer started gets that end alone when it asked for
// a stream, and a 499 error otherwise.
func (rl *relay) endStopped(path string, stream bool) {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.clientEnded {
		return
	}
	// Nothing more reaches this client; the answer may still be read for a
	// cache flight's followers.
	rl.clientEnded, rl.discarding = true, true
	if !rl.committed {
		if !stream {
			(&apiError{Status: 499, Type: typeInvalidRequest, Code: "generation_stopped",
				Message: "the generation was stopped before its answer"}).write(rl.w)
			return
		}
		rl.commitStream()
	}
	if rl.frame != frameSSE {
		return // NDJSON and plain bodies simply end
	}
	msg := append(rl.closeCutEvent(nil), streamFinale(path)...)
	if len(msg) > 0 {
		if _, err := rl.w.Write(msg); err == nil {
			_ = rl.rc.Flush()
		}
	}
}
