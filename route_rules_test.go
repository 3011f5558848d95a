package llmstream

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// costRules is a cost-balancing rule set: images, tools and audio to the
// models that handle them, long prompts to a long-context model, legal
// questions to a reasoning model, everything else to a cheap one.
const costRules = `route {
			if ` + "`has_images`" + ` model gpt-4o
			if ` + "`has_audio`" + ` model gpt-4o-audio-preview
			if ` + "`has_tools && messages > 1`" + ` model gpt-4.1
			if ` + "`prompt_tokens > 2000`" + ` model gpt-4.1-long
			if ` + "`text.matches(\"(?i)\\\\b(contract|lease)\\\\b\")`" + ` model o3
			if ` + "`max_tokens > 8000 // long answers`" + ` model gpt-4.1-big
			default model gpt-4.1-mini
		}
		route_models auto fast`

// Requests for auto (or fast) reach the upstream with the model the rules
// chose from what they ask; a request for a real model is left alone; the
// usage line shows the model asked for and the model chosen.
func TestRouteRulesChooseTheModel(t *testing.T) {
	up := newUpstream(t, usageAnswer(`{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}`))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		`+costRules+`
	}`)
	long := strings.Repeat("Summarise this paragraph about rivers. ", 200)
	for _, tc := range []struct{ name, body, want string }{
		{"plain short question", `{"model":"auto","messages":[{"role":"user","content":"What is Caddy?"}]}`, "gpt-4.1-mini"},
		{"an image part", `{"model":"auto","messages":[{"role":"user","content":[{"type":"text","text":"What is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}]}`, "gpt-4o"},
		{"an Anthropic image block", `{"model":"auto","max_tokens":100,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}}]}]}`, "gpt-4o"},
		{"audio input", `{"model":"auto","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklGR","format":"wav"}}]}]}`, "gpt-4o-audio-preview"},
		{"tools in a conversation", `{"model":"auto","tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}],"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"Weather in Paris?"}]}`, "gpt-4.1"},
		{"tools with one message", `{"model":"auto","tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"messages":[{"role":"user","content":"hi"}]}`, "gpt-4.1-mini"},
		{"a long prompt", `{"model":"fast","messages":[{"role":"user","content":"` + long + `"}]}`, "gpt-4.1-long"},
		{"a legal question", `{"model":"auto","messages":[{"role":"user","content":"Who pays under this Lease?"}]}`, "o3"},
		{"a commented rule", `{"model":"auto","max_tokens":9000,"messages":[{"role":"user","content":"hi"}]}`, "gpt-4.1-big"},
		{"a model asked for by name", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Who pays under this lease?"}]}`, "gpt-4o-mini"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, got := do(t, "POST", c.base()+"/v1/chat/completions", tc.body, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, got)
			}
			reqs := up.requests()
			var sent struct {
				Model string `json:"model"`
			}
			json.Unmarshal([]byte(reqs[len(reqs)-1].Body), &sent)
			if sent.Model != tc.want {
				t.Errorf("the upstream got model %q, want %q", sent.Model, tc.want)
			}
			var asked struct {
				Model string `json:"model"`
			}
			json.Unmarshal([]byte(tc.body), &asked)
			id := resp.Header.Get("X-Request-Id")
			line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(c.waitLog(`"request_id":"` + id + `"`))
			chosen := tc.want
			if tc.want == asked.Model {
				chosen = ""
			}
			if !strings.Contains(line, `"model":"`+asked.Model+`"`) || !strings.Contains(line, `"model_chosen":"`+chosen+`"`) {
				t.Errorf("usage line %s: want model %s, model_chosen %q", line, asked.Model, chosen)
			}
		})
	}
}

// A bad expression fails when the config loads, with its line in a
// Caddyfile; an expression that is not a bool too.
func TestRouteRulesRefuseBadExpressions(t *testing.T) {
	for _, tc := range []struct{ expr, want string }{
		{"`prompt_tokens >`", "Syntax error"},
		{"`no_such_fact`", "undeclared reference"},
		{"`prompt_tokens + 1`", "not a bool"},
	} {
		d := caddyfile.NewTestDispenser("llm_stream http://up {\n\troute {\n\t\tif " + tc.expr + " model m\n\t}\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "Testfile:3") {
			t.Errorf("%s: %v, want %q at Testfile:3", tc.expr, err, tc.want)
		}
		h := &Handler{Upstream: "http://up", Route: &RouteRules{Rules: []RouteRule{{If: strings.Trim(tc.expr, "`"), Model: "m"}}}}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		if err := h.Provision(ctx); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("JSON %s: %v", tc.expr, err)
		}
		cancel()
	}
}

// BenchmarkRouteRules is what ten rules cost per request, the last one
// matching: the facts from the body, the evaluation and the model
// rewritten in the body; over the request's facts only, and with the
// tenth rule a regular expression over the request's text.
func BenchmarkRouteRules(b *testing.B) {
	facts := []string{"has_images", "has_audio", "has_tools && messages > 1", "prompt_tokens > 2000",
		"max_tokens > 8000", "stream && user == 'vip'", "identity == 'research'", "messages > 40",
		"model == 'deep' && prompt_tokens > 500"}
	body := []byte(`{"model":"auto","stream":true,"messages":[{"role":"system","content":"You are careful."},{"role":"user","content":"Please review this contract for me."}]}`)
	for _, tc := range []struct{ name, last string }{
		{"ten-facts", "prompt_tokens > 10"},
		{"nine-facts-and-text", `text.matches("(?i)contract")`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			rules := &RouteRules{Default: "cheap"}
			for _, e := range append(facts[:len(facts):len(facts)], tc.last) {
				rules.Rules = append(rules.Rules, RouteRule{If: e, Model: "m"})
			}
			h := &Handler{Route: rules, logger: nopLogger(), router: new(router)}
			if err := h.provisionRouteRules(); err != nil {
				b.Fatal(err)
			}
			var lat []time.Duration
			b.ReportAllocs()
			for b.Loop() {
				x := &exchange{in: &inbound{body: body, isJSON: true, model: "auto", stream: true}}
				t0 := time.Now()
				h.chooseModel(x)
				lat = append(lat, time.Since(t0))
				if x.in.model != "m" {
					b.Fatalf("chose %q", x.in.model)
				}
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
		})
	}
}
