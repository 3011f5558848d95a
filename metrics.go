package llmstream

import (
	"errors"
	"path"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are created once per process and registered into the registry
// of every config load (Caddy makes a new one per load), so reloads neither
// panic on double registration nor reset the counters.
var metrics = struct {
	requests       *prometheus.CounterVec
	ttft           *prometheus.HistogramVec
	duration       *prometheus.HistogramVec
	interToken     *prometheus.HistogramVec
	tokens         *prometheus.CounterVec
	openStreams    prometheus.Gauge
	disconnects    prometheus.Counter
	heartbeats     prometheus.Counter
	retries        *prometheus.CounterVec
	failovers      *prometheus.CounterVec
	limitRejects   *prometheus.CounterVec
	denyWordBlocks *prometheus.CounterVec
}{}

const metricsNS, metricsSub = "caddy", "llm_stream"

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
	metrics.interToken = prometheus.NewHistogramVec(hist("inter_token_seconds", "Gaps between data events of a streamed answer.", []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}), []string{"model"})
	metrics.tokens = prometheus.NewCounterVec(prometheus.CounterOpts(opts("tokens_total", "Tokens by model, identity, kind (prompt or completion) and usage status.")), []string{"model", "identity", "kind", "usage_status"})
	metrics.openStreams = prometheus.NewGauge(prometheus.GaugeOpts(opts("open_streams", "Answers being relayed now.")))
	metrics.disconnects = prometheus.NewCounter(prometheus.CounterOpts(opts("client_disconnects_total", "Clients that left before the answer ended.")))
	metrics.heartbeats = prometheus.NewCounter(prometheus.CounterOpts(opts("heartbeats_total", "Heartbeat comments sent to clients.")))
	metrics.retries = prometheus.NewCounterVec(prometheus.CounterOpts(opts("retries_total", "Failed attempts that were retried, by the upstream that failed.")), []string{"upstream"})
	metrics.failovers = prometheus.NewCounterVec(prometheus.CounterOpts(opts("failovers_total", "Retries that moved to another upstream, by the upstream left.")), []string{"upstream"})
	metrics.limitRejects = prometheus.NewCounterVec(prometheus.CounterOpts(opts("limit_rejections_total", "Requests refused by a limit.")), []string{"limit"})
	metrics.denyWordBlocks = prometheus.NewCounterVec(prometheus.CounterOpts(opts("deny_word_blocks_total", "Requests or answers stopped by deny_words.")), []string{"scope"})
}

// registerMetrics adds the collectors to this config's registry.
func registerMetrics(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.requests, metrics.ttft, metrics.duration, metrics.interToken, metrics.tokens,
		metrics.openStreams, metrics.disconnects, metrics.heartbeats, metrics.retries,
		metrics.failovers, metrics.limitRejects, metrics.denyWordBlocks,
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
	return "other"
}

// upstreamLabel is the upstream's configured URL.
func upstreamLabel(at attempt) string {
	if at.up == nil {
		return ""
	}
	return at.up.URL
}
