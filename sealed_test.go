package llmstream

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"filippo.io/age"
)

// newIdentityFile makes an age identity, writes it to a file as
// age-keygen does, and returns the file and the recipient.
func newIdentityFile(t *testing.T) (string, string) {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "key.txt")
	if err := os.WriteFile(f, []byte("# public key: "+id.Recipient().String()+"\n"+id.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f, id.Recipient().String()
}

// A real Caddy writes sealed prompt log entries: the log file holds none
// of the prompt's words, numbers or e-mail addresses, nor the answer;
// `caddy llm-stream open-log` with either recipient's identity prints the
// exact prompt and answer; with a wrong identity it reports every line.
func TestSealedPromptLogs(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy command")
	}
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	oldKey, oldRecipient := newIdentityFile(t)
	newKey, newRecipient := newIdentityFile(t) // rotation: both recipients for a while
	wrongKey, _ := newIdentityFile(t)
	recipientsFile := filepath.Join(t.TempDir(), "recipients.txt")
	os.WriteFile(recipientsFile, []byte("# the new key\n"+newRecipient+"\n"), 0o600)
	up := newUpstream(t, modelAnswers(t, 12, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		log_prompts sealed {
			recipient `+oldRecipient+` `+recipientsFile+`
		}
	}`)
	const secret = "Call me on 13812345678 or write to alice@example.com about the pineapple contract"
	body := `{"model":"mock-1","stream":true,"messages":[{"role":"user","content":"` + secret + `"}]}`
	var ids []string
	var answers []string
	for range 3 {
		resp, got := do(t, "POST", c.base()+"/v1/chat/completions", body, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, got)
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
		var answer strings.Builder
		for _, ev := range strings.Split(got, "\n\n") {
			if data, ok := strings.CutPrefix(ev, "data: "); ok && data != "[DONE]" {
				answer.WriteString(chunkContent(t, data))
			}
		}
		answers = append(answers, answer.String())
	}
	logs := c.waitLog(`"sealed":"`, ids[2])
	for _, leak := range []string{"13812345678", "alice@example.com", "pineapple", "contract", answers[0][:20]} {
		if strings.Contains(logs, leak) {
			t.Fatalf("the log holds %q", leak)
		}
	}
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	os.WriteFile(logFile, []byte(logs), 0o600)

	open := func(key string) (string, string, error) {
		cmd := exec.Command(bin, "llm-stream", "open-log", "--identity", key, logFile)
		if key == newKey { // as in the README: the log on standard input
			cmd = exec.Command(bin, "llm-stream", "open-log", "--identity", key)
			cmd.Stdin = strings.NewReader(logs)
		}
		var out, errs bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errs
		err := cmd.Run()
		return out.String(), errs.String(), err
	}
	wantPrompt := requestText([]byte(body))
	for _, key := range []string{oldKey, newKey} {
		out, errs, err := open(key)
		if err != nil {
			t.Fatalf("open-log: %v\n%s", err, errs)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 3 {
			t.Fatalf("open-log printed %d entries, want 3:\n%s", len(lines), out)
		}
		for i, l := range lines {
			var e struct {
				RequestID string `json:"request_id"`
				Model     string `json:"model"`
				Prompt    string `json:"prompt"`
				Answer    string `json:"answer"`
			}
			if err := json.Unmarshal([]byte(l), &e); err != nil {
				t.Fatal(err)
			}
			if e.RequestID != ids[i] || e.Model != "mock-1" || e.Prompt != wantPrompt || !strings.Contains(wantPrompt, secret) || e.Answer != answers[i] {
				t.Errorf("entry %d: %+v, want request %s, prompt %q, answer %q", i, e, ids[i], wantPrompt, answers[i])
			}
		}
	}
	out, errs, err := open(wrongKey)
	if err == nil || out != "" || strings.Count(errs, "cannot open") != 3 {
		t.Errorf("with a wrong identity: err %v, out %q, stderr %q", err, out, errs)
	}
}

// With redact configured, a sealed entry is masked before it is sealed.
func TestSealedEntriesAreRedactedWhenAsked(t *testing.T) {
	keyFile, recipient := newIdentityFile(t)
	up := newUpstream(t, modelAnswers(t, 3, 0))
	c := startCaddy(t, `llm_stream `+up.URL+` {
		log_prompts sealed {
			recipient `+recipient+`
		}
		redact email
	}`)
	resp, _ := do(t, "POST", c.base()+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"mail bob@example.org"}]}`, nil)
	logs := c.waitLog(`"sealed":"`, resp.Header.Get("X-Request-Id"))
	ids, err := readIdentities([]string{keyFile})
	if err != nil {
		t.Fatal(err)
	}
	var out, errs bytes.Buffer
	if opened, failed, err := openLog(strings.NewReader(logs), &out, &errs, ids); opened != 1 || failed != 0 || err != nil {
		t.Fatalf("opened %d, failed %d, %v: %s", opened, failed, err, errs.String())
	}
	if strings.Contains(out.String(), "bob@example.org") || !strings.Contains(out.String(), "mail ") {
		t.Errorf("opened entry %s: want the address masked", out.String())
	}
}

// BenchmarkSeal is what sealing costs per logged request.
func BenchmarkSeal(b *testing.B) {
	id, _ := age.GenerateX25519Identity()
	rs := []age.Recipient{id.Recipient()}
	e := sealedEntry{Prompt: strings.Repeat("What does the tenant pay? ", 40), Answer: strings.Repeat("The tenant pays the rent. ", 40)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := seal(rs, e); err != nil {
			b.Fatal(err)
		}
	}
}
