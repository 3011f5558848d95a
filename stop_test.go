package llmstream

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redistest"
)

// stopAt posts a stop for id to base+endpoint and returns the status and
// body.
func stopAt(t testing.TB, url string, hdr map[string]string) (int, string) {
	t.Helper()
	resp, b := do(t, "POST", url, "", hdr)
	if resp.Header.Get("X-Request-Id") == "" {
		t.Errorf("the stop answer has no X-Request-Id")
	}
	return resp.StatusCode, b
}

// startedStream posts a streaming request and waits for n content events.
// It returns the request id and the rest of the events.
func startedStream(t testing.TB, url string, hdr map[string]string, n int) (string, *http.Response, <-chan string) {
	t.Helper()
	resp := send(t, "POST", url, `{"model":"mock-1","stream":true,"messages":[{"role":"user","content":"tell me"}]}`, hdr)
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	id := resp.Header.Get("X-Request-Id")
	if id == "" {
		t.Fatal("no X-Request-Id on the stream")
	}
	events := readEvents(bufio.NewReader(resp.Body))
	for seen := 0; seen < n; {
		ev, ok := <-events
		if !ok {
			t.Fatalf("the stream ended after %d content events", seen)
		}
		if strings.Contains(ev, `"content":"`) && !strings.Contains(ev, `"content":""`) {
			seen++
		}
	}
	return id, resp, events
}

// restOf collects the remaining events, failing if the stream does not end
// within d.
func restOf(t testing.TB, events <-chan string, d time.Duration) []string {
	t.Helper()
	var rest []string
	timeout := time.After(d)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return rest
			}
			rest = append(rest, ev)
		case <-timeout:
			t.Fatalf("the stream did not end within %s after the stop; got %q", d, rest)
		}
	}
}

// waitCancelled returns how long after since the upstream noticed its
// request was cancelled.
func waitCancelled(t testing.TB, up *fakeUpstream, since time.Time) time.Duration {
	t.Helper()
	select {
	case at := <-up.cancelledAt:
		return at.Sub(since)
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was not cancelled")
		return 0
	}
}

func TestStopEndpointStopsGeneration(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 500, 10*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		stop_endpoint /v1/stop
	}`)
	id, resp, events := startedStream(t, c.base()+"/v1/chat/completions", nil, 3)
	defer resp.Body.Close()

	sent := time.Now()
	status, body := stopAt(t, c.base()+"/v1/stop/"+id, nil)
	if status != http.StatusOK {
		t.Fatalf("stop: %d %s", status, body)
	}
	var ack struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Stopped bool   `json:"stopped"`
	}
	if err := json.Unmarshal([]byte(body), &ack); err != nil || ack.ID != id || !ack.Stopped || ack.Object != "generation.stop" {
		t.Fatalf("stop answer %s", body)
	}
	took := waitCancelled(t, up, sent)
	t.Logf("upstream cancelled %s after the stop was sent", took)
	if took > 100*time.Millisecond {
		t.Errorf("the upstream was cancelled %s after the stop, want within 100ms", took)
	}
	rest := restOf(t, events, 2*time.Second)
	if len(rest) == 0 || rest[len(rest)-1] != "data: [DONE]\n\n" {
		t.Fatalf("the stopped stream does not end with data: [DONE]: %q", rest)
	}
	for _, ev := range rest {
		if strings.Contains(ev, `"error"`) {
			t.Errorf("a stopped stream ends cleanly, got %q", ev)
		}
	}
	// Usage is still recorded: the request's line says it was stopped, with
	// the tokens relayed as an estimate.
	logs := c.waitLog(`"request_id":"`+id+`"`, `"stopped":true`)
	line := regexp.MustCompile(`.*"request_id":"` + id + `".*`).FindString(logs)
	for _, want := range []string{`"usage_status":"estimated"`, `"status":200`} {
		if !strings.Contains(line, want) {
			t.Errorf("usage line lacks %s: %s", want, line)
		}
	}
	if regexp.MustCompile(`"completion_tokens":[0-2],`).MatchString(line) {
		t.Errorf("the estimate should count the events relayed (at least 3): %s", line)
	}
	if up.finished.Load() != 0 {
		t.Errorf("the upstream answer ran to its end")
	}

	// The same id again: nothing to stop.
	if status, body := stopAt(t, c.base()+"/v1/stop/"+id, nil); status != http.StatusNotFound || !strings.Contains(body, `"code":"generation_not_found"`) {
		t.Errorf("second stop: %d %s", status, body)
	}
}

func TestStopEndpointAnswers(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 500, 10*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		stop_endpoint /v1/stop
		client_key sk-alice alice
		client_key sk-bob bob
	}`)
	alice := map[string]string{"Authorization": "Bearer sk-alice"}
	bob := map[string]string{"Authorization": "Bearer sk-bob"}

	t.Run("every answer carries an id, errors included", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			hdr  map[string]string
			path string
			code int
		}{
			{"no key", nil, "/v1/chat/completions", 401},
			{"unknown path", alice, "/v1/files", 404},
		} {
			resp := send(t, "POST", c.base()+tc.path, streamBody, tc.hdr)
			resp.Body.Close()
			if resp.StatusCode != tc.code || len(resp.Header.Get("X-Request-Id")) < 16 {
				t.Errorf("%s: status %d, X-Request-Id %q", tc.name, resp.StatusCode, resp.Header.Get("X-Request-Id"))
			}
		}
	})
	t.Run("bad stop requests are refused", func(t *testing.T) {
		if resp, _ := do(t, "GET", c.base()+"/v1/stop/x", "", map[string]string{"Authorization": "Bearer sk-alice"}); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("GET on the stop endpoint: %d", resp.StatusCode)
		}
		if status, _ := stopAt(t, c.base()+"/v1/stop/", alice); status != http.StatusBadRequest {
			t.Errorf("stop without an id: %d", status)
		}
	})

	t.Run("only the owner stops a generation", func(t *testing.T) {
		id, resp, events := startedStream(t, c.base()+"/v1/chat/completions", alice, 2)
		defer resp.Body.Close()
		if status, body := stopAt(t, c.base()+"/v1/stop/"+id, nil); status != http.StatusUnauthorized {
			t.Errorf("stop without a key: %d %s", status, body)
		}
		if status, body := stopAt(t, c.base()+"/v1/stop/"+id, bob); status != http.StatusNotFound {
			t.Errorf("bob stopped alice's generation: %d %s", status, body)
		}
		if status, body := stopAt(t, c.base()+"/v1/stop/"+id, alice); status != http.StatusOK {
			t.Fatalf("alice could not stop her generation: %d %s", status, body)
		}
		if rest := restOf(t, events, 2*time.Second); rest[len(rest)-1] != "data: [DONE]\n\n" {
			t.Errorf("stream end: %q", rest)
		}
	})
}

// With on_disconnect drain, a client that leaves does not stop the upstream
// (its usage is read to the end); a stop does.
func TestStopWhileDrainConfigured(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 500, 10*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		stop_endpoint /v1/stop
		on_disconnect drain
	}`)
	id, resp, events := startedStream(t, c.base()+"/v1/chat/completions", nil, 2)
	defer resp.Body.Close()
	sent := time.Now()
	if status, body := stopAt(t, c.base()+"/v1/stop/"+id, nil); status != http.StatusOK {
		t.Fatalf("stop: %d %s", status, body)
	}
	if took := waitCancelled(t, up, sent); took > 100*time.Millisecond {
		t.Errorf("cancelled %s after the stop, want within 100ms", took)
	}
	if rest := restOf(t, events, 2*time.Second); rest[len(rest)-1] != "data: [DONE]\n\n" {
		t.Errorf("stream end: %q", rest)
	}
}

func TestStopAcrossInstancesThroughRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	rds := redistest.Start(t)
	up := newUpstream(t, modelAnswers(t, 500, 10*time.Millisecond))
	directives := `llm_stream ` + up.URL + ` {
		stop_endpoint /v1/stop
		store redis ` + rds.Addr + `
	}`
	b := startProcess(t, directives)
	a := startCaddy(t, directives)

	id, resp, events := startedStream(t, a.base()+"/v1/chat/completions", nil, 3)
	defer resp.Body.Close()
	sent := time.Now()
	status, body := stopAt(t, b+"/v1/stop/"+id, nil)
	if status != http.StatusOK || !strings.Contains(body, `"stopped":true`) {
		t.Fatalf("stop through the other instance: %d %s", status, body)
	}
	took := waitCancelled(t, up, sent)
	t.Logf("upstream cancelled %s after the stop was sent to the other instance", took)
	if took > 100*time.Millisecond {
		t.Errorf("cancelled %s after the stop, want within 100ms", took)
	}
	if rest := restOf(t, events, 2*time.Second); rest[len(rest)-1] != "data: [DONE]\n\n" {
		t.Errorf("stream end: %q", rest)
	}
	a.waitLog(`"request_id":"`+id+`"`, `"stopped":true`)

	// An id no instance runs: 404 once no instance answered.
	if status, body := stopAt(t, b+"/v1/stop/"+id, nil); status != http.StatusNotFound {
		t.Errorf("unknown id: %d %s", status, body)
	}
}

// A stop ends only the stopper's generation: requests that joined the same
// cache flight keep receiving their answer, whole, and the upstream is not
// cancelled for them.
func TestStopOnOneOfTwoJoinedCacheRequests(t *testing.T) {
	up := newUpstream(t, modelAnswers(t, 40, 15*time.Millisecond))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		stop_endpoint /v1/stop
		cache 1m {
			scope global
		}
	}`)
	q := `{"model":"mock-1","temperature":0,"stream":true,"messages":[{"role":"user","content":"tell me"}]}`
	leader := send(t, "POST", c.base()+"/v1/chat/completions", q, nil)
	defer leader.Body.Close()
	leaderEvents := readEvents(bufio.NewReader(leader.Body))
	<-leaderEvents // the answer started: a request now joins the flight
	follower := send(t, "POST", c.base()+"/v1/chat/completions", q, nil)
	defer follower.Body.Close()
	followerEvents := readEvents(bufio.NewReader(follower.Body))
	<-followerEvents

	if status, body := stopAt(t, c.base()+"/v1/stop/"+leader.Header.Get("X-Request-Id"), nil); status != http.StatusOK {
		t.Fatalf("stop: %d %s", status, body)
	}
	rest := restOf(t, leaderEvents, time.Second)
	if len(rest) == 0 || rest[len(rest)-1] != "data: [DONE]\n\n" {
		t.Fatalf("the stopped stream does not end with [DONE] at once: %q", rest)
	}
	if n := strings.Count(strings.Join(rest, ""), `"content":"`); n > 5 {
		t.Errorf("the stopped client got %d more content events, want its answer ended at once", n)
	}
	got := restOf(t, followerEvents, 5*time.Second)
	all := strings.Join(got, "")
	if !strings.HasSuffix(all, "data: [DONE]\n\n") || strings.Contains(all, `"error"`) {
		t.Fatalf("the joined request's answer broke: %q", all)
	}
	if up.calls.Load() != 1 || up.finished.Load() != 1 {
		t.Fatalf("upstream calls %d, finished %d: want one call that ran to its end for the joined request", up.calls.Load(), up.finished.Load())
	}
	// Every token reached the joined request.
	contents := strings.Count(all, `"content":"`) + 1 // the first event was read above
	if contents < 40 {
		t.Errorf("the joined request got %d content events, want all 40", contents)
	}
}
