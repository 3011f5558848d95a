package llmstream

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"

	llmmock "github.com/caddy-llm-stream/caddy-llm-stream/mock"
)

// wsURL is the WebSocket address of a test server path.
func wsURL(c *instance, path string) string {
	return "ws://127.0.0.1" + strings.TrimPrefix(c.base(), "http://127.0.0.1") + path
}

func dialWS(t testing.TB, url string, hdr http.Header) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (status %d)", url, err, status)
	}
	t.Cleanup(func() { conn.CloseNow() })
	return conn
}

// wsAsk sends msg and returns every message of the answer, [DONE] last.
func wsAsk(t testing.TB, conn *websocket.Conn, msg string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	return wsReadAnswer(t, ctx, conn)
}

func wsReadAnswer(t testing.TB, ctx context.Context, conn *websocket.Conn) []string {
	t.Helper()
	var got []string
	for {
		typ, b, err := conn.Read(ctx)
		if err != nil {
			t.Fatalf("read after %d messages: %v", len(got), err)
		}
		if typ != websocket.MessageText {
			t.Fatalf("message type %v", typ)
		}
		got = append(got, string(b))
		if string(b) == "[DONE]" {
			return got
		}
	}
}

// chunkContent returns the delta content of an OpenAI chunk message.
func chunkContent(t testing.TB, msg string) string {
	t.Helper()
	var c struct {
		Object  string `json:"object"`
		Choices []struct {
			Delta struct {
				Content string `json:"content"`
			} `json:"delta"`
		} `json:"choices"`
	}
	if err := json.Unmarshal([]byte(msg), &c); err != nil || c.Object != "chat.completion.chunk" {
		t.Fatalf("not a chunk: %q (%v)", msg, err)
	}
	if len(c.Choices) == 0 {
		t.Fatalf("a chunk without choices (the usage chunk nobody asked for?): %s", msg)
	}
	return c.Choices[0].Delta.Content
}

func TestWebSocketAnswersAsDeltas(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 30, time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
	}`)
	want, conn, msgs := askBothWays(t, c)
	var got strings.Builder
	for _, m := range msgs[:len(msgs)-1] {
		got.WriteString(chunkContent(t, m))
	}
	if got.String() != want || len(msgs) < 30 {
		t.Fatalf("websocket answer %q in %d messages, HTTP answer %q", got.String(), len(msgs), want)
	}
	if msgs[0] == "[DONE]" || strings.Count(strings.Join(msgs, "\n"), "[DONE]") != 1 {
		t.Errorf("want exactly one final [DONE]: %q", msgs)
	}
	// Requests on one socket run one after another; each ends in [DONE].
	for i := 0; i < 3; i++ {
		msgs := wsAsk(t, conn, `{"model":"mock-1","stream":true,"messages":[{"role":"user","content":"again"}]}`)
		if len(msgs) != 33 { // role chunk, 30 tokens, finish chunk, [DONE]
			t.Fatalf("request %d: %d messages", i, len(msgs))
		}
	}
	if n := up.calls.Load(); n != 5 {
		t.Errorf("upstream calls %d, want 5", n)
	}
	c.waitLog(`"usage_status":"exact"`)
}

// askBothWays asks the same question over HTTP (the reference answer) and
// over a WebSocket, with a body that does not say "stream" (streamed all
// the same), and returns the HTTP answer's text, the socket and its
// messages.
func askBothWays(t testing.TB, c *instance) (string, *websocket.Conn, []string) {
	t.Helper()
	want := assembleSSE(t, send(t, "POST", c.base()+"/v1/chat/completions",
		`{"model":"mock-1","stream":true,"messages":[{"role":"user","content":"hi"}]}`, nil))
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), nil)
	return want, conn, wsAsk(t, conn, `{"model":"mock-1","messages":[{"role":"user","content":"hi"}]}`)
}

// assembleSSE reads an OpenAI event stream and returns its content.
func assembleSSE(t testing.TB, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var sb strings.Builder
	for ev := range readEvents(bufio.NewReader(resp.Body)) {
		data, ok := strings.CutPrefix(strings.TrimSpace(ev), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			t.Fatalf("event %q: %v", ev, err)
		}
		if len(c.Choices) > 0 {
			sb.WriteString(c.Choices[0].Delta.Content)
		}
	}
	return sb.String()
}

func TestWebSocketPlainTextAndErrors(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 5, time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket /v1/ws {
			default_model mock-1
		}
		allow_models mock-*
	}`)
	t.Run("the socket's path answers nothing but upgrades", func(t *testing.T) {
		resp, b := do(t, "GET", c.base()+"/v1/ws", "", nil)
		if resp.StatusCode != http.StatusUpgradeRequired || !strings.Contains(b, `"code":"websocket_required"`) {
			t.Errorf("GET /v1/ws: %d %s", resp.StatusCode, b)
		}
	})

	conn := dialWS(t, wsURL(c, "/v1/ws"), nil)
	t.Run("a plain text message is asked of the default model", func(t *testing.T) {
		msgs := wsAsk(t, conn, "Hello there")
		if len(msgs) != 8 || chunkContent(t, msgs[1]) == "" {
			t.Fatalf("plain text answer: %q", msgs)
		}
	})

	// Bad messages get an error in the OpenAI shape, then [DONE]; the
	// socket stays open.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := conn.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		msgs []string
		code string
	}{
		{wsReadAnswer(t, ctx, conn), "unsupported_message"},
		{wsAsk(t, conn, `{"model":"mock-1","messages":[`), "invalid_json"},
		{wsAsk(t, conn, `{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}`), "model_not_allowed"},
		{wsAsk(t, conn, "   "), "empty_message"},
	}
	for _, tc := range cases {
		if len(tc.msgs) != 2 || tc.msgs[1] != "[DONE]" {
			t.Errorf("%s: want the error then [DONE], got %q", tc.code, tc.msgs)
			continue
		}
		var e struct {
			Error struct {
				Message, Type, Code string
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(tc.msgs[0]), &e); err != nil || e.Error.Code != tc.code || e.Error.Message == "" || e.Error.Type == "" {
			t.Errorf("want error %s, got %s", tc.code, tc.msgs[0])
		}
	}
	if msgs := wsAsk(t, conn, "still there?"); len(msgs) != 8 {
		t.Errorf("after the errors: %q", msgs)
	}
}

func TestWebSocketAccessRules(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 3, time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
		api_key sk-upstream-secret
		client_key sk-client-1 team
		limit {
			requests 2 1m
		}
	}`)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	t.Run("the upgrade needs a client key", func(t *testing.T) {
		if _, resp, err := websocket.Dial(ctx, wsURL(c, "/v1/chat/completions"), nil); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("upgrade without a key: %v %v", resp, err)
		}
	})
	t.Run("the upgrade is refused outside allow_paths", func(t *testing.T) {
		key := http.Header{"Authorization": {"Bearer sk-client-1"}}
		if _, resp, err := websocket.Dial(ctx, wsURL(c, "/v1/files"), &websocket.DialOptions{HTTPHeader: key}); err == nil || resp == nil || resp.StatusCode != http.StatusNotFound {
			t.Fatalf("upgrade on a path outside allow_paths: %v %v", resp, err)
		}
	})
	// Every message counts against the caller's limits; no key reaches
	// the client.
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), http.Header{"Authorization": {"Bearer sk-client-1"}})
	for i := 0; i < 2; i++ {
		msgs := wsAsk(t, conn, `{"model":"mock-1","messages":[{"role":"user","content":"x"}]}`)
		if len(msgs) != 6 {
			t.Fatalf("message %d: %q", i, msgs)
		}
		for _, m := range msgs {
			if strings.Contains(m, "sk-upstream-secret") || strings.Contains(m, "sk-client-1") {
				t.Fatalf("a key reached the client: %s", m)
			}
		}
	}
	msgs := wsAsk(t, conn, `{"model":"mock-1","messages":[{"role":"user","content":"x"}]}`)
	if len(msgs) != 2 || !strings.Contains(msgs[0], `"code":"requests_limit_exceeded"`) {
		t.Errorf("third message past the limit: %q", msgs)
	}
	c.waitLog(`"identity":"team"`)
}

func TestWebSocketStop(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 1000, 10*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
	}`)
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.Write(ctx, websocket.MessageText, []byte(`{"model":"mock-1","messages":[{"role":"user","content":"long"}]}`)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		if _, _, err := conn.Read(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sent := time.Now()
	if err := conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	took := waitCancelled(t, up, sent)
	t.Logf("upstream cancelled %s after the stop message", took)
	if took > 100*time.Millisecond {
		t.Errorf("upstream cancelled %s after the stop message, want within 100ms", took)
	}
	rest := wsReadAnswer(t, ctx, conn)
	if len(rest) > 10 {
		t.Errorf("%d messages after the stop", len(rest))
	}
	c.waitLog(`"stopped":true`)
	// The socket goes on with the next request.
	up2 := wsAsk(t, conn, `{"model":"mock-1","max_tokens":3,"messages":[{"role":"user","content":"short"}]}`)
	if len(up2) != 6 {
		t.Errorf("after the stop: %q", up2)
	}

	// A stop stops every request sent before it, also one still queued:
	// the queued one gets [DONE] alone and never reaches the upstream.
	calls := up.calls.Load()
	for _, m := range []string{`{"model":"mock-1","messages":[{"role":"user","content":"one"}]}`,
		`{"model":"mock-1","messages":[{"role":"user","content":"two"}]}`, `{"type":"stop"}`} {
		if err := conn.Write(ctx, websocket.MessageText, []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	first, second := wsReadAnswer(t, ctx, conn), wsReadAnswer(t, ctx, conn)
	if len(first) > 20 || len(second) != 1 {
		t.Errorf("after a stop sent behind two requests: %d and %d messages", len(first), len(second))
	}
	if n := up.calls.Load() - calls; n > 1 {
		t.Errorf("%d upstream calls for the stopped requests, want at most 1", n)
	}
}

// A stop that arrives while the upstream has not answered yet ends the
// request at once with [DONE].
func TestWebSocketStopBeforeFirstByte(t *testing.T) {
	waiting := make(chan struct{}, 1)
	cancelled := make(chan time.Time, 1)
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body) // the server notices a cancel only once the body is read
		waiting <- struct{}{}
		select {
		case <-r.Context().Done():
			cancelled <- time.Now()
		case <-time.After(10 * time.Second):
		}
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
	}`)
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := conn.Write(ctx, websocket.MessageText, []byte(`{"model":"mock-1","messages":[{"role":"user","content":"x"}]}`)); err != nil {
		t.Fatal(err)
	}
	<-waiting
	sent := time.Now()
	if err := conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case at := <-cancelled:
		if at.Sub(sent) > 100*time.Millisecond {
			t.Errorf("cancelled after %s", at.Sub(sent))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was not cancelled")
	}
	if msgs := wsReadAnswer(t, ctx, conn); len(msgs) != 1 {
		t.Errorf("a request stopped before its answer gets [DONE] alone: %q", msgs)
	}
}

// The server pings an idle socket, and closes one that stops answering.
func TestWebSocketPing(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 3, time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket {
			ping_interval 100ms
		}
	}`)
	// A raw client: it sees the ping frames and never answers them.
	nc, err := net.Dial("tcp", strings.TrimPrefix(c.base(), "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	key := make([]byte, 16)
	_, _ = rand.Read(key)
	fmt.Fprintf(nc, "GET /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", strings.TrimPrefix(c.base(), "http://"), base64.StdEncoding.EncodeToString(key))
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v %v", resp, err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(3 * time.Second))
	start := time.Now()
	var opcodes []byte
	for {
		hdr := make([]byte, 2)
		if _, err := io.ReadFull(br, hdr); err != nil {
			break // closed by the server
		}
		n := int(hdr[1] & 0x7f)
		if _, err := io.CopyN(io.Discard, br, int64(n)); err != nil {
			break
		}
		opcodes = append(opcodes, hdr[0]&0x0f)
	}
	took := time.Since(start)
	if len(opcodes) == 0 || opcodes[0] != 0x9 {
		t.Fatalf("want a ping first, got opcodes %v", opcodes)
	}
	if took > 2*time.Second {
		t.Errorf("a socket that does not answer pings stayed open %s", took)
	}

	// A real client answers pings and stays connected while idle.
	conn := dialWS(t, wsURL(c, "/v1/chat/completions"), nil)
	readCtx := conn.CloseRead(context.Background()) // reads (and answers pings) in the background
	time.Sleep(500 * time.Millisecond)
	if readCtx.Err() != nil {
		t.Fatal("an idle client answering pings was disconnected")
	}
}

// countingWriter counts what the upstream wrote.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

func (w countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Clients that read slowly for 10 s while the model streams as fast as it
// can: the upstream is held back by the sockets, and the proxy's memory
// stays flat.
func TestWebSocketSlowReaderMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for 10 s")
	}
	const clients = 4
	const readFor = 10 * time.Second
	m := &llmmock.Mock{Tokens: 50_000_000, Interval: -1}
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	var produced atomic.Int64
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		_ = m.ServeHTTP(countingWriter{w, &produced}, r, nil)
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
	}`)

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	var received atomic.Int64
	var wg sync.WaitGroup
	var conns []*websocket.Conn
	defer func() {
		for _, conn := range conns { // before the upstream closes: its handlers end when the proxy cancels them
			conn.CloseNow()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), readFor)
	defer cancel()
	for i := 0; i < clients; i++ {
		conn := dialWS(t, wsURL(c, "/v1/chat/completions"), nil)
		conns = append(conns, conn)
		if err := conn.Write(ctx, websocket.MessageText, []byte(`{"model":"mock-1","messages":[{"role":"user","content":"everything"}]}`)); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(2 * time.Millisecond) // about 500 messages a second
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				_, b, err := conn.Read(ctx)
				if err != nil {
					return
				}
				received.Add(int64(len(b)))
			}
		}()
	}
	var peak uint64
	sample := time.NewTicker(time.Second)
	defer sample.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-sample.C:
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}
	wg.Wait()
	growth := int64(peak) - int64(before.HeapInuse)
	ahead := produced.Load() - received.Load()
	t.Logf("%d slow clients for %s: received %d KB, the upstream wrote %d KB (%d KB ahead, socket buffers), heap growth %d KB (%d KB per connection)",
		clients, readFor, received.Load()>>10, produced.Load()>>10, ahead>>10, growth>>10, growth/clients>>10)
	if received.Load() == 0 {
		t.Fatal("the clients received nothing")
	}
	// Loopback socket buffers can hold a few MB per connection; an unbounded
	// bridge would let the upstream run ahead by gigabytes.
	if ahead > clients*16<<20 {
		t.Errorf("the upstream ran %d MB ahead of the slow clients", ahead>>20)
	}
	if growth > 16<<20 {
		t.Errorf("heap grew %d MB while clients read slowly", growth>>20)
	}
}

// smooth applies to WebSocket clients: each message carries a piece.
func TestWebSocketSmoothed(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 8, time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		websocket
		smooth 2 1ms
	}`)
	want, _, msgs := askBothWays(t, c)
	var got strings.Builder
	for _, m := range msgs[:len(msgs)-1] {
		piece := chunkContent(t, m)
		if len([]rune(piece)) > 2 {
			t.Errorf("message with %q: more than 2 characters", piece)
		}
		got.WriteString(piece)
	}
	if got.String() != want || len(msgs) < len(want)/2 {
		t.Fatalf("smoothed over WebSocket: %q in %d messages, want %q", got.String(), len(msgs), want)
	}
}
