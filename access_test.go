package llmstream

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

const chatBody = `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`

func TestClientKeys(t *testing.T) {
	up := newUpstream(t)
	hashed := sha256.Sum256([]byte("sk-client-hashed"))
	dir := t.TempDir()
	keysFile := filepath.Join(dir, "keys")
	os.WriteFile(keysFile, []byte("# team keys\nsk-file-key-1 alice\n"), 0o600)
	cfg := `llm_stream ` + up.URL + ` {
		api_key ` + testKey + `
		client_key sk-client-plain bob
		client_key sha256:` + hex.EncodeToString(hashed[:]) + ` carol
		client_keys_file ` + keysFile + `
	}`
	c := startCaddy(t, cfg)
	url := c.base() + "/v1/chat/completions"
	for name, tc := range map[string]struct {
		hdr  map[string]string
		want int
	}{
		"no credential":        {nil, 401},
		"wrong key":            {map[string]string{"Authorization": "Bearer sk-nope"}, 401},
		"the upstream key":     {map[string]string{"Authorization": "Bearer " + testKey}, 401},
		"bearer":               {map[string]string{"Authorization": "Bearer sk-client-plain"}, 200},
		"x-api-key":            {map[string]string{"X-Api-Key": "sk-client-plain"}, 200},
		"stored as sha256":     {map[string]string{"Authorization": "Bearer sk-client-hashed"}, 200},
		"from the keys file":   {map[string]string{"X-Api-Key": "sk-file-key-1"}, 200},
		"basic auth is no key": {map[string]string{"Authorization": "Basic c2stY2xpZW50LXBsYWluOg=="}, 401},
	} {
		t.Run(name, func(t *testing.T) {
			before := up.calls.Load()
			resp, body := do(t, "POST", url, chatBody, tc.hdr)
			if resp.StatusCode != tc.want {
				t.Fatalf("got %d %s, want %d", resp.StatusCode, body, tc.want)
			}
			if tc.want == 401 {
				if !strings.Contains(body, `"code":"invalid_api_key"`) || up.calls.Load() != before {
					t.Fatalf("401 body %s, upstream calls %d→%d", body, before, up.calls.Load())
				}
			}
		})
	}
	for _, r := range up.requests() {
		if a := r.Header.Get("Authorization"); a != "Bearer "+testKey {
			t.Errorf("upstream got Authorization %q", a)
		}
	}

	// The keys file is read again on reload.
	os.WriteFile(keysFile, []byte("sk-file-key-2 alice\n"), 0o600)
	c.load(cfg)
	if resp, _ := do(t, "POST", url, chatBody, map[string]string{"X-Api-Key": "sk-file-key-1"}); resp.StatusCode != 401 {
		t.Errorf("old file key after reload: %d, want 401", resp.StatusCode)
	}
	if resp, _ := do(t, "POST", url, chatBody, map[string]string{"X-Api-Key": "sk-file-key-2"}); resp.StatusCode != 200 {
		t.Errorf("new file key after reload: %d, want 200", resp.StatusCode)
	}
	// Only digests are in the adapted config.
	if cfgJSON := string(loadConfig(t, c.caddyfileFor(cfg))); strings.Contains(cfgJSON, "sk-client-plain") {
		t.Error("a client key in clear in the JSON config")
	}
}

func TestIdentityFromBasicAuth(t *testing.T) {
	up := newUpstream(t)
	hash, _ := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	c := startCaddy(t, `
	basic_auth {
		dora `+string(hash)+`
	}
	llm_stream `+up.URL+` {
		identity {http.auth.user.id}
		limit {
			requests 1 1m
		}
	}`)
	dora := map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("dora:secret"))}
	resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, dora)
	if resp.StatusCode != 200 {
		t.Fatalf("got %d", resp.StatusCode)
	}
	c.waitLog(`"identity":"dora"`)
	resp, _ = do(t, "POST", c.base()+"/v1/chat/completions", chatBody, dora)
	if resp.StatusCode != 429 {
		t.Fatalf("second request of dora: %d, want 429 (limit per identity)", resp.StatusCode)
	}
}

func TestAllowedPathsAndModels(t *testing.T) {
	up := newUpstream(t)
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_models gpt-4o* claude-3-haiku
	}`)
	for _, tc := range []struct {
		method, path, body string
		status             int
		code               string
	}{
		{"GET", "/v1/files", "", 404, "unknown_url"},
		{"POST", "/v1/fine_tuning/jobs", `{"model":"gpt-4o"}`, 404, "unknown_url"},
		{"GET", "/v1/organization/users", "", 404, "unknown_url"},
		{"POST", "/v1/chat/completions", `{"model":"o1-pro"}`, 403, "model_not_allowed"},
	} {
		resp, body := do(t, tc.method, c.base()+tc.path, tc.body, nil)
		if resp.StatusCode != tc.status || !strings.Contains(body, `"code":"`+tc.code+`"`) {
			t.Errorf("%s %s: got %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
		}
	}
	if up.calls.Load() != 0 {
		t.Fatalf("the upstream was called %d times for refused requests", up.calls.Load())
	}
	if resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"gpt-4o-mini"}`, nil); resp.StatusCode != 200 {
		t.Fatalf("allowed model: %d", resp.StatusCode)
	}
	if !strings.Contains(c.logs(), "anyone who reaches this endpoint") {
		t.Error("no warning that the endpoint is open")
	}
}

// usageStream serves an OpenAI stream with the usage chunk when asked.
func usageStream(t *testing.T, bodies *[]string, mu *sync.Mutex) *fakeUpstream {
	srv := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		*bodies = append(*bodies, string(b))
		mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		withUsage := strings.Contains(string(b), `"include_usage":true`)
		u := ""
		if withUsage {
			u = `,"usage":null`
		}
		for i := 0; i < 3; i++ {
			flushWrite(w, fmt.Sprintf("data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"t%d\"}}]%s}\n\n", i, u))
		}
		if withUsage {
			flushWrite(w, "data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":20,\"total_tokens\":60}}\n\n")
		}
		flushWrite(w, "data: [DONE]\n\n")
	}))
	return srv
}

func TestExactStreamUsage(t *testing.T) {
	var bodies []string
	var mu sync.Mutex
	up := usageStream(t, &bodies, &mu)
	c := startCaddy(t, `llm_stream `+up.URL+` {
		client_key sk-usage-client meter
	}`)
	auth := map[string]string{"Authorization": "Bearer sk-usage-client"}

	// A client that did not ask: the upstream is asked, the client does not see the chunk.
	plain := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	_, got := do(t, "POST", c.base()+"/v1/chat/completions", plain, auth)
	if want := `{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`; bodies[0] != want {
		t.Fatalf("upstream body:\n got %s\nwant %s", bodies[0], want)
	}
	if strings.Contains(got, `"choices":[]`) || !strings.HasSuffix(got, "data: [DONE]\n\n") || strings.Count(got, "data: ") != 4 {
		t.Fatalf("client that did not ask got %q", got)
	}
	// A client that asked: body unchanged, chunk passed on.
	asked := `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}`
	_, got = do(t, "POST", c.base()+"/v1/chat/completions", asked, auth)
	if bodies[1] != asked || !strings.Contains(got, `"choices":[],"usage":{"prompt_tokens":40`) {
		t.Fatalf("client that asked: upstream %s, client %q", bodies[1], got)
	}
	// Merged into an existing stream_options object.
	other := `{"model":"gpt-4o","stream":true,"stream_options": {"x":1},"messages":[]}`
	do(t, "POST", c.base()+"/v1/chat/completions", other, auth)
	if want := `{"model":"gpt-4o","stream":true,"stream_options": {"include_usage":true,"x":1},"messages":[]}`; bodies[2] != want {
		t.Fatalf("merge: got %s", bodies[2])
	}
	exact := `"prompt_tokens":40,"completion_tokens":20,"total_tokens":60,"usage_status":"exact"`
	logs := c.waitLog(exact)
	for deadline := time.Now().Add(3 * time.Second); strings.Count(logs, exact) < 3 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		logs = c.logs()
	}
	if n := strings.Count(logs, exact); n != 3 {
		t.Fatalf("%d exact usage records, want 3:\n%s", n, logs)
	}
	if !strings.Contains(logs, `"identity":"meter"`) {
		t.Error("usage record lacks the identity")
	}
}

func TestUsageFromJSONAndAnthropicThroughMock(t *testing.T) {
	mockPort := freePort(t)
	c := startCaddy(t, fmt.Sprintf(`log
	llm_stream http://127.0.0.1:%d
	log_append llm_prompt {llm.usage.prompt_tokens}
	log_append llm_completion {llm.usage.completion_tokens}
	log_append llm_status {llm.usage.status}
}
http://127.0.0.1:%d {
	llm_mock {
		text "a b c d e"
		interval 1ms
	}`, mockPort, mockPort))
	do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","max_tokens":3,"messages":[{"role":"user","content":"x"}]}`, nil)
	do(t, "POST", c.base()+"/v1/messages", `{"model":"claude-3","stream":true,"max_tokens":4,"messages":[{"role":"user","content":"x"}]}`, nil)
	logs := c.waitLog(`"llm_completion":4`)
	if !strings.Contains(logs, `"completion_tokens":3,"total_tokens":8,"usage_status":"exact"`) {
		t.Errorf("JSON usage not recorded exactly:\n%s", logs)
	}
	if !strings.Contains(logs, `"prompt_tokens":5,"completion_tokens":4,"total_tokens":9,"usage_status":"exact"`) {
		t.Errorf("Anthropic stream usage not recorded exactly:\n%s", logs)
	}
	if !strings.Contains(logs, `"llm_status":"exact","llm_completion":4,"llm_prompt":5`) {
		t.Errorf("placeholders not in the access log:\n%s", logs[max(0, len(logs)-3000):])
	}
}

// GET /v1/models lists only what allow_models lets callers use: the
// handler's own list, and an upstream's list passed through.
func TestModelListUnderAllowModels(t *testing.T) {
	up := newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		body := `{"object":"list","data":[{"id":"gpt-4o","object":"model"},{"id":"gpt-4o-mini","object":"model"},{"id":"o1-pro","object":"model"},{"id":"dall-e-3","object":"model"}]}`
		if strings.HasPrefix(r.URL.Path, "/v1beta") {
			body = `{"models":[{"name":"models/gemini-2.5-pro"},{"name":"models/gemini-2.5-flash"}]}`
		}
		// The upstream's length is wrong once the list is filtered: the
		// client must get the filtered body's.
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	}))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		allow_paths /v1/models /v1beta/models
		allow_models gpt-4o* gemini-2.5-flash
	}`)
	for _, tc := range []struct{ path, want, not string }{
		{"/v1/models", `"gpt-4o-mini"`, "o1-pro"},
		{"/v1beta/models", `"models/gemini-2.5-flash"`, "gemini-2.5-pro"},
	} {
		resp, body := do(t, "GET", c.base()+tc.path, "", nil)
		if resp.StatusCode != 200 || !strings.Contains(body, tc.want) || strings.Contains(body, tc.not) || strings.Contains(body, "dall-e") {
			t.Errorf("GET %s: %d %s", tc.path, resp.StatusCode, body)
		}
	}
	// The handler's own list (from upstream models and renames).
	c.load(`llm_stream {
		upstream ` + up.URL + ` {
			models gpt-4o gpt-4o-mini o1-pro
		}
		allow_models gpt-4o*
	}`)
	resp, body := do(t, "GET", c.base()+"/v1/models", "", nil)
	if resp.StatusCode != 200 || !strings.Contains(body, `"gpt-4o-mini"`) || strings.Contains(body, "o1-pro") {
		t.Errorf("the handler's own list: %d %s", resp.StatusCode, body)
	}
}
