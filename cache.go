package llmstream

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cache"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/pace"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/sse"
)

// CacheConfig keeps complete answers and replays them to identical
// requests: as a stream to a streaming request, as JSON to a plain one,
// whichever form the answer was stored in (for OpenAI chat completions).
type CacheConfig struct {
	// How long an answer is kept. Required.
	TTL caddy.Duration `json:"ttl"`

	// The memory bound of the in-process cache in bytes; the least
	// recently used answers go first. Default: 64MB.
	MaxSize int64 `json:"max_size,omitempty"`

	// Where answers are kept: `memory` (the default; this process) or
	// `redis` (the `store redis` server, shared by every instance using
	// it). When Redis cannot be reached the cache is skipped and logged;
	// requests still go to the upstream.
	Store string `json:"store,omitempty"`

	// Cache only requests meant to be repeatable: `temperature` 0, or a
	// `seed`, and every embeddings request. Default: true.
	OnlyDeterministic *bool `json:"only_deterministic,omitempty"`

	// Who may be served a stored answer: `identity` (the default; only the
	// caller that caused it, by client key name or address) or `global`
	// (any caller).
	Scope string `json:"scope,omitempty"`

	// How a stored stream is replayed: `instant` (the default; all at
	// once) or `paced` (with the original pauses between reads, each
	// capped at 1s).
	Replay string `json:"replay,omitempty"`
}

const (
	defaultCacheSize = 64 << 20
	// maxPacedPause caps each pause of a paced replay.
	maxPacedPause = time.Second
	// cacheOpTimeout bounds a cache read or write, so a slow Redis costs a
	// request at most this much.
	cacheOpTimeout = 250 * time.Millisecond
)

func (h *Handler) provisionCache() error {
	c := h.Cache
	if c == nil {
		return nil
	}
	if err := checkCacheTTL(time.Duration(c.TTL)); err != nil {
		return err
	}
	if c.MaxSize == 0 {
		c.MaxSize = defaultCacheSize
	}
	if c.OnlyDeterministic == nil {
		t := true
		c.OnlyDeterministic = &t
	}
	if c.Scope == "" {
		c.Scope = "identity"
	}
	if c.Replay == "" {
		c.Replay = "instant"
	}
	if c.Store == "" {
		c.Store = "memory"
	}
	switch {
	case c.MaxSize < 0:
		return errors.New("cache: max_size must be positive")
	case c.Scope != "identity" && c.Scope != "global":
		return errors.New("cache: scope must be identity or global")
	case c.Replay != "instant" && c.Replay != "paced":
		return errors.New("cache: replay must be instant or paced")
	case c.Store == "memory":
		// Pooled by its bound and upstreams: a reload that keeps them keeps
		// the entries.
		m, err := share(h, cachePool, strconv.FormatInt(c.MaxSize, 10)+" for "+h.upstreamSet(), func() (*cache.Memory, func() error, error) {
			return cache.NewMemory(c.MaxSize), nil, nil
		})
		if err != nil {
			return err
		}
		h.cacheStore = m
	case c.Store == "redis":
		if h.redis == nil {
			return errors.New("cache: store redis needs the `store redis <address>` setting")
		}
		h.cacheStore = cache.NewRedis(h.redis.Client(), h.redisPrefix())
	default:
		return errors.New("cache: store must be memory or redis")
	}
	h.flights = new(cache.Group)
	return nil
}

// cacheState is what the cache decided for one request.
type cacheState struct {
	key    string
	result string // hit, miss or bypass: {llm.cache}
	write  bool   // store the answer when it completes

	// serving from the cache: the answer's form and bytes
	contentType string
	src         io.Reader
	entry       *cache.Entry // a stored answer (nil while following a flight)
	direct      bool         // entry is served as stored, at once
	follow      *cache.Flight

	lead *cache.Flight // this request's upstream answer is shared
}

func (cs *cacheState) serving() bool { return cs != nil && cs.src != nil }

// consultCache is the stage that decides how the cache takes part: a
// stored answer, a live one to share, or a miss to store.
func (h *Handler) consultCache(x *exchange) {
	x.cache = h.cacheLookup(x.r, x.identity, x.in, x.cands)
	if x.cache != nil {
		x.w.Header().Set("X-Cache", cacheHeader(x.cache.result))
	}
}

// cacheLookup decides how the cache takes part in a request: a stored
// answer, a live answer of an identical request in progress, or a miss
// whose answer will be stored. It is called before the body's
// include_usage edit: the key is the client's request.
func (h *Handler) cacheLookup(r *http.Request, identity string, in *inbound, cands []*Upstream) *cacheState {
	if h.cacheStore == nil {
		return nil
	}
	cs := &cacheState{result: "bypass"}
	cc := strings.ToLower(r.Header.Get("Cache-Control"))
	if r.Method != http.MethodPost || !in.isJSON || strings.Contains(cc, "no-store") {
		return cs
	}
	if *h.Cache.OnlyDeterministic && !deterministic(r.URL.Path, in.body) {
		return cs
	}
	norm, ok := normalizedBody(in.body)
	if !ok {
		return cs
	}
	scope := "*"
	if h.Cache.Scope == "identity" {
		scope = "id:" + identity
	}
	sum := sha256.New()
	for _, part := range [][]byte{[]byte(r.URL.Path), []byte(cands[0].upstreamModel(in.model)), []byte(scope), norm} {
		sum.Write(part)
		sum.Write([]byte{0})
	}
	cs.key = hex.EncodeToString(sum.Sum(nil))
	cs.write, cs.result = true, "miss"
	if strings.Contains(cc, "no-cache") {
		cs.lead = h.flights.Alone(cs.key) // answered by the upstream, stored again
		return cs
	}
	ctx, cancel := context.WithTimeout(r.Context(), cacheOpTimeout)
	e, err := h.cacheStore.Get(ctx, cs.key)
	cancel()
	if err != nil {
		h.cacheUnavailable(err)
	}
	if e != nil && cs.serveEntry(r.Context(), e, in.stream, h.Cache.Replay == "paced") {
		cs.result, cs.write = "hit", false
		return cs
	}
	// Identical requests in progress share one upstream answer. Only the
	// same form is shared live; the other form waits for the stored entry.
	f, lead := h.flights.Join(cs.key + "|" + formOf(in.stream))
	if lead {
		cs.lead = f
		return cs
	}
	ct, src, ok, _ := f.Wait(r.Context())
	if !ok {
		f.Leave()
		return cs // the leader got no answer: ask the upstream ourselves
	}
	cs.follow, cs.contentType, cs.src = f, ct, src
	cs.result, cs.write = "hit", false
	return cs
}

// cacheHeader is the X-Cache value for a cache result.
func cacheHeader(result string) string {
	if result == "hit" {
		return "HIT"
	}
	return "MISS"
}

// cacheAbandon ends a request's part in the cache when it is refused
// before any answer: a flight it leads ends (its followers ask the
// upstream themselves), a flight it follows loses a follower.
func (h *Handler) cacheAbandon(cs *cacheState) {
	switch {
	case cs == nil:
	case cs.lead != nil:
		cs.lead.End(false)
	case cs.follow != nil:
		cs.follow.Leave()
	}
}

func formOf(stream bool) string {
	if stream {
		return "stream"
	}
	return "json"
}

// serveEntry prepares the replay of a stored answer in the form the
// request wants; false when it cannot be converted.
func (cs *cacheState) serveEntry(ctx context.Context, e *cache.Entry, stream, paced bool) bool {
	switch {
	case e.Streamed == stream:
		cs.contentType = e.ContentType
		if paced && len(e.Reads) > 1 {
			cs.src = &pacedReader{e: e, ctx: ctx}
		} else {
			cs.src = bytes.NewReader(e.Body)
			f := framingOf(e.ContentType)
			cs.direct = f == framePlain || (f == frameSSE && e.UsageTo > e.UsageFrom)
		}
	case framingOf(e.ContentType) == frameSSE:
		b, ok := cache.StreamToJSON(e.Body)
		if !ok {
			return false
		}
		cs.contentType, cs.src = "application/json", bytes.NewReader(b)
	default:
		b, ok := cache.JSONToStream(e.Body)
		if !ok {
			return false
		}
		cs.contentType, cs.src = "text/event-stream; charset=utf-8", bytes.NewReader(b)
	}
	cs.entry = e
	return true
}

// replay relays a cached (or shared) answer through the same relay as an
// upstream one: the include_usage chunk is hidden from clients that did
// not ask for it, usage is read, deny words apply.
func (h *Handler) replay(r *http.Request, in *inbound, rl *relay, cs *cacheState) attemptResult {
	if cs.follow != nil {
		defer cs.follow.Leave()
	}
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {cs.contentType}}}
	rl.setAttempt(func(error) {})
	rl.begin(resp, in.stream)
	if cs.direct && rl.deny == nil && rl.answer == nil {
		// A stored answer in the form asked for, with nothing to watch in
		// it: written at once, without parsing it again.
		return rl.writeStored(cs.entry)
	}
	out := rl.copyBody(cs.src, false)
	res, ok := rl.ending(out, r.Context(), http.StatusOK)
	if !ok {
		res = rl.broken(out.err, http.StatusOK)
	}
	res.cached = true
	return res
}

// cacheFinish ends a request's part in the cache: the flight it led ends
// (its followers see the end), and a complete answer is stored.
func (h *Handler) cacheFinish(cs *cacheState, last *attemptResult) {
	if cs == nil || cs.lead == nil {
		return
	}
	ok := last.done && last.complete && last.code == http.StatusOK && cs.write
	e := cs.lead.End(ok)
	if e == nil {
		return
	}
	if framingOf(e.ContentType) == frameSSE {
		e.UsageFrom, e.UsageTo = usageChunkRange(e.Body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cacheOpTimeout)
	defer cancel()
	if err := h.cacheStore.Set(ctx, cs.key, e, time.Duration(h.Cache.TTL)); err != nil {
		h.cacheUnavailable(err)
	}
}

// usageChunkRange finds the event holding the include_usage chunk in a
// stored event stream; 0, 0 when there is none.
func usageChunkRange(body []byte) (int, int) {
	for start := 0; start < len(body); {
		end := sse.EventEnd(body, start)
		if end < 0 {
			break
		}
		if isUsageChunk(body[start:end]) {
			return start, end
		}
		start = end
	}
	return 0, 0
}

var lastCacheWarning atomic.Int64

// cacheUnavailable logs a failing cache store, at most once a second.
func (h *Handler) cacheUnavailable(err error) {
	now := time.Now().UnixNano()
	if prev := lastCacheWarning.Load(); now-prev < int64(time.Second) || !lastCacheWarning.CompareAndSwap(prev, now) {
		return
	}
	h.logger.Warn("response cache unavailable; requests go to the upstream", zap.Error(err))
}

// deterministic reports whether a request asks for a repeatable answer:
// temperature 0 or a seed; embeddings always are.
func deterministic(path string, body []byte) bool {
	if strings.HasSuffix(path, "/embeddings") {
		return true
	}
	if s, _ := topLevelValue(body, "seed"); s >= 0 {
		return true
	}
	s, e := topLevelValue(body, "temperature")
	if s < 0 {
		return false
	}
	var t float64
	return json.Unmarshal(body[s:e], &t) == nil && t == 0
}

// normalizedBody is the request body as the cache key sees it: parsed and
// written again (object keys sorted, no whitespace, numbers as written),
// without the members that do not change the answer: stream,
// stream_options and user.
func normalizedBody(body []byte) ([]byte, bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v map[string]any
	if dec.Decode(&v) != nil {
		return nil, false
	}
	delete(v, "stream")
	delete(v, "stream_options")
	delete(v, "user")
	b, err := json.Marshal(v)
	return b, err == nil
}

// pacedReader replays a stored answer read by read, pausing as the
// upstream did (each pause capped).
type pacedReader struct {
	e   *cache.Entry
	ctx context.Context
	i   int // next read
	pos int
	pace.Sleeper
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.pos >= len(p.e.Body) {
		return 0, io.EOF
	}
	end := len(p.e.Body)
	if p.i < len(p.e.Reads) {
		end = p.e.Reads[p.i].End
	}
	if p.pos == startOf(p.e, p.i) && p.i > 0 && p.i < len(p.e.Reads) {
		pause := min(p.e.Reads[p.i].At-p.e.Reads[p.i-1].At, maxPacedPause)
		if !p.Sleep(p.ctx, pause) {
			return 0, p.ctx.Err()
		}
	}
	n := copy(b, p.e.Body[p.pos:end])
	p.pos += n
	if p.pos == end {
		p.i++
	}
	return n, nil
}

func startOf(e *cache.Entry, i int) int {
	if i == 0 {
		return 0
	}
	return e.Reads[i-1].End
}
