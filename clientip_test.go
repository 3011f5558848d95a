package llmstream

import (
	"net/http"
	"strings"
	"testing"
)

// Behind a load balancer every caller comes from the balancer's address:
// anonymous callers must be told apart by Caddy's client IP, which believes
// X-Forwarded-For only from trusted proxies.
func TestAnonymousLimitsUseCaddysClientIP(t *testing.T) {
	for _, tc := range []struct {
		name    string
		trusted string
		// whether two callers behind the proxy get limits of their own
		separate bool
	}{
		{"trusted proxy", "127.0.0.1/8", true},
		{"untrusted peer", "10.0.0.0/8", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			c := startCaddyWith(t, `servers {
		trusted_proxies static `+tc.trusted+`
	}`, `llm_stream `+up.URL+` {
		limit {
			requests 1 1m
		}
	}`)
			ask := func(xff string) int {
				resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", chatBody, map[string]string{"X-Forwarded-For": xff})
				return resp.StatusCode
			}
			if got := ask("203.0.113.1"); got != http.StatusOK {
				t.Fatalf("first caller: %d", got)
			}
			second := ask("203.0.113.2")
			if tc.separate && second != http.StatusOK {
				t.Errorf("a second caller behind the trusted proxy got %d, want a limit of its own", second)
			}
			if !tc.separate && second != http.StatusTooManyRequests {
				t.Errorf("an untrusted peer chose its identity with X-Forwarded-For: got %d, want 429", second)
			}
			if tc.separate {
				if got := ask("203.0.113.1"); got != http.StatusTooManyRequests {
					t.Errorf("the first caller again: %d, want 429", got)
				}
				logs := c.waitLog(`"client_ip":"203.0.113.2"`)
				if strings.Contains(logs, `"llm usage"`) && strings.Contains(logs, `"client_ip":"127.0.0.1"`) {
					t.Errorf("a usage line carries the proxy's address, not the client's")
				}
			}
		})
	}
}
