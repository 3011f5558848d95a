package llmstream

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// readmeExamples returns the complete Caddyfile examples of the README (not
// the syntax summaries with <placeholders>), each as a whole Caddyfile: a
// snippet of directives is wrapped in a site block.
func readmeExamples(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range regexp.MustCompile("(?s)```caddyfile\n(.*?)```").FindAllStringSubmatch(string(b), -1) {
		ex := m[1]
		if strings.Contains(ex, "<") || regexp.MustCompile(`\w\|\w`).MatchString(ex) {
			continue // a syntax summary: <placeholders>, a|b alternatives
		}
		first := ""
		for _, line := range strings.Split(ex, "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				first = line
				break
			}
		}
		if !regexp.MustCompile(`^[a-z0-9.:-]+ \{$`).MatchString(first) || strings.HasPrefix(first, "llm_stream") || strings.HasPrefix(first, "log") {
			// Directives: wrapped in a site, indented as caddy fmt does.
			ex = ":8080 {\n\t" + strings.ReplaceAll(strings.TrimSuffix(ex, "\n"), "\n", "\n\t") + "\n}\n"
		}
		out = append(out, ex)
	}
	return out
}

// Every complete Caddyfile example of the README has a golden
// testdata/adapt/readme_<n>.caddyfiletest holding it and its JSON (checked
// by TestAdapt), so the README cannot drift from what Caddy accepts.
// LLM_STREAM_UPDATE_GOLDEN=1 rewrites the golden files.
func TestREADMEExamplesHaveGoldenFiles(t *testing.T) {
	examples := readmeExamples(t)
	if len(examples) < 5 {
		t.Fatalf("found %d README examples, want the complete ones", len(examples))
	}
	for i, ex := range examples {
		path := filepath.Join("testdata", "adapt", "readme_"+strconv.Itoa(i+1)+".caddyfiletest")
		if os.Getenv("LLM_STREAM_UPDATE_GOLDEN") != "" {
			cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(ex), nil)
			if err != nil {
				t.Fatalf("README example %d does not adapt: %v\n%s", i+1, err, ex)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, cfg, "", "\t"); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(ex+"----------\n"+pretty.String()+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		golden, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("README example %d has no golden file %s (LLM_STREAM_UPDATE_GOLDEN=1 writes it)", i+1, path)
		}
		if in, _, _ := strings.Cut(string(golden), "----------"); in != ex {
			t.Errorf("README example %d differs from %s:\n%s", i+1, path, ex)
		}
	}
}
