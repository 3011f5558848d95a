package llmstream

import (
	"bufio"
	"context"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape reads the metrics endpoint of a Caddy instance.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value finds the sample with the given labels (a histogram's count).
func value(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	var sum float64
next:
	for _, m := range f.Metric {
		for _, lp := range m.Label {
			if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	return sum
}

func TestMetricsAfterKnownWorkload(t *testing.T) {
	var bodies []string
	var mu sync.Mutex
	up := usageStream(t, &bodies, &mu) // 40 prompt + 20 completion tokens an answer
	cfg := `
	metrics /metrics
	llm_stream ` + up.URL + ` {
		client_key sk-metrics-client team-m
	}`
	c := startCaddy(t, cfg)
	auth := map[string]string{"Authorization": "Bearer sk-metrics-client"}
	before := scrape(t, c.base()+"/metrics")
	up1 := map[string]string{"upstream": up.URL, "status": "200"}
	const reqs, tok = "caddy_llm_stream_requests_total", "caddy_llm_stream_tokens_total"
	base := func(f map[string]*dto.MetricFamily, name string, l map[string]string) float64 {
		return value(f, name, l)
	}

	for i := 0; i < 2; i++ {
		do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`, auth)
	}
	do(t, "GET", c.base()+"/v1/files", "", auth) // 404, not proxied
	after := c.waitMetric(t, reqs, up1, base(before, reqs, up1)+2)

	checks := []struct {
		name   string
		labels map[string]string
		delta  float64
	}{
		{reqs, map[string]string{"model": "other", "upstream": up.URL, "status": "200"}, 2},
		{reqs, map[string]string{"upstream": "", "status": "404"}, 1},
		{tok, map[string]string{"identity": "team-m", "kind": "prompt", "usage_status": "exact"}, 80},
		{tok, map[string]string{"identity": "team-m", "kind": "completion", "usage_status": "exact"}, 40},
		{"caddy_llm_stream_time_to_first_token_seconds", map[string]string{"upstream": up.URL}, 2},
		{"caddy_llm_stream_request_duration_seconds", map[string]string{"upstream": up.URL}, 2},
		{"caddy_llm_stream_inter_token_seconds", nil, 4}, // 3 content events per answer: 2 gaps each (the usage chunk adds one)
	}
	for _, ck := range checks {
		got := value(after, ck.name, ck.labels) - value(before, ck.name, ck.labels)
		if ck.name == "caddy_llm_stream_inter_token_seconds" {
			if got < ck.delta {
				t.Errorf("%s%v: +%v, want at least +%v", ck.name, ck.labels, got, ck.delta)
			}
			continue
		}
		if got != ck.delta {
			t.Errorf("%s%v: +%v, want +%v", ck.name, ck.labels, got, ck.delta)
		}
	}
	// open_streams is process-wide: streams of earlier tests may still be
	// winding down (and end meanwhile), so it must come back to where it
	// was or below; the two streams of this test must not stay counted.
	openBefore := value(before, "caddy_llm_stream_open_streams", nil)
	for i := 0; value(after, "caddy_llm_stream_open_streams", nil) > openBefore && i < 200; i++ {
		sleepBriefly()
		after = scrape(t, c.base()+"/metrics")
	}
	if v := value(after, "caddy_llm_stream_open_streams", nil); v > openBefore {
		t.Errorf("open_streams %v after the streams ended, was %v before", v, openBefore)
	}
	if strings.Contains(scrapeText(t, c.base()+"/metrics"), "sk-metrics-client") {
		t.Error("a raw client key in a label")
	}

	// A reload neither panics nor resets the counters.
	c.load(cfg)
	do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[]}`, auth)
	again := c.waitMetric(t, reqs, up1, base(before, reqs, up1)+3)
	if got := value(again, tok, map[string]string{"kind": "completion", "identity": "team-m"}) - value(before, tok, map[string]string{"kind": "completion", "identity": "team-m"}); got != 60 {
		t.Errorf("completion tokens after reload: +%v, want +60", got)
	}
}

func scrapeText(t *testing.T, url string) string {
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			return sb.String()
		}
	}
}

// waitMetric scrapes until a metric reaches a value (the usage record is
// written just after the client got the last byte).
func (c *instance) waitMetric(t *testing.T, name string, labels map[string]string, want float64) map[string]*dto.MetricFamily {
	t.Helper()
	for i := 0; ; i++ {
		f := scrape(t, c.base()+"/metrics")
		if value(f, name, labels) >= want || i == 200 {
			return f
		}
		sleepBriefly()
	}
}

// Each event the operator watches for moves its counter by exactly one:
// a retry and failover, a limit refusal, a client gone mid-stream, and
// the heartbeats sent during a silence.
func TestEventCountersAfterKnownWorkload(t *testing.T) {
	var calls atomic.Int32
	bad := failingUpstream(t, "500", &calls)
	good := newUpstream(t)
	slow := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		flushWrite(w, "data: {}\n\n")
		select {
		case <-time.After(120 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		flushWrite(w, "data: [DONE]\n\n")
	}))
	c := startCaddy(t, `
	handle /v1/slow/* {
		llm_stream `+slow.URL+` {
			allow_paths /v1/slow/*
			heartbeat 20ms
		}
	}
	handle {
		llm_stream {
			upstream `+bad+` {
				priority 0
			}
			upstream `+good.URL+` {
				priority 1
			}
			limit {
				requests 1 1m
			}
		}
	}`)
	retries0 := testutil.ToFloat64(metrics.retries.WithLabelValues(bad))
	failovers0 := testutil.ToFloat64(metrics.failovers.WithLabelValues(bad))
	limits0 := testutil.ToFloat64(metrics.limitRejects.WithLabelValues("requests"))
	beats0 := testutil.ToFloat64(metrics.heartbeats)
	gone0 := testutil.ToFloat64(metrics.disconnects)

	do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil) // 500 → fails over
	do(t, "POST", c.base()+"/v1/chat/completions", chatBody, nil) // over the limit
	do(t, "POST", c.base()+"/v1/slow/chat/completions", streamBody, nil)
	ctx, cancel := context.WithCancel(context.Background())
	resp := sendCtx(t, ctx, "POST", c.base()+"/v1/slow/chat/completions", streamBody, nil)
	bufio.NewReader(resp.Body).ReadString('\n')
	cancel()
	time.Sleep(100 * time.Millisecond)

	for name, got := range map[string]float64{
		"retries":          testutil.ToFloat64(metrics.retries.WithLabelValues(bad)) - retries0,
		"failovers":        testutil.ToFloat64(metrics.failovers.WithLabelValues(bad)) - failovers0,
		"limit rejections": testutil.ToFloat64(metrics.limitRejects.WithLabelValues("requests")) - limits0,
		"disconnects":      testutil.ToFloat64(metrics.disconnects) - gone0,
	} {
		if got != 1 {
			t.Errorf("%s: +%v, want +1", name, got)
		}
	}
	if got := testutil.ToFloat64(metrics.heartbeats) - beats0; got < 3 {
		t.Errorf("heartbeats: +%v, want at least 3 during 120 ms of silence at 20 ms", got)
	}
}
