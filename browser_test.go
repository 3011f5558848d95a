package llmstream

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/chromedp/chromedp"
)

// chromiumPath finds a Chromium to drive. Without one the browser test is
// skipped, except under CI, where it must run.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no Chromium installed (CI must install Debian's chromium package)")
	}
	t.Skip("no Chromium installed")
	return ""
}

// startDemo runs examples/Caddyfile itself, on free ports and logging to a
// file, with the mock model (OPENAI_API_KEY unset).
func startDemo(t *testing.T) *instance {
	t.Helper()
	src, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("OPENAI_API_KEY", "")
	caddyMu.Lock()
	c := &instance{t: t, port: freePort(t), logPath: filepath.Join(t.TempDir(), "caddy.log")}
	t.Cleanup(func() {
		_ = caddy.Stop()
		caddyMu.Unlock()
	})
	model := strconv.Itoa(freePort(t))
	cfg := strings.NewReplacer(
		"admin localhost:2019", "admin off\n\tpersist_config off\n\tlog {\n\t\toutput file "+c.logPath+"\n\t}",
		":8080 {", "http://127.0.0.1:"+strconv.Itoa(c.port)+" {",
		"127.0.0.1:8081", "127.0.0.1:"+model,
		":8081 {", "http://127.0.0.1:"+model+" {",
	).Replace(string(src))
	if err := caddy.Load(loadConfig(t, cfg), true); err != nil {
		t.Fatalf("loading the demo: %v", err)
	}
	waitListening(t, c.port)
	return c
}

// The demo page in a real headless Chromium: it streams the answer over
// HTTP and over a WebSocket, token by token, and its Stop button stops the
// generation on the server.
func TestDemoPageInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	chrome := chromiumPath(t)
	c := startDemo(t)
	artifacts := os.Getenv("LLM_STREAM_ARTIFACTS")
	if artifacts == "" {
		artifacts = "artifacts"
	}
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelTimeout := context.WithTimeout(ctx, 60*time.Second)
	defer cancelTimeout()
	if err := chromedp.Do(ctx, chromedp.Navigate(c.base()+"/"), chromedp.WaitReady("#q")); err != nil {
		t.Fatalf("opening the demo page: %v", err)
	}

	for i, mode := range []string{"http", "websocket"} {
		t.Run(mode, func(t *testing.T) {
			// A whole answer: it grows in many visible steps.
			steps, text, status := askInBrowser(t, ctx, mode, "Hello!", false)
			t.Logf("%s: the answer grew in %d visible steps to %d characters; status %q", mode, len(steps), len(text), status)
			if status != "done" {
				t.Fatalf("status %q, answer %q", status, text)
			}
			if !strings.HasPrefix(text, "Caddy relays every token") || !strings.HasSuffix(text, "never reaches the browser.") {
				t.Errorf("answer %q", text)
			}
			if len(steps) < 10 {
				t.Errorf("the answer appeared in %d steps (%v), want it token by token", len(steps), steps)
			}
			checkFigures(t, ctx, c, "miss")
			shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(artifacts, "demo-"+mode+".png")
			if err := os.WriteFile(path, shot, 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("screenshot: %s", path)

			// Stop mid-answer: the answer stops growing and the server
			// records a stopped generation.
			_, text, status = askInBrowser(t, ctx, mode, "Tell me more", true)
			if status != "stopped" {
				t.Fatalf("after Stop: status %q, answer %q", status, text)
			}
			if strings.HasSuffix(text, "never reaches the browser.") {
				t.Errorf("the answer ran to its end despite Stop: %q", text)
			}
			time.Sleep(300 * time.Millisecond)
			later, err := chromedp.Run(ctx, chromedp.Evaluate[string](`[...document.querySelectorAll(".assistant")].pop().textContent`))
			if err != nil {
				t.Fatal(err)
			}
			if later != text {
				t.Errorf("the answer kept growing after Stop: %q then %q", text, later)
			}
			// The server stopped the generation (it did not merely see the
			// client leave): one stopped usage line per mode so far.
			deadline := time.Now().Add(3 * time.Second)
			for strings.Count(c.logs(), `"stopped":true`) < i+1 {
				if time.Now().After(deadline) {
					t.Fatalf("the server logged no stopped generation for %s", mode)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	if shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)); err == nil {
		_ = os.WriteFile(filepath.Join(artifacts, "demo-stopped.png"), shot, 0o644)
	}

	// A fresh page asks the first question again: the server's cache
	// answers it, and the figures say so.
	if err := chromedp.Do(ctx, chromedp.Navigate(c.base()+"/"), chromedp.WaitReady("#q")); err != nil {
		t.Fatal(err)
	}
	if _, _, status := askInBrowser(t, ctx, "http", "Hello!", false); status != "done" {
		t.Fatalf("the repeated question: status %q", status)
	}
	checkFigures(t, ctx, c, "hit")
	if shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)); err == nil {
		_ = os.WriteFile(filepath.Join(artifacts, "demo-cached.png"), shot, 0o644)
	}
}

// checkFigures reads the figures under the last answer and requires them
// to be what the server's usage line says of that request.
func checkFigures(t *testing.T, ctx context.Context, c *instance, cache string) {
	t.Helper()
	type figures struct {
		Text             string `json:"text"`
		RequestID        string `json:"requestId"`
		PromptTokens     string `json:"promptTokens"`
		CompletionTokens string `json:"completionTokens"`
		CostUSD          string `json:"costUsd"`
		Cache            string `json:"cache"`
	}
	var f figures
	for deadline := time.Now().Add(5 * time.Second); f.RequestID == "" && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var err error
		f, err = chromedp.Run(ctx, chromedp.Evaluate[figures](`(() => {
			const a = [...document.querySelectorAll(".assistant")].pop();
			const el = a && a.nextElementSibling;
			return el && el.classList.contains("figures") ? { text: el.textContent, ...el.dataset } : {};
		})()`))
		if err != nil {
			t.Fatal(err)
		}
	}
	if f.RequestID == "" {
		t.Fatal("no figures under the answer")
	}
	line := regexp.MustCompile(`.*"request_id":"` + f.RequestID + `".*`).FindString(c.waitLog(`"request_id":"` + f.RequestID + `"`))
	for _, want := range []string{`"prompt_tokens":` + f.PromptTokens + `,`, `"completion_tokens":` + f.CompletionTokens + `,`,
		`"cost_usd":` + f.CostUSD + `,`, `"cache":"` + f.Cache + `"`, `"cache":"` + cache + `"`} {
		if !strings.Contains(line, want) {
			t.Errorf("the figures %q (%+v) disagree with the usage line %s: no %s", f.Text, f, line, want)
		}
	}
	if !strings.Contains(f.Text, "first token") || !strings.Contains(f.Text, "tokens/s") || !strings.Contains(f.Text, "$") {
		t.Errorf("figures %q", f.Text)
	}
}

// askInBrowser types a question, sends it in the given mode and watches the
// last answer grow until the status line says it ended (pressing Stop after
// a few steps when stop is set). It returns the lengths seen, the final
// text and the status.
func askInBrowser(t *testing.T, ctx context.Context, mode, question string, stop bool) ([]int, string, string) {
	t.Helper()
	if err := chromedp.Do(ctx,
		chromedp.SetValue("#mode", mode),
		chromedp.SetValue("#q", question),
		chromedp.Click("#send"),
	); err != nil {
		t.Fatal(err)
	}
	var steps []int
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		type pageState struct {
			Text   string `json:"text"`
			Status string `json:"status"`
		}
		state, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](`({
			text: ([...document.querySelectorAll(".assistant")].pop() || {}).textContent || "",
			status: document.getElementById("status").textContent,
		})`))
		if err != nil {
			t.Fatal(err)
		}
		if n := len(state.Text); n > 0 && (len(steps) == 0 || steps[len(steps)-1] != n) {
			steps = append(steps, n)
		}
		if state.Status == "done" || state.Status == "stopped" || state.Status == "error" {
			return steps, state.Text, state.Status
		}
		if stop && len(steps) == 3 {
			if err := chromedp.Do(ctx, chromedp.Click("#stop")); err != nil {
				t.Fatal(err)
			}
			stop = false
		}
		time.Sleep(15 * time.Millisecond)
	}
	t.Fatalf("the answer did not end; lengths seen %v", steps)
	return nil, "", ""
}
