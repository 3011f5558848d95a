package llmstream

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	coltrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpCollector is an OTLP/HTTP trace receiver: what Caddy's tracing
// exports (protobuf over HTTP) arrives here.
type otlpCollector struct {
	*fakeUpstream
	mu    sync.Mutex
	spans []*tracepb.Span
	raw   [][]byte
}

func newOTLPCollector(t *testing.T) *otlpCollector {
	c := &otlpCollector{}
	c.fakeUpstream = newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var req coltrace.ExportTraceServiceRequest
		if err := proto.Unmarshal(b, &req); err != nil {
			t.Errorf("the collector got what is not OTLP protobuf: %v", err)
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		c.raw = append(c.raw, b)
		for _, rs := range req.ResourceSpans {
			for _, ss := range rs.ScopeSpans {
				c.spans = append(c.spans, ss.Spans...)
			}
		}
		c.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		b, _ = proto.Marshal(&coltrace.ExportTraceServiceResponse{})
		w.Write(b)
	}))
	return c
}

// spanWith waits for a span with the attribute key=value.
func (c *otlpCollector) spanWith(t *testing.T, key, value string) *tracepb.Span {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		c.mu.Lock()
		for _, s := range c.spans {
			if v, ok := attr(s.Attributes, key); ok && v.GetStringValue() == value {
				c.mu.Unlock()
				return s
			}
		}
		c.mu.Unlock()
	}
	t.Fatalf("no span with %s=%s", key, value)
	return nil
}

func attr(kvs []*commonpb.KeyValue, key string) (*commonpb.AnyValue, bool) {
	for _, kv := range kvs {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return nil, false
}

// With Caddy's tracing directive on the route, the request's span carries
// the GenAI attributes (provider, models, tokens by kind, finish reason,
// server address) and a first-token event, exported over OTLP/HTTP to a
// collector; the prompt and the answer are nowhere in what was exported.
func TestGenAISpans(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a Caddy process")
	}
	col := newOTLPCollector(t)
	t.Setenv("OTEL_TRACES_EXPORTER", "otlp")
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", col.URL+"/v1/traces")
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
	streams := providerStreams(0)
	var anthropic *providerStream
	for _, s := range streams {
		if s.name == "anthropic prompt cache" {
			anthropic = s
		}
	}
	up := newProviderServer(t, []*providerStream{anthropic})
	base, _ := startProcessCmd(t, `tracing {
		span llm
	}
	llm_stream {
		upstream `+up.URL+` {
			provider anthropic
			api_key sk-ant-test
		}
		transport http {
			tls_trust_pool file `+up.caFile+`
		}
	}`)
	resp, got := do(t, "POST", base+anthropic.path, anthropic.body, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	span := col.spanWith(t, "gen_ai.request.model", "claude-sonnet-4-5")
	want := map[string]any{
		"gen_ai.operation.name":                    "chat",
		"gen_ai.provider.name":                     "anthropic",
		"gen_ai.response.model":                    "claude-sonnet-4-5-20250929",
		"gen_ai.response.id":                       "msg_01Cache7",
		"server.address":                           "127.0.0.1",
		"gen_ai.usage.input_tokens":                int64(2582),
		"gen_ai.usage.output_tokens":               int64(57),
		"gen_ai.usage.cache_read.input_tokens":     int64(2048),
		"gen_ai.usage.cache_creation.input_tokens": int64(512),
		"gen_ai.usage.reasoning.output_tokens":     int64(0),
		"llm_stream.usage_status":                  "exact",
	}
	for k, w := range want {
		v, ok := attr(span.Attributes, k)
		switch w := w.(type) {
		case string:
			if !ok || v.GetStringValue() != w {
				t.Errorf("%s = %v, want %q", k, v, w)
			}
		case int64:
			if !ok || v.GetIntValue() != w {
				t.Errorf("%s = %v, want %d", k, v, w)
			}
		}
	}
	if v, ok := attr(span.Attributes, "gen_ai.response.finish_reasons"); !ok || len(v.GetArrayValue().GetValues()) != 1 || v.GetArrayValue().Values[0].GetStringValue() != "end_turn" {
		t.Errorf("finish reasons %v, want [end_turn]", v)
	}
	var first *tracepb.Span_Event
	for _, e := range span.Events {
		if e.Name == "gen_ai.first_token" {
			first = e
		}
	}
	if first == nil || first.TimeUnixNano < span.StartTimeUnixNano || first.TimeUnixNano > span.EndTimeUnixNano {
		t.Errorf("first-token event %v, want one inside the span", first)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	for _, b := range col.raw {
		for _, secret := range []string{"Who pays?", "contract", "tenant pays", "sk-ant-test"} {
			if strings.Contains(string(b), secret) {
				t.Errorf("the exported spans hold %q", secret)
			}
		}
	}
}
