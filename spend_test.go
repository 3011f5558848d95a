package llmstream

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// usageAnswer answers every request with a JSON chat completion that
// reports the given usage (the model echoed from the request).
func usageAnswer(usage string) upstreamOption {
	model := regexp.MustCompile(`"model":"([^"]*)"`)
	return answering(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		m := model.FindStringSubmatch(string(b))
		w.Header().Set("Content-Type", "application/json")
		if m == nil { // GET /v1/models
			io.WriteString(w, `{"object":"list","data":[{"id":"m","object":"model"}]}`)
			return
		}
		io.WriteString(w, `{"id":"chatcmpl-c","object":"chat.completion","model":"`+m[1]+`","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":`+usage+`}`)
	})
}

// costOf reads cost_usd from the usage line of the request id.
func costOf(t *testing.T, c *instance, id string) string {
	t.Helper()
	line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(c.waitLog(`"request_id":"` + id + `"`))
	m := regexp.MustCompile(`"cost_usd":([0-9.e-]+)`).FindStringSubmatch(line)
	if m == nil {
		return ""
	}
	return m[1]
}

// Each answer's cost, from its usage at the configured prices, reaches the
// usage line and the cost counter exactly: cached prompt tokens and cache
// writes at their own prices, a glob price, a price from a prices_file in
// the common format, a price line before the file, and no cost for a model
// without a price.
func TestCostOfKnownUsage(t *testing.T) {
	up := newUpstream(t, usageAnswer(`{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100,"prompt_tokens_details":{"cached_tokens":600}}`))
	anthropic := newUpstream(t, usageAnswer(`{"input_tokens":30,"cache_creation_input_tokens":200,"cache_read_input_tokens":2560,"output_tokens":5}`))
	file := filepath.Join(t.TempDir(), "model_prices_and_context_window.json")
	os.WriteFile(file, []byte(`{
		"sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0, "litellm_provider": "one of https://docs.litellm.ai/docs/providers"},
		"gpt-4o": {"max_tokens": 16384, "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai", "mode": "chat"},
		"openrouter/deepseek/deepseek-chat": {"input_cost_per_token": 1.4e-07, "output_cost_per_token": 2.8e-07, "litellm_provider": "openrouter", "mode": "chat"},
		"dall-e-3": {"output_cost_per_pixel": 0.0, "litellm_provider": "openai", "mode": "image_generation"},
		"o1": {"input_cost_per_token": 1.5e-05, "output_cost_per_token": 6e-05, "cache_read_input_token_cost": 7.5e-06, "litellm_provider": "openai", "mode": "chat"}
	}`), 0o600)
	c := startCaddy(t, `
	handle /anthropic/* {
		uri strip_prefix /anthropic
		llm_stream `+anthropic.URL+` {
			price claude-sonnet-4* input 3 output 15 cached 0.30 cache_write 3.75
		}
	}
	handle {
		llm_stream `+up.URL+` {
			price o1 input 10 output 40
			price gpt-4.1* input 2 output 8 cached 0.5
			prices_file `+file+`
		}
	}`)
	for _, tc := range []struct {
		name, path, model string
		cost              float64 // US dollars
		label             string  // the model label of the metrics
	}{
		// 400 fresh × 2.5 + 600 cached × 1.25 + 100 × 10, per million
		{"from the prices file, cached at its own price", "/v1/chat/completions", "gpt-4o", 0.00275, "gpt-4o"},
		// 400 × 2 + 600 × 0.5 + 100 × 8
		{"a glob", "/v1/chat/completions", "gpt-4.1-mini", 0.0019, "gpt-4.1*"},
		// the price line wins over the file: 1000 × 10 + 100 × 40
		{"a price line before the file", "/v1/chat/completions", "o1", 0.014, "o1"},
		// a provider-prefixed name in the file prices the bare name
		{"a prefixed name in the file", "/v1/chat/completions", "deepseek-chat", 0.000168, "deepseek-chat"},
		// 30 × 3 + 2560 × 0.30 + 200 × 3.75 + 5 × 15
		{"anthropic cache reads and writes", "/anthropic/v1/messages", "claude-sonnet-4-5", 0.001683, "claude-sonnet-4*"},
		{"a model without a price", "/v1/chat/completions", "llama-3", -1, "other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := testutil.ToFloat64(metrics.cost.WithLabelValues(tc.label, ""))
			resp, body := do(t, "POST", c.base()+tc.path, `{"model":"`+tc.model+`","messages":[{"role":"user","content":"hi"}]}`, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			got := costOf(t, c, resp.Header.Get("X-Request-Id"))
			if tc.cost < 0 {
				if got != "" {
					t.Fatalf("cost_usd %s for a model without a price", got)
				}
				return
			}
			if got != strconv.FormatFloat(tc.cost, 'g', -1, 64) {
				t.Errorf("cost_usd %s, want %g", got, tc.cost)
			}
			if d := testutil.ToFloat64(metrics.cost.WithLabelValues(tc.label, "")) - before; math.Abs(d-tc.cost) > 1e-12 {
				t.Errorf("the cost counter moved by %g, want %g", d, tc.cost)
			}
		})
	}
}

// A budget cannot be overrun by concurrent requests (each reserves the
// most it may cost before it is admitted), is refused with 402 in the
// OpenAI error shape, holds across a reload, and refuses a model without a
// price rather than letting it spend uncounted.
func TestSpendLimitInOneInstance(t *testing.T) {
	up := newUpstream(t, usageAnswer(`{"prompt_tokens":20,"completion_tokens":100,"total_tokens":120}`))
	config := func(requests string) string {
		return `llm_stream ` + up.URL + ` {
		client_key sk-team team
		price m input 1 output 8
		limit {
			spend 0.004 1h
			requests ` + requests + ` 1h
		}
	}`
	}
	c := startCaddyAdmin(t, config("1000"))
	team := map[string]string{"Authorization": "Bearer sk-team"}
	body := `{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`
	// Each costs (20 × $1 + 100 × $8) per million tokens = $0.00082 and
	// reserves $0.000825 (25 prompt tokens by size, max_tokens 100): four
	// fit in $0.004, a fifth does not.
	var ok atomic.Int32
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, got := do(t, "POST", c.base()+"/v1/chat/completions", body, team)
			switch resp.StatusCode {
			case http.StatusOK:
				ok.Add(1)
			case http.StatusPaymentRequired:
				if !strings.Contains(got, `"type":"insufficient_quota","code":"spend_limit_exceeded"`) || resp.Header.Get("Retry-After") == "" {
					t.Errorf("refusal: %s (Retry-After %q)", got, resp.Header.Get("Retry-After"))
				}
			default:
				t.Errorf("status %d: %s", resp.StatusCode, got)
			}
		}()
	}
	wg.Wait()
	if n := ok.Load(); n < 1 || n > 4 {
		t.Fatalf("%d requests of $0.00082 admitted under a $0.004 budget", n)
	}
	// Sequential requests fill it to what fits.
	for range 4 {
		do(t, "POST", c.base()+"/v1/chat/completions", body, team)
	}
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", body, team); resp.StatusCode != http.StatusPaymentRequired {
		t.Fatalf("after the budget was spent: %d", resp.StatusCode)
	}
	// A reload (the same limits) keeps what was spent.
	c.reload(config("1000"))
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", body, team); resp.StatusCode != http.StatusPaymentRequired {
		t.Fatalf("after a reload the budget was fresh: %d", resp.StatusCode)
	}
	resp, got := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"unpriced","messages":[]}`, team)
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(got, `"code":"model_not_priced"`) {
		t.Fatalf("a model without a price under a spend limit: %d %s", resp.StatusCode, got)
	}
	// A request that names no model (the upstream's model list) costs
	// nothing and is not refused for want of a price.
	if resp, got := do(t, "GET", c.base()+"/v1/models", "", team); resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/models under a spend limit: %d %s", resp.StatusCode, got)
	}
}

// Three instances on one Redis and one identity with a $0.01 budget: 300
// concurrent streamed requests of known cost spend no more than the
// budget plus one request's reservation, the rest get 402, and what Redis
// counted is exactly what the admitted answers cost.
func TestSpendLimitAcrossThreeInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two more Caddy processes")
	}
	rds := redistest.Start(t)
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 5 {
			flushWrite(w, `data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"w`+strconv.Itoa(i)+`"}}],"usage":null}`+"\n\n")
			time.Sleep(4 * time.Millisecond)
		}
		flushWrite(w, `data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":100,"total_tokens":120}}`+"\n\ndata: [DONE]\n\n")
	}))
	directives := `llm_stream ` + up.URL + ` {
		client_key sk-team team
		price m input 1 output 8
		limit {
			spend 0.01 1h
		}
		store redis ` + rds.Addr + ` {
			prefix budget:
		}
	}`
	bases := []string{startProcess(t, directives), startProcess(t, directives), startCaddy(t, directives).base()}
	body := `{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`
	const (
		cost   = 20*1000 + 100*8000 // nano-dollars: $0.00082
		budget = 10_000_000         // $0.01
	)
	// len(body)/3 prompt tokens at the input price, max_tokens at the
	// output price
	reserve := int64(len(body)/3*1000 + 100*8000)
	var ok, refused atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 100}}
	for i := 0; i < 300; i++ {
		wg.Add(1)
		go func(base string, i int) {
			defer wg.Done()
			<-start
			time.Sleep(time.Duration(i%30) * 10 * time.Millisecond) // arrivals spread over 0.3 s: admissions race settlements
			req, _ := http.NewRequest(http.MethodPost, base+"/v1/chat/completions", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer sk-team")
			resp, err := client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch resp.StatusCode {
			case http.StatusOK:
				if !strings.HasSuffix(string(got), "data: [DONE]\n\n") {
					t.Errorf("an admitted stream ended early: %q", got)
				}
				ok.Add(1)
			case http.StatusPaymentRequired:
				refused.Add(1)
			default:
				t.Errorf("status %d: %s", resp.StatusCode, got)
			}
		}(bases[i%3], i)
	}
	close(start)
	wg.Wait()
	spent := int64(ok.Load()) * cost
	t.Logf("%d admitted ($%g), %d refused of 300 across three instances; budget $0.01", ok.Load(), usd(spent), refused.Load())
	if spent > budget+reserve {
		t.Fatalf("admitted $%g, over the $0.01 budget by more than one reservation", usd(spent))
	}
	if int(ok.Load())+int(refused.Load()) != 300 || int64(ok.Load()) < budget/reserve {
		t.Fatalf("admitted %d, refused %d; want at least %d admitted and the rest refused", ok.Load(), refused.Load(), budget/reserve)
	}
	// What Redis counted is what the admitted answers cost, and nothing is
	// left reserved.
	rc := redis.NewClient(&redis.Options{Addr: rds.Addr})
	defer rc.Close()
	ctx := context.Background()
	// (Settlements are written within moments of the answers' end.)
	var all map[string]string
	var counted int64
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if all, err = rc.HGetAll(ctx, "budget:{team}:limits").Result(); err != nil || len(all) == 0 {
			t.Fatalf("the identity's limits in Redis: %v %v", all, err)
		}
		sc, _ := strconv.ParseInt(all["sc"], 10, 64)
		sp, _ := strconv.ParseInt(all["sp"], 10, 64)
		if counted = sc + sp; counted == spent || time.Now().After(deadline) {
			break
		}
	}
	if counted != spent {
		t.Errorf("Redis counted %d nano-dollars, the admitted answers cost %d", counted, spent)
	}
	for f, v := range all { // nothing in flight: no count, no reservation
		total := (f == "held" || f == "n") && v != "0"
		part := strings.HasPrefix(f, "i:") && !strings.HasPrefix(v, "0 0 ")
		if total || part {
			t.Errorf("left after every request ended: %s = %s", f, v)
		}
	}
}

// BenchmarkMoneyPath compares, side by side in one loop, a streamed
// request through ServeHTTP on the healthy path with a request limit (in
// memory, or in Redis) with the same request when prices, a spend limit
// and key_affinity auto are added: what the money features add per
// request.
func BenchmarkMoneyPath(b *testing.B) {
	up := newUpstream(b, unrecorded(), answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\ndata: [DONE]\n\n")
	}))
	b.Setenv("BENCH_KEY", "sk-bench")
	rds := redistest.Start(b)
	plain := `{"upstreams":[{"url":"` + up.URL + `","api_keys":["{env.BENCH_KEY}1","{env.BENCH_KEY}2","{env.BENCH_KEY}3"]}],
		"limit":{"requests":1000000000,"request_window":3600000000000}}`
	money := `{"upstreams":[{"url":"` + up.URL + `","api_keys":["{env.BENCH_KEY}1","{env.BENCH_KEY}2","{env.BENCH_KEY}3"]}],
		"key_affinity":"auto","prices":[{"model":"gpt-4o*","input":2.5,"output":10}],
		"limit":{"requests":1000000000,"request_window":3600000000000,"spend":1000000,"spend_window":3600000000000}}`
	for _, tc := range []struct{ name, store string }{
		{"memory", ""},
		{"redis", `,"store":{"redis":"` + rds.Addr + `","prefix":"bench:"}`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			provision := func(cfg string) *Handler {
				h := new(Handler)
				if err := json.Unmarshal([]byte(cfg), h); err != nil {
					b.Fatal(err)
				}
				if err := h.Provision(ctx); err != nil {
					b.Fatal(err)
				}
				h.logger = zap.NewNop() // usage lines are not what is measured
				return h
			}
			hp, hm := provision(plain[:len(plain)-1]+tc.store+"}"), provision(money[:len(money)-1]+tc.store+"}")
			body := `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`
			serve := func(h *Handler) time.Duration {
				req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), nil, &caddyhttp.Server{})
				w := httptest.NewRecorder()
				t0 := time.Now()
				if err := h.ServeHTTP(w, req, nil); err != nil || w.Code != 200 {
					b.Fatalf("status %d, %v: %s", w.Code, err, w.Body)
				}
				return time.Since(t0)
			}
			var lp, lm []time.Duration
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if i++; i%2 == 0 {
					lp = append(lp, serve(hp))
					lm = append(lm, serve(hm))
				} else {
					lm = append(lm, serve(hm))
					lp = append(lp, serve(hp))
				}
			}
			p50 := func(l []time.Duration) float64 {
				slices.Sort(l)
				return float64(l[len(l)/2].Nanoseconds()) / 1e3
			}
			// Each money request ran next to a plain one: the median of
			// those pairs' differences is the added time with the
			// machine's drift taken out.
			diffs := make([]time.Duration, len(lm))
			for i := range lm {
				diffs[i] = lm[i] - lp[i]
			}
			pairedP50 := p50(diffs)
			plainP50, moneyP50 := p50(lp), p50(lm)
			b.ReportMetric(plainP50, "plain-p50-µs")
			b.ReportMetric(moneyP50, "money-p50-µs")
			b.ReportMetric(moneyP50-plainP50, "added-p50-µs")
			b.ReportMetric(pairedP50, "added-paired-p50-µs")
		})
	}
}
