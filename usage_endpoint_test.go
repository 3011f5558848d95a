package llmstream

import (
	"encoding/json"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// GET <usage_endpoint>/<id> answers, by the request's X-Request-Id or by
// its answer's id, exactly what the usage line recorded (tokens by kind,
// cost, time to first token, cache); only to the caller that made the
// request; with the OpenAI error shape for a wrong method or an unknown id.
func TestUsageEndpoint(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 8, 2*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		client_key sk-alice alice
		client_key sk-bob bob
		price mock-* input 1 output 2
		usage_endpoint /v1/usage
		cache 1m
	}`)
	alice := map[string]string{"Authorization": "Bearer sk-alice"}
	q := `{"model":"mock-1","temperature":0,"stream":true,"messages":[{"role":"user","content":"how much?"}]}`
	for _, wantCache := range []string{"miss", "hit"} {
		resp, answer := do(t, "POST", c.base()+"/v1/chat/completions", q, alice)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, answer)
		}
		id := resp.Header.Get("X-Request-Id")
		line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(c.waitLog(`"request_id":"` + id + `"`))
		var logged struct {
			Prompt     int64   `json:"prompt_tokens"`
			Completion int64   `json:"completion_tokens"`
			Status     string  `json:"usage_status"`
			Cost       float64 `json:"cost_usd"`
			Cache      string  `json:"cache"`
		}
		if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &logged); err != nil {
			t.Fatalf("usage line %s: %v", line, err)
		}
		answerID := regexp.MustCompile(`"id":"(chatcmpl-[^"]+)"`).FindStringSubmatch(answer)[1]
		for _, key := range []string{id, answerID} {
			resp, got := do(t, "GET", c.base()+"/v1/usage/"+key, "", alice)
			var rec usageRecord
			if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(got), &rec) != nil {
				t.Fatalf("GET /v1/usage/%s: %d %s", key, resp.StatusCode, got)
			}
			if rec.Usage.PromptTokens != logged.Prompt || rec.Usage.CompletionTokens != logged.Completion ||
				rec.Usage.Status != logged.Status || rec.CostUSD == nil || *rec.CostUSD != logged.Cost ||
				rec.Cache != wantCache || rec.Cache != logged.Cache || rec.ID != id || strings.Contains(got, "owner") {
				t.Errorf("%s: record %s, usage line %s", wantCache, got, line)
			}
			if wantCache == "miss" && (rec.Usage.CompletionTokens != 8 || rec.TTFTMillis < 0 || rec.TokensPerSecond <= 0) {
				t.Errorf("record %s: want 8 completion tokens and a speed", got)
			}
		}
		if resp, got := do(t, "GET", c.base()+"/v1/usage/"+id, "", map[string]string{"Authorization": "Bearer sk-bob"}); resp.StatusCode != http.StatusNotFound || !strings.Contains(got, `"code":"usage_not_found"`) {
			t.Errorf("bob read alice's record: %d %s", resp.StatusCode, got)
		}
	}
	if resp, got := do(t, "POST", c.base()+"/v1/usage/x", "", alice); resp.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(got, `"type":"invalid_request_error"`) {
		t.Errorf("POST: %d %s", resp.StatusCode, got)
	}
	if resp, _ := do(t, "GET", c.base()+"/v1/usage/unknown", "", alice); resp.StatusCode != http.StatusNotFound {
		t.Errorf("an unknown id: %d", resp.StatusCode)
	}
}
