package llmstream

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    func(h *Handler) bool
		wantErr string
		line    int // where the error must point, when set
	}{
		{name: "argument form", input: `llm_stream https://api.openai.com`,
			want: func(h *Handler) bool { return h.Upstream == "https://api.openai.com" }},
		{name: "block form", input: `llm_stream {
				upstream https://api.openai.com/v1base
				api_key {env.OPENAI_API_KEY}
				header_up X-A b
				header_up -X-C
				dial_timeout 3s
				first_byte_timeout 1m
				idle_timeout 90s
				heartbeat 10s
				max_request_body 2MB
			}`,
			want: func(h *Handler) bool {
				return h.Upstream == "https://api.openai.com/v1base" && h.APIKey == "{env.OPENAI_API_KEY}" &&
					h.HeaderUp.Set.Get("X-A") == "b" && len(h.HeaderUp.Delete) == 1 &&
					time.Duration(h.DialTimeout) == 3*time.Second && time.Duration(h.FirstByteTimeout) == time.Minute &&
					time.Duration(h.IdleTimeout) == 90*time.Second && time.Duration(h.Heartbeat) == 10*time.Second &&
					h.MaxRequestBody == 2000000
			}},
		{name: "heartbeat off", input: "llm_stream http://x {\n heartbeat off\n}",
			want: func(h *Handler) bool { return h.Heartbeat < 0 }},
		{name: "transport block", input: "llm_stream https://x {\n transport http {\n  versions 1.1\n  forward_proxy_url http://127.0.0.1:3128\n }\n}",
			want: func(h *Handler) bool {
				return strings.Contains(string(h.TransportRaw), `"protocol":"http"`) &&
					strings.Contains(string(h.TransportRaw), `"url":"http://127.0.0.1:3128"`)
			}},
		{name: "upstream blocks", input: `llm_stream {
				upstream https://a {
					api_key k1 k2
					api_key k3
					models gpt-4o o3-*
					rename gpt-4o-fast gpt-4o
					weight 3
					priority 1
					provider azure
					api_version 2025-01-01
					forward_proxy http://127.0.0.1:3128
					header_up X-A b
				}
				upstream https://b
				retries 0
				retry_on connect 429
				retry_backoff 10ms 1s
				unhealthy_after 4 2m
				first_token_timeout 20s
				key_affinity header X-Conversation
			}`,
			want: func(h *Handler) bool {
				a := h.Upstreams[0]
				return len(h.Upstreams) == 2 && h.Upstream == "" && len(a.APIKeys) == 3 && len(a.Models) == 2 &&
					a.Rename["gpt-4o-fast"] == "gpt-4o" && a.Weight == 3 && a.Priority == 1 && a.Provider == "azure" &&
					a.APIVersion == "2025-01-01" && a.ForwardProxy != "" && a.HeaderUp.Set.Get("X-A") == "b" &&
					h.Upstreams[1].URL == "https://b" && *h.Retries == 0 && len(h.RetryOn) == 2 &&
					time.Duration(h.RetryBackoff) == 10*time.Millisecond && time.Duration(h.RetryBackoffMax) == time.Second &&
					h.UnhealthyAfter == 4 && time.Duration(h.UnhealthyCooldown) == 2*time.Minute &&
					time.Duration(h.FirstTokenTimeout) == 20*time.Second && h.KeyAffinity == "header:X-Conversation"
			}},
		{name: "access and limits", input: `llm_stream http://a {
				client_key sk-plain alice
				client_key sha256:` + strings.Repeat("ab", 32) + `
				client_keys_file /etc/caddy/keys
				allow_models gpt-4o* claude-*
				allow_paths /v1/chat/completions
				allow_paths /v1/models
				limit {
					requests 60 1m
					tokens 100000 1h
					concurrent 2
				}
				store redis 127.0.0.1:6379 2 {
					password {env.REDIS_PASSWORD}
					prefix llm:
					fail open
				}
				on_disconnect drain 20s
			}`,
			want: func(h *Handler) bool {
				return len(h.ClientKeys) == 2 && h.ClientKeys[0].Name == "alice" && len(h.ClientKeys[0].SHA256) == 64 &&
					h.ClientKeys[1].Name == "key-abababab" && h.ClientKeysFile == "/etc/caddy/keys" &&
					len(h.AllowModels) == 2 && len(h.AllowPaths) == 2 &&
					h.Limit.Requests == 60 && time.Duration(h.Limit.RequestWindow) == time.Minute &&
					h.Limit.Tokens == 100000 && time.Duration(h.Limit.TokenWindow) == time.Hour && h.Limit.Concurrent == 2 &&
					h.Store.Redis == "127.0.0.1:6379" && h.Store.DB == 2 && h.Store.Password == "{env.REDIS_PASSWORD}" &&
					h.Store.Prefix == "llm:" && h.Store.FailOpen && h.OnDisconnect == "drain" && time.Duration(h.DrainMax) == 20*time.Second
			}},
		{name: "content rules", input: "llm_stream http://a {\n log_prompts redacted\n redact phone email\n deny_words foo bar\n deny_words 违禁词\n deny_words_file /etc/words\n deny_words_scope both\n}",
			want: func(h *Handler) bool {
				return h.LogPrompts == "redacted" && len(h.Redact) == 2 && len(h.DenyWords) == 3 &&
					h.DenyWordsFile == "/etc/words" && h.DenyWordsScope == "both"
			}},
		{name: "bad log_prompts", input: "llm_stream http://a {\n log_prompts some\n}", wantErr: "log_prompts: 'some'", line: 2},
		{name: "bad redact kind", input: "llm_stream http://a {\n redact passport\n}", wantErr: "redact: 'passport'", line: 2},
		{name: "bad deny scope", input: "llm_stream http://a {\n deny_words x\n deny_words_scope all\n}", wantErr: "deny_words_scope: 'all'", line: 3},
		{name: "identity", input: "llm_stream http://a {\n identity {http.auth.user.id}\n}",
			want: func(h *Handler) bool { return h.Identity == "{http.auth.user.id}" }},
		{name: "bad client key digest", input: "llm_stream http://a {\n client_key sha256:abc\n}", wantErr: "client_key: sha256: wants 64 hex digits", line: 2},
		{name: "limit without window", input: "llm_stream http://a {\n limit {\n  requests 5\n }\n}", wantErr: "wrong argument count", line: 3},
		{name: "unknown limit", input: "llm_stream http://a {\n limit {\n  bananas 5 1m\n }\n}", wantErr: "unrecognized limit 'bananas'", line: 3},
		{name: "store forms", input: "llm_stream http://a {\n store redis 10.0.0.1:26379 10.0.0.2:26379 1 {\n  sentinel mymaster\n  sentinel_password {env.SP}\n  username llm\n  password {env.P}\n  tls {\n   ca /etc/ca.pem\n  }\n  prefix x:\n  fail closed\n }\n limit {\n  concurrent 2\n  slot_lease 15s\n }\n}",
			want: func(h *Handler) bool {
				s := h.Store
				return len(s.Addresses) == 2 && s.Redis == "" && s.DB == 1 && s.Sentinel == "mymaster" && s.SentinelPassword == "{env.SP}" && s.Username == "llm" &&
					s.Password == "{env.P}" && s.TLS != nil && s.TLS.CA == "/etc/ca.pem" && !s.FailOpen &&
					time.Duration(h.Limit.SlotLease) == 15*time.Second
			}},
		{name: "store url and bare tls", input: "llm_stream http://a {\n store redis {env.REDIS_URL} {\n  tls\n }\n}",
			want: func(h *Handler) bool {
				return h.Store.Redis == "{env.REDIS_URL}" && h.Store.TLS != nil && h.Store.TLS.CA == ""
			}},
		{name: "store cluster", input: "llm_stream http://a {\n store redis a:7000 b:7001 c:7002\n}",
			want: func(h *Handler) bool { return len(h.Store.Addresses) == 3 && h.Store.DB == 0 }},
		{name: "bad store option", input: "llm_stream http://a {\n store redis a:1 {\n  pasword x\n }\n}", wantErr: "store: unrecognized option 'pasword'", line: 3},
		{name: "bad store", input: "llm_stream http://a {\n store etcd x\n}", wantErr: "store: 'etcd' is not memory or redis", line: 2},
		{name: "bad on_disconnect", input: "llm_stream http://a {\n on_disconnect linger\n}", wantErr: "on_disconnect: 'linger'", line: 2},
		{name: "top-level key with blocks", input: "llm_stream {\n api_key k\n upstream http://a {\n  weight 2\n }\n}", wantErr: "api_key: with upstream blocks, set api_key inside each block"},
		{name: "unknown provider", input: "llm_stream {\n upstream http://a {\n  provider bard\n }\n}", wantErr: "unknown provider 'bard'", line: 3},
		{name: "bad retry_on", input: "llm_stream http://a {\n retry_on 200\n}", wantErr: "retry_on: '200'"},
		{name: "bad weight", input: "llm_stream {\n upstream http://a {\n  weight 0\n }\n}", wantErr: "bad weight value '0'"},
		{name: "missing upstream", input: "llm_stream {\n api_key k\n}", wantErr: "upstream: a base URL is required"},
		{name: "bad url scheme", input: "llm_stream {\n upstream ftp://x\n}", wantErr: "upstream \"ftp://x\": scheme must be http or https", line: 2},
		{name: "url without host", input: "llm_stream http://", wantErr: "missing host"},
		{name: "negative duration", input: "llm_stream http://x {\n\n idle_timeout -5s\n}", wantErr: "duration must not be negative", line: 3},
		{name: "bad duration", input: "llm_stream http://x {\n dial_timeout soon\n}", wantErr: "bad duration value 'soon'", line: 2},
		{name: "bad size", input: "llm_stream http://x {\n max_request_body lots\n}", wantErr: "bad size value 'lots'"},
		{name: "unknown subdirective", input: "llm_stream http://x {\n\n\n stream_faster yes\n}", wantErr: "unrecognized subdirective 'stream_faster'", line: 4},
		{name: "repeated option", input: "llm_stream http://x {\n api_key a\n api_key b\n}", wantErr: "api_key already specified", line: 3},
		{name: "heartbeat zero", input: "llm_stream http://x {\n heartbeat 0s\n}", wantErr: "use 'off'"},
		{name: "extra argument", input: "llm_stream http://x http://y", wantErr: "wrong argument count"},
		{name: "clients", input: "llm_stream http://x {\n stop_endpoint /v1/stop\n smooth 4 30ms\n websocket /v1/ws {\n  api_path /v1/messages\n  default_model mock-1\n  ping_interval off\n  origins chat.example.com *.example.org\n }\n}",
			want: func(h *Handler) bool {
				w := h.WebSocket
				return h.StopEndpoint == "/v1/stop" && h.Smooth.MaxChars == 4 && time.Duration(h.Smooth.Interval) == 30*time.Millisecond &&
					w.Path == "/v1/ws" && w.APIPath == "/v1/messages" && w.DefaultModel == "mock-1" && w.PingInterval < 0 &&
					len(w.OriginPatterns) == 2
			}},
		{name: "websocket on any path", input: "llm_stream http://x {\n websocket\n}",
			want: func(h *Handler) bool { return h.WebSocket != nil && h.WebSocket.Path == "" }},
		{name: "bad smooth chars", input: "llm_stream http://x {\n smooth many 30ms\n}", wantErr: "smooth: max_chars 'many'", line: 2},
		{name: "smooth without interval", input: "llm_stream http://x {\n smooth 4\n}", wantErr: "wrong argument count", line: 2},
		{name: "zero smooth interval", input: "llm_stream http://x {\n smooth 4 0s\n}", wantErr: "smooth: interval must be positive", line: 2},
		{name: "stop_endpoint not a path", input: "llm_stream http://x {\n stop_endpoint stop/\n}", wantErr: "stop_endpoint: must be a path such as /v1/stop", line: 2},
		{name: "websocket path", input: "llm_stream http://x {\n websocket ws\n}", wantErr: "websocket: the path must start with /", line: 2},
		{name: "websocket option", input: "llm_stream http://x {\n websocket {\n  compress on\n }\n}", wantErr: "websocket: unknown option 'compress'", line: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := new(Handler)
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got error %v, want one containing %q", err, tc.wantErr)
				}
				if at := fmt.Sprintf("at Testfile:%d", tc.line); tc.line > 0 && !strings.HasSuffix(err.Error(), at) {
					t.Fatalf("got error %v, want it to end %q", err, at)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !tc.want(h) {
				b, _ := json.Marshal(h)
				t.Fatalf("unexpected config: %s", b)
			}
		})
	}
}

// TestAdapt compares `caddy adapt` output with golden files: a Caddyfile,
// a line of dashes, then the JSON.
func TestAdapt(t *testing.T) {
	files, _ := filepath.Glob("testdata/adapt/*.caddyfiletest")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			in, want, ok := strings.Cut(string(b), "----------")
			if !ok {
				t.Fatal("golden file lacks the ---------- separator")
			}
			if !caddytest.CompareAdapt(t, f, in, "caddyfile", strings.TrimSpace(want)) {
				t.Fatal("adapted JSON differs from the golden file")
			}
		})
	}
}

// TestJSONConfigValidation checks that bad JSON configs fail at load, not
// at the first request.
func TestJSONConfigValidation(t *testing.T) {
	tests := []struct{ name, json, wantErr string }{
		{"missing upstream", `{}`, "upstream: a base URL is required"},
		{"bad scheme", `{"upstream":"unix:///x"}`, "scheme must be http or https"},
		{"negative timeout", `{"upstream":"http://x","idle_timeout":-1}`, "idle_timeout: must not be negative"},
		{"unknown placeholder", `{"upstream":"http://x","api_key":"{nope.x}"}`, "unresolvable placeholder"},
		{"unknown transport", `{"upstream":"http://x","transport":{"protocol":"carrier_pigeon"}}`, "loading transport"},
		{"cache without ttl", `{"upstream":"http://x","cache":{}}`, "cache: a positive ttl is required"},
		{"cluster with a database", `{"upstream":"http://x","store":{"addresses":["a:1","b:2"],"db":3}}`, "a Redis Cluster has only database 0"},
		{"bad redis url", `{"upstream":"http://x","store":{"redis":"redis://user:pw-leak@[::1"}}`, "address 1 is not a valid"},
		{"short slot lease", `{"upstream":"http://x","limit":{"concurrent":1,"slot_lease":100000000}}`, "slot_lease must be at least 1s"},
		{"cache in redis without a server", `{"upstream":"http://x","cache":{"ttl":60000000000,"store":"redis"}}`, "needs the `store redis <address>` setting"},
		{"cache scope", `{"upstream":"http://x","cache":{"ttl":60000000000,"scope":"all"}}`, "scope must be identity or global"},
		{"smooth without interval", `{"upstream":"http://x","smooth":{"max_chars":4}}`, "smooth: interval must be positive"},
		{"smooth without size", `{"upstream":"http://x","smooth":{"interval":1000000}}`, "smooth: max_chars must be positive"},
		{"stop_endpoint wildcard", `{"upstream":"http://x","stop_endpoint":"/v1/stop/*"}`, "stop_endpoint: must be a path"},
		{"websocket on its api path", `{"upstream":"http://x","websocket":{"path":"/v1/chat/completions"}}`, "must differ from api_path"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
			defer cancel()
			var h Handler
			if err := json.Unmarshal([]byte(tc.json), &h); err != nil {
				t.Fatal(err)
			}
			err := h.Provision(ctx)
			if err == nil {
				err = h.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "pw-leak") {
				t.Fatalf("the error quotes a secret: %v", err)
			}
		})
	}
}

// A semantic check is made once: a Caddyfile and the JSON it stands for
// are refused with the same message (the Caddyfile's with its line).
func TestCaddyfileAndJSONRefuseAlike(t *testing.T) {
	for _, tc := range []struct{ caddyfile, json, want string }{
		{"llm_stream http://a {\n stop_endpoint stop/\n}", `{"upstream":"http://a","stop_endpoint":"stop/"}`, "stop_endpoint: must be a path"},
		{"llm_stream http://a {\n websocket ws\n}", `{"upstream":"http://a","websocket":{"path":"ws"}}`, "websocket: the path must start with /"},
		{"llm_stream http://a {\n cache 0s\n}", `{"upstream":"http://a","cache":{"ttl":0}}`, "cache: a positive ttl is required"},
		{"llm_stream http://a {\n smooth 4 0s\n}", `{"upstream":"http://a","smooth":{"max_chars":4}}`, "smooth: interval must be positive"},
		{"llm_stream {\n upstream http://a {\n  provider bard\n }\n}", `{"upstreams":[{"url":"http://a","provider":"bard"}]}`, "unknown provider 'bard'"},
		{"llm_stream {\n api_key k\n upstream http://a {\n  weight 2\n }\n}", `{"api_key":"k","upstreams":[{"url":"http://a","weight":2}]}`, "api_key: with upstream blocks, set api_key inside each block"},
		{"llm_stream {\n api_key k\n}", `{"api_key":"k"}`, "upstream: a base URL is required"},
	} {
		err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.caddyfile))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Caddyfile %q: got %v, want %q", tc.caddyfile, err, tc.want)
		}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		var h Handler
		if err := json.Unmarshal([]byte(tc.json), &h); err != nil {
			t.Fatal(err)
		}
		err = h.Provision(ctx)
		if err == nil {
			err = h.Validate()
		}
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("JSON %s: got %v, want %q", tc.json, err, tc.want)
		}
	}
}

// The syntax comment of UnmarshalCaddyfile, which users read as the
// directive's reference, names every subdirective the parser accepts.
func TestSyntaxCommentListsEverySubdirective(t *testing.T) {
	src, err := os.ReadFile("caddyfile.go")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(src[:strings.Index(string(src), "func (h *Handler) UnmarshalCaddyfile")])
	for name := range subdirectives {
		if !regexp.MustCompile(`(?m)^//\t    ` + name + `\b`).MatchString(doc) {
			t.Errorf("the syntax comment does not list %s", name)
		}
	}
	for _, name := range []string{"upstream", "requests", "tokens", "spend", "concurrent", "slot_lease"} {
		if !regexp.MustCompile(`(?m)^//\t\s+` + name + `\b`).MatchString(doc) {
			t.Errorf("the syntax comment does not list %s", name)
		}
	}
}
