package llmstream

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/promql/parser"
)

// grafanaDashboard is the part of Grafana's dashboard model the example
// must get right to load and show data.
type grafanaDashboard struct {
	Title         string `json:"title"`
	UID           string `json:"uid"`
	SchemaVersion int    `json:"schemaVersion"`
	Templating    struct {
		List []struct {
			Name, Type string
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		ID         int    `json:"id"`
		Type       string `json:"type"`
		Title      string `json:"title"`
		Datasource struct {
			Type, UID string
		} `json:"datasource"`
		GridPos struct {
			H, W, X, Y int
		} `json:"gridPos"`
		Targets []struct {
			RefID string `json:"refId"`
			Expr  string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

// The example Grafana dashboard is a well-formed dashboard model whose
// every query is valid PromQL naming only metrics that the metrics
// endpoint exposes after a workload that touches them all.
func TestGrafanaDashboardQueriesExposedMetrics(t *testing.T) {
	b, err := os.ReadFile("examples/grafana/llm_stream.json")
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("not a dashboard model: %v", err)
	}
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 30 || len(d.Panels) < 10 {
		t.Fatalf("title %q, uid %q, schemaVersion %d, %d panels", d.Title, d.UID, d.SchemaVersion, len(d.Panels))
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
	}
	ids := map[int]bool{}
	metricsUsed := map[string]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] || p.Type == "" || p.Title == "" || p.GridPos.W == 0 || p.GridPos.H == 0 || len(p.Targets) == 0 {
			t.Errorf("panel %d %q: duplicate id, or no type, title, size or query", p.ID, p.Title)
		}
		ids[p.ID] = true
		if p.Datasource.Type != "prometheus" || !vars[strings.Trim(p.Datasource.UID, "${}")] {
			t.Errorf("panel %q: datasource %+v is not the dashboard's Prometheus variable", p.Title, p.Datasource)
		}
		for _, tg := range p.Targets {
			// Grafana's variables, as Grafana would fill them in.
			q := strings.NewReplacer("$__rate_interval", "5m", "$job", ".*").Replace(tg.Expr)
			expr, err := parser.ParseExpr(q)
			if err != nil {
				t.Errorf("panel %q: %v in %s", p.Title, err, tg.Expr)
				continue
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok {
					metricsUsed[vs.Name] = true
				}
				return nil
			})
		}
	}

	// A workload that moves every metric: a failover, a stream with usage
	// and cost, a cache hit, key affinity, a refusal.
	model := newUpstream(t, modelAnswers(t, 6, 5*time.Millisecond))
	c := startCaddy(t, `
	metrics /metrics
	llm_stream {
		upstream http://127.0.0.1:1 {
			priority 0
		}
		upstream `+model.URL+` {
			priority 1
			api_key sk-d1 sk-d2
		}
		key_affinity auto
		price * input 1 output 2
		cache 1m
		limit {
			requests 2 1m
		}
	}`)
	q := `{"model":"mock-1","temperature":0,"stream":true,"messages":[{"role":"user","content":"dashboard"}]}`
	for i, want := range []int{200, 200, 429} {
		if resp, got := do(t, "POST", c.base()+"/v1/chat/completions", q, nil); resp.StatusCode != want {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, got)
		}
	}
	c.waitLog(`"cache":"hit"`)
	exposed := scrapeText(t, c.base()+"/metrics")
	for m := range metricsUsed {
		if !strings.Contains(exposed, "\n"+m+"{") && !strings.Contains(exposed, "\n"+m+" ") {
			t.Errorf("the dashboard queries %s, which the metrics endpoint does not expose", m)
		}
	}
	if len(metricsUsed) < 10 {
		t.Errorf("the dashboard queries only %d metrics", len(metricsUsed))
	}
}
