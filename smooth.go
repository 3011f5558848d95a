package llmstream

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/pace"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/smooth"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// SmoothConfig paces streamed text: a burst of events (ten tokens at once,
// then silence) reaches the client as a steady typewriter rhythm.
type SmoothConfig struct {
	// The most characters one piece of text may hold. An event whose text
	// is longer is written as several events that each carry a piece of
	// it (the rest of the event repeated); text is only ever cut between
	// UTF-8 characters and never inside a JSON escape. Events that carry
	// more than text (a finish reason, usage, tool calls) are not cut.
	MaxChars int `json:"max_chars,omitempty"`

	// The least time between two pieces of text. Text that arrives slower
	// than this is not delayed; a burst is spread out, so the end of a
	// stream is delayed by at most one interval per piece still pending.
	// Events without text (role, finish, usage, `[DONE]`) are not delayed
	// beyond the pieces before them.
	Interval caddy.Duration `json:"interval,omitempty"`
}

func (h *Handler) provisionSmooth() error {
	s := h.Smooth
	if s == nil {
		return nil
	}
	if s.MaxChars <= 0 {
		return errors.New("smooth: max_chars must be positive")
	}
	return checkSmoothInterval(time.Duration(s.Interval))
}

// smoothing wraps w when smooth is on. The pacing waits end when ctx does
// (the client left, or the generation was stopped).
func (h *Handler) smoothing(w http.ResponseWriter, ctx context.Context) http.ResponseWriter {
	if h.Smooth == nil {
		return w
	}
	return &smoothWriter{
		ResponseWriter: w,
		rc:             http.NewResponseController(w),
		ctx:            ctx,
		max:            h.Smooth.MaxChars,
		interval:       time.Duration(h.Smooth.Interval),
	}
}

// smoothWriter sits between the relay and the client. For an event stream
// it writes whole events, cutting long texts into pieces and leaving at
// least the interval between two pieces of text; its Write returns once
// everything given is written (or kept as the start of an event), so a
// burst slows the upstream read instead of piling up in memory.
type smoothWriter struct {
	http.ResponseWriter
	rc       *http.ResponseController
	ctx      context.Context
	max      int
	interval time.Duration

	active bool      // the response is an event stream
	next   time.Time // the earliest time for the next piece of text
	buf    []byte    // the start of an event not complete yet
	piece  []byte
	pace.Sleeper
}

func (s *smoothWriter) WriteHeader(code int) {
	s.active = code == http.StatusOK && framingOf(s.Header().Get("Content-Type")) == frameSSE
	s.ResponseWriter.WriteHeader(code)
}

func (s *smoothWriter) Write(p []byte) (int, error) {
	if !s.active || s.ctx.Err() != nil {
		// Not an event stream, or the pacing is over (a stop writes its
		// final event at once).
		if len(s.buf) > 0 {
			if _, err := s.ResponseWriter.Write(s.buf); err != nil {
				return 0, err
			}
			s.buf = s.buf[:0]
		}
		return s.ResponseWriter.Write(p)
	}
	s.buf = append(s.buf, p...)
	start := 0
	for {
		end := sse.EventEnd(s.buf, start)
		if end < 0 {
			break
		}
		if err := s.event(s.buf[start:end]); err != nil {
			s.buf = s.buf[:0]
			return 0, err
		}
		start = end
	}
	s.buf = s.buf[:copy(s.buf, s.buf[start:])]
	if len(s.buf) > sse.MaxEventData {
		// Not an event we could cut: pass it on as it comes.
		_, err := s.ResponseWriter.Write(s.buf)
		s.buf = s.buf[:0]
		if err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

var (
	dataLine   = []byte("data:")
	textMember = [][]byte{[]byte(`"content":"`), []byte(`"text":"`)}
)

// event writes one complete event: cut into pieces when it is a single
// data line with a long text, paced when it carries text.
func (s *smoothWriter) event(ev []byte) error {
	hasText := bytes.Contains(ev, textMember[0]) || bytes.Contains(ev, textMember[1])
	if !hasText {
		_, err := s.ResponseWriter.Write(ev)
		return err
	}
	start, end, ok := 0, 0, false
	if bytes.Count(ev, dataLine) == 1 {
		start, end, ok = smooth.TextField(ev)
	}
	if !ok {
		return s.paced(ev)
	}
	lit := ev[start:end]
	prev := 0
	for _, c := range append(smooth.Cuts(lit, s.max), len(lit)) {
		s.piece = append(append(append(s.piece[:0], ev[:start]...), lit[prev:c]...), ev[end:]...)
		if err := s.paced(s.piece); err != nil {
			return err
		}
		prev = c
	}
	return nil
}

// paced writes b and flushes it once the interval since the last piece of
// text has passed.
func (s *smoothWriter) paced(b []byte) error {
	if !s.Sleep(s.ctx, time.Until(s.next)) {
		return context.Cause(s.ctx)
	}
	if _, err := s.ResponseWriter.Write(b); err != nil {
		return err
	}
	err := s.rc.Flush()
	s.next = time.Now().Add(s.interval)
	return err
}

func (s *smoothWriter) Flush() { _ = s.rc.Flush() }

// Unwrap lets http.ResponseController reach the client's writer.
func (s *smoothWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }
