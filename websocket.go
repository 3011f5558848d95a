package llmstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/coder/websocket"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// WebSocketConfig turns a WebSocket into a series of requests. The client
// sends a text message holding a chat-completions JSON body (or plain text,
// taken as one user message to DefaultModel); the answer comes back as one
// text message per streamed event (the upstream's chunk JSON, unchanged),
// then a final `[DONE]` message. A message `{"type":"stop"}` stops the
// answer in progress at once, and those still queued (they get `[DONE]`
// alone). Messages are answered one after another.
// Each one is handled like an HTTP request from the same client: the same
// authentication (from the upgrade request's headers), limits, key
// injection, usage accounting and logs.
type WebSocketConfig struct {
	// Accept upgrades only on this path (other requests to it get 426).
	// Default: an upgrade on any path this handler serves, answered as
	// requests to that path.
	Path string `json:"path,omitempty"`

	// The API path each message is answered as, when Path is set. Default:
	// `/v1/chat/completions`.
	APIPath string `json:"api_path,omitempty"`

	// The model for plain-text messages. Default: the first name of
	// `models` when there is one.
	DefaultModel string `json:"default_model,omitempty"`

	// How often an idle socket is pinged; a socket that does not answer
	// within the interval is closed. A negative value turns pings off.
	// Default: 30s.
	PingInterval caddy.Duration `json:"ping_interval,omitempty"`

	// Hosts (patterns as in `path.Match`) of other origins whose pages may
	// open the socket. Default: only pages served from the same host.
	OriginPatterns []string `json:"origin_patterns,omitempty"`
}

// wsQueue is how many messages may wait while one is answered; a client
// that sends more is no longer read until the queue drains.
const wsQueue = 16

func (h *Handler) provisionWebSocket() error {
	c := h.WebSocket
	if c == nil {
		return nil
	}
	if err := checkWebSocketPath(c.Path); err != nil {
		return err
	}
	if c.APIPath == "" {
		c.APIPath = "/v1/chat/completions"
	}
	if c.Path == c.APIPath {
		return errors.New("websocket: the socket's path must differ from api_path")
	}
	if c.PingInterval == 0 {
		c.PingInterval = caddy.Duration(30 * time.Second)
	}
	if c.DefaultModel == "" && len(h.router.names) > 0 {
		c.DefaultModel = h.router.names[0]
	}
	return nil
}

// forWebSocket reports whether the request is for the bridge: an upgrade,
// or any request to the configured path.
func (h *Handler) forWebSocket(r *http.Request) bool {
	if h.WebSocket.Path != "" {
		return r.URL.Path == h.WebSocket.Path
	}
	return isUpgrade(r)
}

func isUpgrade(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
}

// wsMessage is one message read from the socket, ready to be answered.
type wsMessage struct {
	body []byte    // a request body, or
	err  *apiError // why the message cannot be answered
	// the context its request is answered in; a stop message cancels it
	// with errStopped
	ctx  context.Context
	stop context.CancelCauseFunc
}

// serveWebSocket accepts the upgrade and answers the socket's messages
// until it closes.
func (h *Handler) serveWebSocket(w http.ResponseWriter, r *http.Request) error {
	if !isUpgrade(r) {
		return h.reject(w, "", &apiError{Status: http.StatusUpgradeRequired, Type: typeInvalidRequest, Code: "websocket_required",
			Message: "this path accepts WebSocket connections only"})
	}
	if h.WebSocket.Path == "" && !h.pathAllowed(r) {
		return h.reject(w, "", unknownURL(r))
	}
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{OriginPatterns: h.WebSocket.OriginPatterns})
	if err != nil {
		return nil // Accept answered the client
	}
	defer c.CloseNow()
	// A socket outlives a reload: the state its messages use (the Redis
	// client among it) is released only after it closed.
	h.inflight.Add(1)
	defer h.inflight.Done()
	c.SetReadLimit(h.MaxRequestBody)
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	metrics.openSockets.Inc()
	defer metrics.openSockets.Dec()

	// A stop message stops every request received before it: the one
	// being answered and those still queued (they end with [DONE] alone).
	var mu sync.Mutex
	unanswered := map[*wsMessage]bool{}
	queue := make(chan *wsMessage, wsQueue)
	go func() {
		defer close(queue)
		defer cancel() // the socket is gone: so is the answer in progress
		for {
			typ, data, err := c.Read(ctx)
			if err != nil {
				return
			}
			msg := h.wsParse(typ, data)
			if msg.body == nil && msg.err == nil { // {"type":"stop"}
				mu.Lock()
				for m := range unanswered {
					m.stop(errStopped)
				}
				mu.Unlock()
				continue
			}
			if msg.body != nil {
				msg.ctx, msg.stop = context.WithCancelCause(ctx)
				mu.Lock()
				unanswered[msg] = true
				mu.Unlock()
			}
			select {
			case queue <- msg:
			case <-ctx.Done():
				return
			}
		}
	}()
	if d := time.Duration(h.WebSocket.PingInterval); d > 0 {
		go h.wsPing(ctx, c, d)
	}

	path := r.URL.Path
	if h.WebSocket.Path != "" {
		path = h.WebSocket.APIPath
	}
	for msg := range queue {
		ww := &wsWriter{conn: c, ctx: ctx, hdr: http.Header{}, writeTimeout: time.Duration(h.IdleTimeout)}
		switch {
		case msg.err != nil:
			ww.send(msg.err.body())
		case errors.Is(context.Cause(msg.ctx), errStopped):
			// stopped while queued: [DONE] alone, nothing sent upstream
		default:
			_ = h.ServeHTTP(ww, wsRequest(msg.ctx, r, path, msg.body), nil)
		}
		if msg.stop != nil {
			mu.Lock()
			delete(unanswered, msg)
			mu.Unlock()
			msg.stop(nil)
		}
		if err := ww.finish(); err != nil {
			return nil
		}
	}
	_ = c.Close(websocket.StatusNormalClosure, "")
	return nil
}

// wsPing pings the socket every d while it is open, and closes it when a
// ping is not answered within d.
func (h *Handler) wsPing(ctx context.Context, c *websocket.Conn, d time.Duration) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, d)
		err := c.Ping(pctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				h.logger.Debug("websocket ping unanswered", zap.Error(err))
			}
			c.CloseNow()
			return
		}
	}
}

// wsParse turns a message into a request body: a JSON object is a request
// (made a streaming one unless it says otherwise), other text a user
// message. It returns an empty wsMessage for a stop message.
func (h *Handler) wsParse(typ websocket.MessageType, data []byte) *wsMessage {
	if typ != websocket.MessageText {
		return &wsMessage{err: &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "unsupported_message",
			Message: "send text messages: a chat-completions JSON body, or plain text"}}
	}
	text := bytes.TrimSpace(data)
	if len(text) == 0 {
		return &wsMessage{err: &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "empty_message",
			Message: "the message is empty"}}
	}
	if text[0] != '{' {
		if h.WebSocket.DefaultModel == "" {
			return &wsMessage{err: &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "model_required",
				Message: "plain-text messages need a default model (websocket default_model); send a JSON body with a model"}}
		}
		body, _ := json.Marshal(map[string]any{
			"model":    h.WebSocket.DefaultModel,
			"stream":   true,
			"messages": []map[string]string{{"role": "user", "content": string(text)}},
		})
		return &wsMessage{body: body}
	}
	var probe struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(text, &probe); err != nil {
		return &wsMessage{err: &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "invalid_json",
			Message: "the message is not valid JSON: " + err.Error()}}
	}
	if probe.Type == "stop" {
		return &wsMessage{}
	}
	if s, _ := topLevelValue(text, "stream"); s < 0 {
		i := bytes.IndexByte(text, '{') + 1
		rest := bytes.TrimSpace(text[i:])
		sep := ","
		if len(rest) > 0 && rest[0] == '}' {
			sep = ""
		}
		text = append([]byte(`{"stream":true`+sep), text[i:]...)
	}
	return &wsMessage{body: text}
}

// requestIDKey carries the id of a request made from a WebSocket message:
// Caddy's {http.request.uuid} belongs to the upgrade request.
type requestIDKey struct{}

// wsRequest makes the request a message is answered as: the upgrade
// request's client, headers (credentials included) and Caddy context, with
// the message as a POST body.
func wsRequest(ctx context.Context, up *http.Request, path string, body []byte) *http.Request {
	ctx = context.WithValue(ctx, requestIDKey{}, newID())
	if vars, ok := ctx.Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		ctx = context.WithValue(ctx, caddyhttp.VarsCtxKey, maps.Clone(vars))
	}
	r := up.Clone(ctx)
	r.Method = http.MethodPost
	r.URL.Path, r.URL.RawPath, r.URL.RawQuery = path, "", ""
	r.RequestURI = path
	for k := range r.Header {
		if strings.HasPrefix(k, "Sec-Websocket-") {
			r.Header.Del(k)
		}
	}
	r.Header.Del("Upgrade")
	r.Header.Del("Connection")
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Accept", "text/event-stream")
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	return r
}

// wsWriter is the ResponseWriter a message is answered through: each event
// of an event stream (or line of NDJSON) becomes a text message, any other
// body (an error, a plain answer) one message. Writes go to the socket
// before Write returns, so a slow socket slows the relay's upstream reads.
type wsWriter struct {
	conn         *websocket.Conn
	ctx          context.Context // the socket's, not the request's: a stop must not close it
	writeTimeout time.Duration
	hdr          http.Header
	status       int
	frame        framing
	parser       sse.Parser
	line         []byte // NDJSON: the line not ended yet
	body         []byte // anything else
	sentDone     bool
	err          error
}

// maxWSBody bounds a non-streamed answer sent as one message.
const maxWSBody = 16 << 20

func (w *wsWriter) Header() http.Header { return w.hdr }

func (w *wsWriter) WriteHeader(code int) {
	if w.status != 0 {
		return
	}
	w.status = code
	w.frame = framePlain
	if code == http.StatusOK {
		w.frame = framingOf(w.hdr.Get("Content-Type"))
	}
	if w.frame == frameSSE {
		w.parser.OnEvent = func(ev sse.Event) {
			if len(ev.Data) > 0 {
				w.send(ev.Data)
			}
		}
	}
}

func (w *wsWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	switch w.frame {
	case frameSSE:
		w.parser.Feed(p)
	case frameNDJSON:
		for len(p) > 0 && w.err == nil {
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				w.line = append(w.line, p...)
				break
			}
			w.line = append(w.line, p[:i]...)
			if line := bytes.TrimSpace(w.line); len(line) > 0 {
				w.send(line)
			}
			w.line, p = w.line[:0], p[i+1:]
		}
	default:
		if len(w.body)+len(p) > maxWSBody {
			w.err = errors.New("answer too large for one message")
			return 0, w.err
		}
		w.body = append(w.body, p...)
	}
	if w.err != nil {
		return 0, w.err
	}
	return len(p), nil
}

func (w *wsWriter) Flush() {}

// send writes one text message, at once.
func (w *wsWriter) send(b []byte) {
	if w.err != nil {
		return
	}
	if bytes.Equal(b, doneMessage) {
		if w.sentDone {
			return
		}
		w.sentDone = true
	}
	ctx, cancel := context.WithTimeout(w.ctx, w.writeTimeout)
	w.err = w.conn.Write(ctx, websocket.MessageText, b)
	cancel()
}

var doneMessage = []byte("[DONE]")

// finish sends what was kept (a non-streamed body, an unended line) and the
// final `[DONE]`, and reports whether the socket is still usable.
func (w *wsWriter) finish() error {
	if line := bytes.TrimSpace(w.line); len(line) > 0 {
		w.send(line)
	}
	if len(w.body) > 0 {
		w.send(w.body)
	}
	w.send(doneMessage)
	return w.err
}
