package llmstream

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cache"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// ask posts body to url's chat completions with the headers given as
// name, value pairs, requires a 200 and returns the X-Cache header and the
// body.
func ask(t testing.TB, url, body string, hdr ...string) (string, string) {
	t.Helper()
	h := map[string]string{}
	for i := 0; i+1 < len(hdr); i += 2 {
		h[hdr[i]] = hdr[i+1]
	}
	resp, b := do(t, "POST", url+"/v1/chat/completions", body, h)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	return resp.Header.Get("X-Cache"), b
}

const (
	keyA = "Authorization"
	tokA = "Bearer sk-client-a"
	tokB = "Bearer sk-client-b"
)

var idAndCreated = regexp.MustCompile(`"id":"[^"]*","object":"([a-z.]*)","created":\d+`)

// sameAnswer hides what differs between two calls of the same model: the
// answer's id and creation time.
func sameAnswer(s string) string {
	return idAndCreated.ReplaceAllString(s, `"id":"X","object":"$1","created":0`)
}

// cachingProxy is llm_stream with a one-minute cache and two client keys
// (identities a and b) in front of llm_mock answering 12 words.
func cachingProxy(t *testing.T) (*fakeUpstream, *instance) {
	up := newUpstream(t, modelAnswers(t, 12, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		client_key sk-client-a a
		client_key sk-client-b b
		cache 1m
	}`)
	return up, c
}

const cachedQuestion = `{"model":"gpt-4o","temperature":0,"stream":true,"messages":[{"role":"user","content":"What is Caddy?"}]}`

// A repeated request, also written differently, is a hit with the bytes
// of the miss; a client asking for usage gets the usage chunk the first
// call asked the upstream for on its behalf.
func TestCacheHitRepeatsTheMissBytes(t *testing.T) {
	up, c := cachingProxy(t)
	q := cachedQuestion
	x, miss := ask(t, c.base(), q, keyA, tokA)
	if x != "MISS" || up.calls.Load() != 1 {
		t.Fatalf("first request: X-Cache %q, %d upstream calls", x, up.calls.Load())
	}
	if strings.Contains(miss, `"choices":[]`) || !strings.HasSuffix(miss, "data: [DONE]\n\n") {
		t.Fatalf("miss answered %q", miss)
	}
	for _, body := range []string{
		q,
		`{ "messages": [ {"content":"What is Caddy?", "role":"user"} ], "stream": true, "temperature": 0, "model": "gpt-4o", "user": "u-17" }`,
	} {
		x, hit := ask(t, c.base(), body, keyA, tokA)
		if x != "HIT" || hit != miss {
			t.Fatalf("X-Cache %q for %s\ngot  %q\nwant %q", x, body, hit, miss)
		}
	}
	x, withUsage := ask(t, c.base(), strings.Replace(q, `"stream":true`, `"stream":true,"stream_options":{"include_usage":true}`, 1), keyA, tokA)
	usageChunk := regexp.MustCompile(`data: \{[^\n]*"choices":\[\],"usage":\{"prompt_tokens":\d+,"completion_tokens":12,"total_tokens":\d+\}\}\n\n`)
	if x != "HIT" || !usageChunk.MatchString(withUsage) || usageChunk.ReplaceAllString(withUsage, "") != strings.ReplaceAll(miss, `}]}`, `}],"usage":null}`) {
		t.Fatalf("include_usage hit %q: %q", x, withUsage)
	}
	if n := up.calls.Load(); n != 1 {
		t.Fatalf("%d upstream calls, want 1", n)
	}
	// The usage line says the answer came from the cache.
	c.waitLog(`"upstream":"cache"`, `"usage_status":"cached"`, `"cache":"hit"`)
}

// A plain request is served from a stored stream, byte for byte what the
// model answers a plain request (but for id and time), and a plain answer
// serves a streaming request as chunks that assemble back to it.
func TestCacheConvertsBetweenStreamAndPlain(t *testing.T) {
	up, c := cachingProxy(t)
	ask(t, c.base(), cachedQuestion, keyA, tokA)
	plain := strings.Replace(cachedQuestion, `"stream":true`, `"stream":false`, 1)
	x, assembled := ask(t, c.base(), plain, keyA, tokA)
	_, direct := do(t, "POST", up.URL+"/v1/chat/completions", plain, nil)
	if x != "HIT" || sameAnswer(assembled) != sameAnswer(direct) {
		t.Fatalf("plain from stream, X-Cache %q:\ngot  %s\nwant %s", x, assembled, direct)
	}
	if calls := up.calls.Load(); calls != 2 { // the direct call above
		t.Fatalf("%d upstream calls, want 2", calls)
	}

	plain2 := strings.Replace(plain, "Caddy?", "Go?", 1)
	_, stored := ask(t, c.base(), plain2, keyA, tokA)
	x, chunks := ask(t, c.base(), strings.Replace(plain2, `"stream":false`, `"stream":true,"stream_options":{"include_usage":true}`, 1), keyA, tokA)
	back, ok := cache.StreamToJSON([]byte(chunks))
	if x != "HIT" || !ok || string(back) != stored {
		t.Fatalf("stream from plain, X-Cache %q:\n%s\nassembles to %s\nwant %s", x, chunks, back, stored)
	}
}

// Another identity never gets a's answer.
func TestCacheIsPerIdentity(t *testing.T) {
	up, c := cachingProxy(t)
	ask(t, c.base(), cachedQuestion, keyA, tokA)
	if x, _ := ask(t, c.base(), cachedQuestion, keyA, tokB); x != "MISS" || up.calls.Load() != 2 {
		t.Fatalf("identity b: X-Cache %q, %d calls", x, up.calls.Load())
	}
	if x, _ := ask(t, c.base(), cachedQuestion, keyA, tokB); x != "HIT" {
		t.Fatalf("identity b again: X-Cache %q", x)
	}
}

// Only deterministic requests are cached: temperature above 0 is not,
// unless a seed makes it so.
func TestCacheOnlyDeterministicRequests(t *testing.T) {
	up, c := cachingProxy(t)
	hot := strings.Replace(cachedQuestion, `"temperature":0`, `"temperature":0.7`, 1)
	for range 2 {
		if x, _ := ask(t, c.base(), hot, keyA, tokA); x != "MISS" {
			t.Fatalf("temperature 0.7: X-Cache %q", x)
		}
	}
	seeded := strings.Replace(hot, `"temperature":0.7`, `"temperature":0.7,"seed":42`, 1)
	ask(t, c.base(), seeded, keyA, tokA)
	if x, _ := ask(t, c.base(), seeded, keyA, tokA); x != "HIT" {
		t.Fatalf("seeded request: X-Cache %q", x)
	}
	if got := up.calls.Load(); got != 3 {
		t.Fatalf("%d upstream calls, want 3", got)
	}
}

// Cache-Control: no-cache skips the read (and stores again); no-store
// skips both.
func TestCacheControlFromTheClient(t *testing.T) {
	up, c := cachingProxy(t)
	q := cachedQuestion
	ask(t, c.base(), q, keyA, tokA)
	if x, _ := ask(t, c.base(), q, keyA, tokA, "Cache-Control", "no-cache"); x != "MISS" || up.calls.Load() != 2 {
		t.Fatalf("no-cache: X-Cache %q", x)
	}
	fresh := strings.Replace(q, "Caddy?", "nginx?", 1)
	ask(t, c.base(), fresh, keyA, tokA, "Cache-Control", "no-store")
	if x, _ := ask(t, c.base(), fresh, keyA, tokA); x != "MISS" || up.calls.Load() != 4 {
		t.Fatalf("after no-store: X-Cache %q, %d calls", x, up.calls.Load())
	}
	renewed := strings.Replace(q, "Caddy?", "HTTP/3?", 1)
	ask(t, c.base(), renewed, keyA, tokA, "Cache-Control", "no-cache")
	if x, _ := ask(t, c.base(), renewed, keyA, tokA); x != "HIT" || up.calls.Load() != 5 {
		t.Fatalf("a no-cache answer was not stored: X-Cache %q, %d calls", x, up.calls.Load())
	}
	c.waitLog(`"cache":"bypass"`)
}

func TestCacheTTLExpiry(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 5, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		cache 300ms
	}`)
	q := `{"model":"m","seed":1,"messages":[{"role":"user","content":"hi"}]}`
	ask(t, c.base(), q)
	if x, _ := ask(t, c.base(), q); x != "HIT" {
		t.Fatalf("within the ttl: %q", x)
	}
	time.Sleep(400 * time.Millisecond)
	if x, _ := ask(t, c.base(), q); x != "MISS" || up.calls.Load() != 2 {
		t.Fatalf("after the ttl: %q, %d calls", x, up.calls.Load())
	}
}

// TestCacheHitsCostNoTokens: a token limit that one answer nearly uses up
// still admits any number of hits.
func TestCacheHitsCostNoTokens(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 40, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		limit {
			tokens 150 1m
		}
		cache 1m
	}`)
	q := `{"model":"m","temperature":0,"max_tokens":40,"messages":[{"role":"user","content":"hi"}]}`
	for i := range 5 {
		if x, _ := ask(t, c.base(), q); (i == 0) != (x == "MISS") {
			t.Fatalf("request %d: X-Cache %q", i, x)
		}
	}
	// A second uncached answer is refused: the first one's tokens counted.
	other := strings.Replace(q, `"hi"`, `"ho"`, 1)
	ask(t, c.base(), other)
	resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", strings.Replace(q, `"hi"`, `"hu"`, 1), nil)
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("third distinct answer: status %d, want 429", resp.StatusCode)
	}
}

// TestCacheSingleFlight sends 50 identical streaming requests at once:
// one upstream call, every client gets the whole answer as it streams, and
// clients that leave (the first one among them) do not stop the others.
func TestCacheSingleFlight(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 20, 15*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		cache 1m {
			scope global
		}
	}`)
	q := `{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"share"}]}`
	const n = 50
	bodies := make([]string, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	leaving := map[int]bool{0: true, 7: true, 31: true}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i > 0 {
				time.Sleep(20 * time.Millisecond) // request 0 leads
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, c.base()+"/v1/chat/completions", strings.NewReader(q))
			resp, err := noCompressClient.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			var got strings.Builder
			for ev := range readEvents(br) {
				got.WriteString(ev)
				if leaving[i] && strings.Contains(ev, `" Caddy"`) {
					cancel() // a few tokens in: this client leaves
					break
				}
			}
			bodies[i] = got.String()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := up.calls.Load(); got != 1 {
		t.Fatalf("%d upstream calls for %d identical requests, want 1", got, n)
	}
	if up.finished.Load() != 1 {
		t.Fatal("the upstream answer was cut when its first client left")
	}
	var full string
	for i, b := range bodies {
		if !leaving[i] {
			full = b
			break
		}
	}
	if !strings.HasSuffix(full, "data: [DONE]\n\n") || strings.Count(full, "data: ") != 23 {
		t.Fatalf("shared answer %q", full)
	}
	for i, b := range bodies {
		if !leaving[i] && b != full {
			t.Fatalf("client %d got %q, want %q", i, b, full)
		}
	}
	if x, _ := ask(t, c.base(), q); x != "HIT" || up.calls.Load() != 1 {
		t.Fatalf("after the flight: X-Cache %q, %d calls", x, up.calls.Load())
	}
}

// TestCacheSoleClientLeaving: a leader with no followers that leaves
// cancels the upstream at once, and nothing is stored.
func TestCacheSoleClientLeaving(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 50, 20*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		cache 1m
	}`)
	q := `{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"bye"}]}`
	ctx, cancel := context.WithCancel(context.Background())
	resp := sendCtx(t, ctx, "POST", c.base()+"/v1/chat/completions", q, nil)
	evs := readEvents(bufio.NewReader(resp.Body))
	<-evs
	<-evs
	cancel()
	resp.Body.Close()
	deadline := time.Now().Add(time.Second)
	for up.cancelled.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if up.cancelled.Load() != 1 || up.finished.Load() != 0 {
		t.Fatalf("the upstream was not cancelled: %d cancelled, %d finished", up.cancelled.Load(), up.finished.Load())
	}
	if x, _ := ask(t, c.base(), q); x != "MISS" {
		t.Fatalf("a cut answer was stored: X-Cache %q", x)
	}
}

func TestCacheSharedThroughRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	rds := redistest.Start(t)
	up := newUpstream(t, modelAnswers(t, 30, 0))
	directives := `llm_stream ` + up.URL + ` {
		allow_paths /v1/*
		store redis ` + rds.Addr + `
		cache 1m {
			store redis
			scope global
		}
	}`
	b := startProcess(t, directives)
	a := startCaddy(t, directives).base()
	q := `{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"shared"}]}`
	x1, first := ask(t, a, q)
	x2, second := ask(t, b, q)
	if x1 != "MISS" || x2 != "HIT" || first != second || up.calls.Load() != 1 {
		t.Fatalf("a: %q, b: %q, same bytes %v, %d upstream calls", x1, x2, first == second, up.calls.Load())
	}
}

func TestCacheRedisUnreachable(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 5, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		store redis 127.0.0.1:`+fmt.Sprint(freePort(t))+`
		cache 1m {
			store redis
		}
	}`)
	q := `{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}`
	for range 2 {
		if x, body := ask(t, c.base(), q); x != "MISS" || !strings.Contains(body, `"chat.completion"`) {
			t.Fatalf("X-Cache %q, body %q", x, body)
		}
	}
	c.waitLog("response cache unavailable")
}

func TestCacheCaddyfile(t *testing.T) {
	for _, tc := range []struct{ in, err string }{
		{"cache", "wrong argument count"},
		{"cache 0s", "cache: a positive ttl is required"},
		{"cache 1m {\n store disk\n}", "store 'disk' is not memory or redis"},
		{"cache 1m {\n scope everyone\n}", "scope 'everyone' is not global or identity"},
		{"cache 1m {\n replay slow\n}", "replay 'slow' is not instant or paced"},
		{"cache 1m {\n max_size lots\n}", "bad size value"},
		{"cache 1m {\n colour blue\n}", "unknown option 'colour'"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("llm_stream http://127.0.0.1:1 {\n" + tc.in + "\n}"))
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%q: got %v, want %q", tc.in, err, tc.err)
		}
	}
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("llm_stream http://127.0.0.1:1 {\ncache 10m {\n max_size 1MB\n store memory\n only_deterministic off\n scope global\n replay paced\n}\n}")); err != nil {
		t.Fatal(err)
	}
	if c := h.Cache; time.Duration(c.TTL) != 10*time.Minute || c.MaxSize != 1000000 || *c.OnlyDeterministic || c.Scope != "global" || c.Replay != "paced" {
		t.Fatalf("parsed %+v", c)
	}
}

func TestNormalizedBody(t *testing.T) {
	a, _ := normalizedBody([]byte(`{"b":[1,2.50,{"y":1,"x":2}],"a":"é","stream":true,"user":"u"}`))
	b, _ := normalizedBody([]byte("{\n \"a\" : \"\\u00e9\", \"stream_options\":{}, \"b\":[1, 2.50, {\"x\":2,\"y\":1}] }"))
	if !bytes.Equal(a, b) {
		t.Fatalf("%s != %s", a, b)
	}
	c, _ := normalizedBody([]byte(`{"b":[1,2.5,{"y":1,"x":2}],"a":"é"}`))
	if bytes.Equal(a, c) {
		t.Fatal("2.50 and 2.5 are different request texts, kept apart")
	}
}

// BenchmarkCacheHit measures a hit for a 2,000-token streamed answer with
// replay instant, through a real Caddy server on loopback: from sending the
// request to the last byte read. It reports p50 and p99.
func BenchmarkCacheHit(b *testing.B) {
	up := newUpstream(b, unrecorded(), modelAnswers(b, 2000, 0))
	c := startCaddy(b, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		cache 1h
	}`)
	q := `{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"a long answer"}]}`
	_, first := ask(b, c.base(), q)
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	var lat []time.Duration
	buf := make([]byte, 64<<10)
	for b.Loop() {
		t0 := time.Now()
		req, _ := http.NewRequest(http.MethodPost, c.base()+"/v1/chat/completions", strings.NewReader(q))
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for {
			m, err := resp.Body.Read(buf)
			n += m
			if err != nil {
				break
			}
		}
		resp.Body.Close()
		lat = append(lat, time.Since(t0))
		if resp.Header.Get("X-Cache") != "HIT" || n != len(first) {
			b.Fatalf("X-Cache %q, %d bytes, want %d", resp.Header.Get("X-Cache"), n, len(first))
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(len(first)), "answer-B")
}

// TestCachePacedReplay: replay paced keeps the upstream's rhythm (each
// pause capped at 1 s); instant sends it at once.
func TestCachePacedReplay(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 6, 40*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/*
		cache 1m {
			replay paced
		}
	}`)
	q := `{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"pace"}]}`
	_, first := ask(t, c.base(), q)
	resp := send(t, "POST", c.base()+"/v1/chat/completions", q, nil)
	defer resp.Body.Close()
	var arrivals []time.Duration
	var got strings.Builder
	t0 := time.Now()
	for ev := range readEvents(bufio.NewReader(resp.Body)) {
		arrivals = append(arrivals, time.Since(t0))
		got.WriteString(ev)
	}
	if resp.Header.Get("X-Cache") != "HIT" || got.String() != first {
		t.Fatalf("X-Cache %q, got %q, want %q", resp.Header.Get("X-Cache"), got.String(), first)
	}
	// 6 tokens 40 ms apart: the last one comes about 200 ms after the first.
	if spread := arrivals[len(arrivals)-1] - arrivals[0]; spread < 150*time.Millisecond || spread > time.Second {
		t.Fatalf("paced replay spread its events over %v, want about 200ms", spread)
	}
}
