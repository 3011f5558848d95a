package llmstream

import (
	"errors"
	"path"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/memo"
)

// metrics are created once per process and registered into the registry
// of every config load (Caddy makes a new one per load), so reloads neither
// panic on double registration nor reset the counters.
var metrics = struct {
	requests       *prometheus.CounterVec
	ttft           *prometheus.HistogramVec
	duration       *prometheus.HistogramVec
	interToken     *gapHistogram
	tokens         *prometheus.CounterVec
	cost           *prometheus.CounterVec
	affinity       *prometheus.CounterVec
	routed         *prometheus.CounterVec
	affinityHit    prometheus.Counter // its two series, looked up once
	affinityMoved  prometheus.Counter
	openStreams    prometheus.Gauge
	disconnects    prometheus.Counter
	stops          prometheus.Counter
	openSockets    prometheus.Gauge
	heartbeats     prometheus.Counter
	retries        *prometheus.CounterVec
	failovers      *prometheus.CounterVec
	limitRejects   *prometheus.CounterVec
	denyWordBlocks *prometheus.CounterVec
	cache          *prometheus.CounterVec
}{}

const metricsNS, metricsSub = "caddy", "llm_stream"

// costChildren are the cost counter's series, looked up once per model and
// identity (WithLabelValues hashes and validates its labels every time).
var costChildren = memo.Map[[2]string, prometheus.Counter]{Max: 1024}

func costCounter(model, identity string) prometheus.Counter {
	k := [2]string{model, identity}
	if c, ok := costChildren.Get(k); ok {
		return c
	}
	return costChildren.Put(k, metrics.cost.WithLabelValues(model, identity))
}

func init() { initMetrics() }

func initMetrics() {
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: metricsNS, Subsystem: metricsSub, Name: name, Help: help}
	}
	hist := func(name, help string, buckets []float64) prometheus.HistogramOpts {
		return prometheus.HistogramOpts{Namespace: metricsNS, Subsystem: metricsSub, Name: name, Help: help, Buckets: buckets}
	}
	latency := []float64{.05, .1, .25, .5, 1, 2, 4, 8, 15, 30, 60, 120}
	metrics.requests = prometheus.NewCounterVec(prometheus.CounterOpts(opts("requests_total", "Requests by model, upstream and the status the client got.")), []string{"model", "upstream", "status"})
	metrics.ttft = prometheus.NewHistogramVec(hist("time_to_first_token_seconds", "Time from the request to the first data event relayed.", latency), []string{"model", "upstream"})
	metrics.duration = prometheus.NewHistogramVec(hist("request_duration_seconds", "Time from the request to the end of the answer.", latency), []string{"model", "upstream"})
	metrics.interToken = &gapHistogram{
		desc:    prometheus.NewDesc(prometheus.BuildFQName(metricsNS, metricsSub, "inter_token_seconds"), "Gaps between data events of a streamed answer.", []string{"model"}, nil),
		byModel: map[string]*gapCounts{},
	}
	metrics.tokens = prometheus.NewCounterVec(prometheus.CounterOpts(opts("tokens_total", "Tokens by model, identity, kind and usage status. prompt counts every input token and completion every output token; cached_prompt (read from the provider's prompt cache), cache_write and reasoning are the parts of them providers report.")), []string{"model", "identity", "kind", "usage_status"})
	metrics.cost = prometheus.NewCounterVec(prometheus.CounterOpts(opts("cost_usd_total", "What answers cost at the configured prices, in US dollars, by model and identity.")), []string{"model", "identity"})
	metrics.affinity = prometheus.NewCounterVec(prometheus.CounterOpts(opts("affinity_total", "Requests under key_affinity: hit (the conversation's own upstream and key) or moved (it rested, was unhealthy, or the request failed over).")), []string{"result"})
	metrics.affinityHit, metrics.affinityMoved = metrics.affinity.WithLabelValues("hit"), metrics.affinity.WithLabelValues("moved")
	metrics.routed = prometheus.NewCounterVec(prometheus.CounterOpts(opts("routed_total", "Requests whose model a route rule chose, by the model asked for and the model chosen.")), []string{"asked", "chosen"})
	metrics.openStreams = prometheus.NewGauge(prometheus.GaugeOpts(opts("open_streams", "Answers being relayed now.")))
	metrics.disconnects = prometheus.NewCounter(prometheus.CounterOpts(opts("client_disconnects_total", "Clients that left before the answer ended.")))
	metrics.openSockets = prometheus.NewGauge(prometheus.GaugeOpts(opts("websockets_open", "WebSocket connections open.")))
	metrics.stops = prometheus.NewCounter(prometheus.CounterOpts(opts("generations_stopped_total", "Generations stopped by stop_endpoint or a WebSocket stop message.")))
	metrics.heartbeats = prometheus.NewCounter(prometheus.CounterOpts(opts("heartbeats_total", "Heartbeat comments sent to clients.")))
	metrics.retries = prometheus.NewCounterVec(prometheus.CounterOpts(opts("retries_total", "Failed attempts that were retried, by the upstream that failed.")), []string{"upstream"})
	metrics.failovers = prometheus.NewCounterVec(prometheus.CounterOpts(opts("failovers_total", "Retries that moved to another upstream, by the upstream left.")), []string{"upstream"})
	metrics.limitRejects = prometheus.NewCounterVec(prometheus.CounterOpts(opts("limit_rejections_total", "Requests refused by a limit.")), []string{"limit"})
	metrics.cache = prometheus.NewCounterVec(prometheus.CounterOpts(opts("cache_requests_total", "Requests by response cache result: hit (answered from the cache or a shared answer), miss (answered by the upstream and stored) or bypass (not cacheable, or Cache-Control: no-store).")), []string{"model", "result"})
	metrics.denyWordBlocks = prometheus.NewCounterVec(prometheus.CounterOpts(opts("deny_word_blocks_total", "Requests or answers stopped by deny_words.")), []string{"scope"})
}

// registerMetrics adds the collectors to this config's registry.
func registerMetrics(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.requests, metrics.ttft, metrics.duration, metrics.interToken, metrics.tokens, metrics.cost, metrics.affinity, metrics.routed,
		metrics.openStreams, metrics.disconnects, metrics.stops, metrics.openSockets, metrics.heartbeats, metrics.retries,
		metrics.failovers, metrics.limitRejects, metrics.denyWordBlocks, metrics.cache,
	} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

// modelLabel keeps the model label's values to names the configuration
// holds: clients choose model strings, so they must not choose label
// values. An exact name keeps its name, a glob match is labelled with the
// glob, anything else is "other".
func (h *Handler) modelLabel(model string) string {
	if model == "" {
		return ""
	}
	if h.labels == nil { // not provisioned
		return h.findLabel(model)
	}
	if l, ok := h.labels.Get(model); ok {
		return l
	}
	return h.labels.Put(model, h.findLabel(model))
}

// findLabel is modelLabel's answer, found anew.
func (h *Handler) findLabel(model string) string {
	if _, ok := h.router.byModel[model]; ok {
		return model
	}
	for _, u := range h.router.globbed {
		for _, g := range u.globs {
			if ok, _ := path.Match(g, model); ok {
				return g
			}
		}
	}
	for _, pat := range h.AllowModels {
		if ok, _ := path.Match(pat, model); ok {
			return pat
		}
	}
	if h.prices != nil { // priced names are configured names too
		switch p := h.prices.of(model); {
		case p.isExact:
			return model
		case p.isGlob:
			return p.pattern
		}
	}
	return "other"
}

// gapBuckets are the upper bounds of the inter-token histogram.
var gapBuckets = [...]float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// gapCounts is a histogram kept by one stream without atomics (a shared
// prometheus histogram costs contended atomic adds on every event) and
// merged into gapHistogram once, when the stream ends.
type gapCounts struct {
	counts [len(gapBuckets)]uint64 // per bucket, not cumulative
	count  uint64
	sum    float64
}

func (c *gapCounts) observe(v float64) {
	for i, le := range gapBuckets {
		if v <= le {
			c.counts[i]++
			break
		}
	}
	c.count++
	c.sum += v
}

// observeZeros counts n gaps of 0 s (events that arrived together).
func (c *gapCounts) observeZeros(n int) {
	if n > 0 {
		c.counts[0] += uint64(n)
		c.count += uint64(n)
	}
}

// gapHistogram is the inter-token histogram, a collector that reports the
// merged per-stream counts as a constant histogram on each scrape.
type gapHistogram struct {
	desc    *prometheus.Desc
	mu      sync.Mutex
	byModel map[string]*gapCounts
}

func (g *gapHistogram) merge(model string, c *gapCounts) {
	if c.count == 0 {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	t := g.byModel[model]
	if t == nil {
		t = new(gapCounts)
		g.byModel[model] = t
	}
	for i := range c.counts {
		t.counts[i] += c.counts[i]
	}
	t.count += c.count
	t.sum += c.sum
}

// Describe implements prometheus.Collector.
func (g *gapHistogram) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }

// Collect implements prometheus.Collector.
func (g *gapHistogram) Collect(ch chan<- prometheus.Metric) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for model, c := range g.byModel {
		buckets := make(map[float64]uint64, len(gapBuckets))
		var cum uint64
		for i, le := range gapBuckets {
			cum += c.counts[i]
			buckets[le] = cum
		}
		ch <- prometheus.MustNewConstHistogram(g.desc, c.count, c.sum, buckets, model)
	}
}
