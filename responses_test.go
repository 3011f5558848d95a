package llmstream

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// responsesAPI is a set of Responses API upstreams that remember which of
// them, and which key, produced each response, and where each follow-up
// (previous_response_id) arrived.
type responsesAPI struct {
	ups      []*fakeUpstream
	seq      atomic.Int64
	mu       sync.Mutex
	producer map[string]string // response id → "upstream key"
	follower map[string]string // previous_response_id → "upstream key" it reached
}

func newResponsesAPI(t *testing.T, n int) *responsesAPI {
	api := &responsesAPI{producer: map[string]string{}, follower: map[string]string{}}
	for i := range n {
		tag := fmt.Sprint("up", i)
		api.ups = append(api.ups, newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
			var req struct {
				Stream   bool   `json:"stream"`
				Previous string `json:"previous_response_id"`
			}
			json.NewDecoder(r.Body).Decode(&req)
			where := tag + " " + r.Header.Get("Authorization")
			id := fmt.Sprintf("resp_%s_%d", tag, api.seq.Add(1))
			api.mu.Lock()
			api.producer[id] = where
			if req.Previous != "" {
				api.follower[req.Previous] = where
			}
			api.mu.Unlock()
			w.Header().Set("x-request-id", "req_"+id) // providers send their own request id too
			if req.Stream {
				w.Header().Set("Content-Type", "text/event-stream")
				flushWrite(w, "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\""+id+"\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[],\"usage\":null}}\n\n")
				flushWrite(w, "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n")
				flushWrite(w, "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\""+id+"\",\"object\":\"response\",\"status\":\"completed\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1,\"total_tokens\":6}}}\n\n")
				return
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"`+id+`","object":"response","status":"completed","output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":5,"output_tokens":1,"total_tokens":6}}`)
		})))
	}
	return api
}

// upstreams is the llm_stream configuration of the set: every upstream
// with three keys.
func (api *responsesAPI) upstreams() string {
	var b strings.Builder
	for i, u := range api.ups {
		fmt.Fprintf(&b, "upstream %s {\n\t\t\tapi_key sk-%d-a sk-%d-b sk-%d-c\n\t\t}\n\t\t", u.URL, i, i, i)
	}
	return b.String()
}

// ask sends a Responses API request and returns the response id.
func (api *responsesAPI) ask(t *testing.T, base, previous string, stream bool) string {
	t.Helper()
	body := `{"model":"gpt-5","input":"hi","stream":` + fmt.Sprint(stream)
	if previous != "" {
		body += `,"previous_response_id":"` + previous + `"`
	}
	resp, got := do(t, "POST", base+"/v1/responses", body+"}", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	i := strings.Index(got, `"id":"resp_`)
	if i < 0 {
		t.Fatalf("no response id in %s", got)
	}
	id := got[i+6:]
	return id[:strings.IndexByte(id, '"')]
}

// check requires every follow-up to have reached its response's producer.
func (api *responsesAPI) check(t *testing.T, ids []string) {
	t.Helper()
	api.mu.Lock()
	defer api.mu.Unlock()
	for _, id := range ids {
		if api.follower[id] != api.producer[id] {
			t.Errorf("the follow-up of %s (made by %s) reached %s", id, api.producer[id], api.follower[id])
		}
	}
}

// A follow-up with previous_response_id sent to another instance sharing
// Redis reaches the upstream and key of the first response, streamed or
// not, also after the first instance was killed and started again; an
// unknown id is routed as usual.
func TestResponsesFollowUpsAcrossInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	rds := redistest.Start(t)
	api := newResponsesAPI(t, 2)
	directives := `llm_stream {
		` + api.upstreams() + `
		store redis ` + rds.Addr + `
	}`
	first, proc := startProcessCmd(t, directives)
	second := startCaddy(t, directives)
	var ids []string
	for i := range 12 {
		ids = append(ids, api.ask(t, first, "", i%2 == 0))
	}
	for i, id := range ids {
		api.ask(t, second.base(), id, i%3 == 0)
	}
	api.check(t, ids)
	api.mu.Lock()
	spread := map[string]bool{}
	for _, id := range ids {
		spread[api.producer[id]] = true
	}
	api.mu.Unlock()
	if len(spread) < 3 {
		t.Fatalf("12 first requests reached only %v: the test needs them spread", spread)
	}

	// The first instance restarts: what it learnt is in Redis.
	proc.Process.Kill()
	proc.Wait()
	again, _ := startProcessCmd(t, directives)
	var later []string
	for _, id := range ids[:6] {
		later = append(later, api.ask(t, again, id, false))
	}
	api.check(t, ids[:6])
	for _, id := range later {
		api.ask(t, second.base(), id, true) // follow-ups of follow-ups
	}
	api.check(t, later)

	if id := api.ask(t, second.base(), "resp_never_seen", false); id == "" {
		t.Fatal("an unknown previous response was not answered")
	}
}

// Without Redis, one instance remembers in memory, across a reload.
func TestResponsesFollowUpsInMemory(t *testing.T) {
	api := newResponsesAPI(t, 2)
	directives := `llm_stream {
		` + api.upstreams() + `
	}`
	c := startCaddyAdmin(t, directives)
	var ids []string
	for i := range 8 {
		ids = append(ids, api.ask(t, c.base(), "", i%2 == 1))
	}
	c.reload(directives + "\n")
	for _, id := range ids {
		api.ask(t, c.base(), id, false)
	}
	api.check(t, ids)
}
