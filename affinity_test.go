package llmstream

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// keyedUpstream answers like a chat model and tells which key each turn
// of each conversation reached; the key in busy (if any) gets 429 with
// Retry-After 1.
type keyedUpstream struct {
	*fakeUpstream
	busy atomic.Value // string: "Bearer sk-…"
}

func newKeyedUpstream(t *testing.T) *keyedUpstream {
	u := &keyedUpstream{}
	u.busy.Store("")
	u.fakeUpstream = newUpstream(t, answering(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		if b := u.busy.Load().(string); b != "" && r.Header.Get("Authorization") == b {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}`)
			return
		}
		w.Header().Set("X-Key-Seen", r.Header.Get("Authorization"))
		io.WriteString(w, `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}`)
	}))
	return u
}

// turn is turn n of conversation c, as a chat client sends it: the same
// system prompt and first question, then the whole history.
func turn(c, n int) string {
	msgs := []map[string]string{
		{"role": "system", "content": "You are a careful assistant."},
		{"role": "user", "content": fmt.Sprintf("Conversation %d: tell me about Caddy.", c)},
	}
	for i := 1; i < n; i++ {
		msgs = append(msgs, map[string]string{"role": "assistant", "content": "ok"},
			map[string]string{"role": "user", "content": fmt.Sprintf("and then %d?", i)})
	}
	b, _ := json.Marshal(map[string]any{"model": "gpt-4o", "messages": msgs})
	return string(b)
}

// keyOf sends the turn and returns the key the upstream saw.
func keyOf(t *testing.T, base, body string) string {
	t.Helper()
	resp, got := do(t, "POST", base+"/v1/chat/completions", body, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	return resp.Header.Get("X-Key-Seen")
}

// 200 conversations × 5 turns over three keys with key_affinity auto:
// every follow-up turn reaches its first turn's key, on whichever instance
// it lands; removing a key moves only that key's conversations; a resting
// key's conversations move while it rests and come back after.
func TestAffinityKeepsConversationsOnTheirKey(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a second Caddy process")
	}
	up := newKeyedUpstream(t)
	config := func(keys string) string {
		return `llm_stream {
		upstream ` + up.URL + ` {
			api_key ` + keys + `
		}
		key_affinity auto
	}`
	}
	c := startCaddyAdmin(t, config("sk-k1 sk-k2 sk-k3"))
	other := startProcess(t, config("sk-k3 sk-k1 sk-k2")) // another instance, its keys listed in another order
	const convs, turns = 200, 5
	first := map[int]string{}
	share := map[string]int{}
	stayed, followUps := 0, 0
	hits0 := testutil.ToFloat64(metrics.affinity.WithLabelValues("hit"))
	for n := 1; n <= turns; n++ {
		for cv := 0; cv < convs; cv++ {
			base := c.base()
			if (cv+n)%2 == 0 {
				base = other
			}
			k := keyOf(t, base, turn(cv, n))
			if n == 1 {
				first[cv] = k
				share[k]++
				continue
			}
			followUps++
			if k == first[cv] {
				stayed++
			}
		}
	}
	t.Logf("follow-up turns on their first key: %d of %d; conversations per key: %v", stayed, followUps, share)
	if stayed*100 < followUps*95 {
		t.Fatalf("only %d of %d follow-up turns reached their first turn's key", stayed, followUps)
	}
	for k, n := range share {
		if n < convs/6 {
			t.Errorf("key %s has %d of %d conversations: not spread", k, n, convs)
		}
	}
	if got := testutil.ToFloat64(metrics.affinity.WithLabelValues("hit")) - hits0; got < float64(convs*turns/2) {
		t.Errorf("affinity hits +%v, want at least the in-process half of %d", got, convs*turns)
	}

	t.Run("removing one of three keys moves only its conversations", func(t *testing.T) {
		c.reload(config("sk-k1 sk-k2"))
		moved := 0
		for cv := 0; cv < convs; cv++ {
			k := keyOf(t, c.base(), turn(cv, turns+1))
			switch {
			case first[cv] == "Bearer sk-k3":
				moved++
			case k != first[cv]:
				t.Errorf("conversation %d moved from %s to %s though its key stayed", cv, first[cv], k)
			}
		}
		if moved != share["Bearer sk-k3"] || moved > convs/3+convs/10 {
			t.Errorf("%d conversations moved; the removed key had %d", moved, share["Bearer sk-k3"])
		}
	})

	t.Run("a resting key's conversations move and come back", func(t *testing.T) {
		c.reload(config("sk-k1 sk-k2 sk-k3"))
		up.busy.Store("Bearer sk-k2")
		moves0 := testutil.ToFloat64(metrics.affinity.WithLabelValues("moved"))
		for cv := 0; cv < convs; cv++ {
			k := keyOf(t, c.base(), turn(cv, 2))
			if k == "Bearer sk-k2" || first[cv] != "Bearer sk-k2" && k != first[cv] {
				t.Fatalf("conversation %d (on %s) reached %s while sk-k2 rests", cv, first[cv], k)
			}
		}
		// (The counter moves once the answer was written: wait for the last.)
		want := float64(share["Bearer sk-k2"])
		got := 0.0
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if got = testutil.ToFloat64(metrics.affinity.WithLabelValues("moved")) - moves0; got == want {
				break
			}
		}
		if got != want {
			t.Errorf("affinity moves +%v, want %v (the resting key's conversations)", got, want)
		}
		up.busy.Store("")
		time.Sleep(1100 * time.Millisecond) // Retry-After: 1
		for cv := 0; cv < convs; cv++ {
			if k := keyOf(t, c.base(), turn(cv, 3)); k != first[cv] {
				t.Fatalf("conversation %d is on %s after the rest, want %s", cv, k, first[cv])
			}
		}
	})
}

// Each source names the conversation its own way: prompt_cache_key keeps
// different prompts together; a header does; without a name under auto,
// the beginning of the conversation does.
func TestAffinitySources(t *testing.T) {
	up := newKeyedUpstream(t)
	for _, tc := range []struct {
		source      string
		a, b        string // two requests of one conversation
		hdrA, hdrB  string
		wantSameKey bool
	}{
		{"prompt_cache_key", `{"model":"m","prompt_cache_key":"user-7/doc-1","messages":[{"role":"user","content":"one"}]}`,
			`{"model":"m","prompt_cache_key":"user-7/doc-1","messages":[{"role":"user","content":"two"}]}`, "", "", true},
		{"auto", `{"model":"m","metadata":{"user_id":"u-9"},"messages":[{"role":"user","content":"one"}]}`,
			`{"model":"m","metadata":{"user_id":"u-9"},"messages":[{"role":"user","content":"two"}]}`, "", "", true},
		{"header X-Session", `{"model":"m","messages":[{"role":"user","content":"one"}]}`,
			`{"model":"m","messages":[{"role":"user","content":"two"}]}`, "s-1", "s-1", true},
	} {
		t.Run(tc.source, func(t *testing.T) {
			c := startCaddy(t, `llm_stream {
		upstream `+up.URL+` {
			api_key sk-k1 sk-k2 sk-k3 sk-k4 sk-k5 sk-k6 sk-k7 sk-k8
		}
		key_affinity `+tc.source+`
	}`)
			for i := 0; i < 5; i++ {
				ka := keyFor(t, c.base(), tc.a, tc.hdrA)
				kb := keyFor(t, c.base(), tc.b, tc.hdrB)
				if ka != kb {
					t.Fatalf("two turns of one conversation reached %s and %s", ka, kb)
				}
			}
		})
	}
}

func keyFor(t *testing.T, base, body, session string) string {
	t.Helper()
	hdr := map[string]string{}
	if session != "" {
		hdr["X-Session"] = session
	}
	resp, got := do(t, "POST", base+"/v1/chat/completions", body, hdr)
	if resp.StatusCode != http.StatusOK || !strings.Contains(got, "chat.completion") {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	return resp.Header.Get("X-Key-Seen")
}

// The prefix that names a conversation is the same for every turn of it,
// differs between conversations, and ignores what follows the first user
// turn, in each API's shape.
func TestPromptPrefix(t *testing.T) {
	prefix := func(body string) uint64 {
		in := &inbound{isJSON: true, body: []byte(body)}
		if err := in.readFields(); err != nil {
			t.Fatal(err)
		}
		in.model = "m"
		return promptPrefix(in)
	}
	for _, tc := range []struct{ name, turn1, turn2, other string }{
		{"openai", `{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"Q1"}]}`,
			`{"messages": [ {"role":"system","content":"S"} , {"role":"user","content":"Q1"},{"role":"assistant","content":"A"},{"role":"user","content":"Q2"}], "model":"m"}`,
			`{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"Q9"}]}`},
		{"anthropic", `{"system":"S","messages":[{"role":"user","content":"Q1"}]}`,
			`{"system":"S","messages":[{"role":"user","content":"Q1"},{"role":"assistant","content":"A"},{"role":"user","content":"Q2"}]}`,
			`{"system":"T","messages":[{"role":"user","content":"Q1"}]}`},
		{"responses", `{"instructions":"S","input":[{"role":"user","content":"Q1"}]}`,
			`{"instructions":"S","input":[{"role":"user","content":"Q1"},{"type":"message","role":"assistant","content":"A"}]}`,
			`{"instructions":"S","input":[{"role":"user","content":"Q2"}]}`},
		{"gemini", `{"systemInstruction":{"parts":[{"text":"S"}]},"contents":[{"role":"user","parts":[{"text":"Q1"}]}]}`,
			`{"systemInstruction":{"parts":[{"text":"S"}]},"contents":[{"role":"user","parts":[{"text":"Q1"}]},{"role":"model","parts":[{"text":"A"}]}]}`,
			`{"contents":[{"role":"user","parts":[{"text":"Q1"}]}]}`},
	} {
		a, b, c := prefix(tc.turn1), prefix(tc.turn2), prefix(tc.other)
		if a == 0 || a != b || a == c {
			t.Errorf("%s: turn 1 %x, turn 2 %x, another conversation %x", tc.name, a, b, c)
		}
	}
	if p := prefix(`{"model":"m"}`); p != 0 {
		t.Errorf("a body without messages named conversation %x", p)
	}
}
