package llmstream

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
	"weak"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// testUpstream builds a provisioned-enough upstream for routing tests.
func testUpstream(name string, models []string, rename map[string]string, weight, priority int, keys ...string) *Upstream {
	u := &Upstream{URL: "http://" + name, Models: models, Rename: rename, Weight: weight, Priority: priority,
		health: new(upstreamHealth)}
	if u.Weight == 0 {
		u.Weight = 1
	}
	u.exact = map[string]bool{}
	for _, m := range models {
		if containsGlob(m) {
			u.globs = append(u.globs, m)
			u.globPrefix = append(u.globPrefix, m[:strings.IndexAny(m, "*?[")])
		} else {
			u.exact[m] = true
		}
	}
	for _, k := range keys {
		u.keys = append(u.keys, newAPIKey(k))
	}
	if len(u.keys) == 0 {
		u.keys = []*apiKey{newAPIKey("")}
	}
	for _, k := range u.keys {
		k.rest = new(keyRest)
	}
	u.urlHash = idHash(u.URL)
	return u
}

func containsGlob(s string) bool {
	for _, c := range s {
		if c == '*' || c == '?' || c == '[' {
			return true
		}
	}
	return false
}

func names(ups []*Upstream) string {
	s := ""
	for _, u := range ups {
		s += u.URL[len("http://"):] + " "
	}
	return s
}

func TestRouterCandidates(t *testing.T) {
	openai := testUpstream("openai", []string{"gpt-4o", "gpt-4o-mini", "o[13]-*"}, nil, 1, 0)
	deepseek := testUpstream("deepseek", []string{"deepseek-*"}, map[string]string{"gpt-4o": "deepseek-chat"}, 1, 1)
	anthropic := testUpstream("anthropic", []string{"claude-?-*"}, nil, 1, 0)
	rt := newRouter([]*Upstream{openai, deepseek, anthropic})
	tests := []struct{ model, want string }{
		{"gpt-4o", "openai deepseek "},
		{"gpt-4o-mini", "openai "},
		{"o1-preview", "openai "},
		{"o2-preview", ""},
		{"deepseek-reasoner", "deepseek "},
		{"claude-3-haiku", "anthropic "},
		{"claude-35-haiku", ""},
		{"llama-3", ""},
		{"", "openai deepseek anthropic "},
	}
	for _, tc := range tests {
		if got := names(rt.candidates(tc.model)); got != tc.want {
			t.Errorf("candidates(%q): got %q, want %q", tc.model, got, tc.want)
		}
	}
	catchAll := testUpstream("local", nil, nil, 1, 5)
	rt = newRouter([]*Upstream{openai, catchAll})
	if got := names(rt.candidates("llama-3")); got != "local " {
		t.Errorf("catch-all: got %q", got)
	}
	if got := deepseek.upstreamModel("gpt-4o"); got != "deepseek-chat" {
		t.Errorf("rename: got %q", got)
	}
}

func TestOrderWeightsAndPriority(t *testing.T) {
	a := testUpstream("a", nil, nil, 1, 0)
	b := testUpstream("b", nil, nil, 3, 0)
	fallback := testUpstream("fallback", nil, nil, 100, 1)
	rnd := rand.New(rand.NewPCG(1, 2))
	healthy := func(*Upstream) bool { return true }
	first := map[*Upstream]int{}
	const n = 10000
	for i := 0; i < n; i++ {
		o := order([]*Upstream{a, b, fallback}, healthy, rnd.Float64, 0)
		first[o[0]]++
		if o[2] != fallback {
			t.Fatalf("a priority-1 fallback came before priority 0: %s", names(o))
		}
	}
	// 1:3 → 25% / 75%, each within ±10% of its expected share.
	for u, want := range map[*Upstream]float64{a: 0.25 * n, b: 0.75 * n} {
		if got := float64(first[u]); got < want*0.9 || got > want*1.1 {
			t.Errorf("%s first %v times, want %v ±10%%", u.URL, got, want)
		}
	}
	// An unhealthy upstream goes last, even before fallbacks.
	o := order([]*Upstream{a, b, fallback}, func(u *Upstream) bool { return u != a && u != b }, rnd.Float64, 0)
	if names(o) != "fallback a b " && names(o) != "fallback b a " {
		t.Errorf("unhealthy not last: %s", names(o))
	}
}

func TestHealthCooldownAndRecovery(t *testing.T) {
	u := testUpstream("u", nil, nil, 1, 0, "k1")
	s := newMemoryState(2, 30*time.Second)
	t0 := time.Unix(1000, 0)
	s.failed(u, t0)
	if !s.usable(u, t0) {
		t.Fatal("one failure took the upstream out")
	}
	s.failed(u, t0)
	if s.usable(u, t0.Add(29*time.Second)) {
		t.Fatal("two failures did not take the upstream out")
	}
	if !s.usable(u, t0.Add(30*time.Second)) {
		t.Fatal("the upstream did not come back after the cooldown")
	}
	s.failed(u, t0.Add(31*time.Second)) // half-open: one more failure is enough
	if s.usable(u, t0.Add(32*time.Second)) {
		t.Fatal("a failure right after the cooldown did not take it out again")
	}
	s.succeeded(u)
	if !s.usable(u, t0.Add(32*time.Second)) {
		t.Fatal("a success did not restore the upstream")
	}
	// all keys resting makes an upstream unusable too
	s.rest(u.keys[0], t0.Add(time.Minute))
	if s.usable(u, t0.Add(59*time.Second)) || !s.usable(u, t0.Add(time.Minute)) {
		t.Fatal("key rest not applied or not lifted")
	}
}

// keyPool is one upstream with three keys and a fresh handler state.
func keyPool() (*Upstream, *Handler) {
	return testUpstream("u", nil, nil, 1, 0, "k1", "k2", "k3"), &Handler{state: newMemoryState(3, time.Minute)}
}

// Requests rotate evenly over an upstream's keys.
func TestKeysRotate(t *testing.T) {
	u, h := keyPool()
	count := map[string]int{}
	for i := 0; i < 300; i++ {
		at := h.newPlan([]*Upstream{u}, 0).next(false)
		count[at.key.secret]++
	}
	if count["k1"] != 100 || count["k2"] != 100 || count["k3"] != 100 {
		t.Fatalf("rotation: got %v, want 100 each", count)
	}
}

// A resting key is skipped while others are free, and after a 429 the
// plan moves to another key of the same upstream.
func TestRestingKeysAreSkipped(t *testing.T) {
	u, h := keyPool()
	h.state.rest(u.keys[1], time.Now().Add(time.Minute))
	for i := 0; i < 30; i++ {
		if at := h.newPlan([]*Upstream{u}, 0).next(false); at.key.secret == "k2" {
			t.Fatal("a resting key was used while others were free")
		}
	}
	p := h.newPlan([]*Upstream{u}, 0)
	a1 := p.next(false)
	a2 := p.next(true)
	if a1.key == a2.key || a2.up != u {
		t.Fatalf("429 retry used %s then %s", a1.key.secret, a2.key.secret)
	}
}

// Affinity keeps a conversation on one key.
func TestAffinityKeepsAConversationOnOneKey(t *testing.T) {
	u, h := keyPool()
	k := h.newPlan([]*Upstream{u}, conversationHash("conversation-42")).next(false).key
	for i := 0; i < 20; i++ {
		if got := h.newPlan([]*Upstream{u}, conversationHash("conversation-42")).next(false).key; got != k {
			t.Fatalf("affinity moved from %s to %s", k.secret, got.secret)
		}
	}
}

func TestWithModelIsByteExact(t *testing.T) {
	in := "{ \"messages\" : [{\"role\":\"user\",\"content\":\"gpt-4o \\\"model\\\": x\"}],\n\t\"model\"\t:  \"gpt-4o\" , \"stream\":true}"
	want := "{ \"messages\" : [{\"role\":\"user\",\"content\":\"gpt-4o \\\"model\\\": x\"}],\n\t\"model\"\t:  \"deepseek-chat\" , \"stream\":true}"
	if got := string(withModel([]byte(in), "deepseek-chat")); got != want {
		t.Fatalf("got %s\nwant %s", got, want)
	}
	esc := `{"mod\u0065l":"gpt-4o","x":{"model":"inner"}}`
	if got := string(withModel([]byte(esc), "m2")); got != `{"mod\u0065l":"m2","x":{"model":"inner"}}` {
		t.Fatalf("escaped key: got %s", got)
	}
}

// BenchmarkRoute measures candidates + ordering + the first attempt at 100
// upstreams × 1,000 model names each, plus a glob per upstream.
func BenchmarkRoute(b *testing.B) {
	var ups []*Upstream
	for i := 0; i < 100; i++ {
		models := make([]string, 0, 1001)
		for j := 0; j < 1000; j++ {
			models = append(models, fmt.Sprintf("model-%d-%d", i, j))
		}
		models = append(models, fmt.Sprintf("family-%d-*", i))
		ups = append(ups, testUpstream(fmt.Sprint("u", i), models, nil, 1+i%3, i%2, "k1", "k2"))
	}
	h := &Handler{router: newRouter(ups), state: newMemoryState(3, time.Minute)}
	var models []string // half exact names, half glob matches
	for i := 0; i < 1000; i++ {
		models = append(models, fmt.Sprintf("model-%d-%d", i%100, (i*7)%1000), fmt.Sprintf("family-%d-x", i%100))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		model := models[i%len(models)]
		cands := h.router.candidates(model)
		if len(cands) == 0 {
			b.Fatal("no candidates for", model)
		}
		_ = h.newPlan(cands, 0).next(false)
	}
}

// BenchmarkHealthyPath compares a whole streamed request through ServeHTTP
// with one upstream against the same request with two fallbacks, a rename
// and a three-key pool in play: the failover machinery must cost nothing
// while everything is healthy.
func BenchmarkHealthyPath(b *testing.B) {
	up := newUpstream(b, unrecorded(), answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"k\":1}\n\ndata: [DONE]\n\n")
	}))
	b.Setenv("BENCH_KEY", "sk-bench")
	configs := map[string]string{
		"single": `{"upstream":"` + up.URL + `","api_key":"{env.BENCH_KEY}"}`,
		"failover": `{"upstreams":[
			{"url":"` + up.URL + `","api_keys":["{env.BENCH_KEY}1","{env.BENCH_KEY}2","{env.BENCH_KEY}3"],"models":["gpt-4o","fast"]},
			{"url":"http://127.0.0.1:1","api_keys":["{env.BENCH_KEY}4"],"priority":1},
			{"url":"http://127.0.0.1:1","api_keys":["{env.BENCH_KEY}5"],"priority":2}]}`,
		"failover+rename": `{"upstreams":[
			{"url":"` + up.URL + `","api_keys":["{env.BENCH_KEY}1","{env.BENCH_KEY}2","{env.BENCH_KEY}3"],"models":["gpt-4o"],"rename":{"fast":"gpt-4o"}},
			{"url":"http://127.0.0.1:1","api_keys":["{env.BENCH_KEY}4"],"priority":1},
			{"url":"http://127.0.0.1:1","api_keys":["{env.BENCH_KEY}5"],"priority":2}]}`,
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	handlers := map[string]*Handler{}
	for name, cfg := range configs { // provisioned first: its logs stay out of the results
		h := new(Handler)
		if err := json.Unmarshal([]byte(cfg), h); err != nil {
			b.Fatal(err)
		}
		if err := h.Provision(ctx); err != nil {
			b.Fatal(err)
		}
		handlers[name] = h
	}
	for _, name := range []string{"single", "failover", "failover+rename"} {
		h := handlers[name]
		b.Run(name, func(b *testing.B) {
			body := `{"model":"fast","stream":true,"messages":[{"role":"user","content":"hi"}]}`
			b.ReportAllocs()
			for b.Loop() {
				req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				// As Caddy's server prepares every request.
				req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), nil, &caddyhttp.Server{})
				w := httptest.NewRecorder()
				if err := h.ServeHTTP(w, req, nil); err != nil || w.Code != 200 {
					b.Fatalf("status %d, %v", w.Code, err)
				}
			}
		})
	}
}

// The body read is kept while the answer streams (failover resends it).
// When the handler rewrites it (here: asking for the usage chunk the client
// did not ask for), the body read must not stay reachable beside its
// rewrite: with agent-sized prompts that would double what every open
// stream holds.
func TestBodyReadIsNotKeptBesideItsRewrite(t *testing.T) {
	h := new(Handler)
	if err := json.Unmarshal([]byte(`{"upstreams":[{"url":"http://127.0.0.1:1","api_keys":["k"]}]}`), h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	body := `{"model":"gpt-4o","stream":true,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"` +
		strings.Repeat("long prompt ", 1000) + `"}]}`
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), nil, &caddyhttp.Server{})
	x := &exchange{w: httptest.NewRecorder(), r: r, start: time.Now(), id: "t", usage: new(usage)}
	if !h.admit(x) || !h.inspect(x) || !h.route(x) {
		t.Fatal("the request was refused")
	}
	read := weak.Make(&x.in.body[0])
	h.consultCache(x)
	x.requestUsage()
	if !x.hideUsage || !strings.Contains(string(x.in.body), `"include_usage":true`) {
		t.Fatal("the body was not rewritten: the test shows nothing")
	}
	runtime.GC()
	if read.Value() != nil {
		t.Error("the body read is still reachable beside its rewrite")
	}
	runtime.KeepAlive(x)
}
