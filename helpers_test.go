package llmstream

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"go.uber.org/zap"
)

// caddyMu serialises tests that run the process-wide Caddy instance.
var caddyMu sync.Mutex

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// instance is a real Caddy server configured in-process from a Caddyfile.
type instance struct {
	t       testing.TB
	port    int
	logPath string
	globals string // extra global options, e.g. servers { trusted_proxies … }
	admin   int    // the admin API's port, when on
	tls     bool   // the site is served over TLS (tls internal), HTTP/2 included
}

// base is the URL of the site.
func (c *instance) base() string {
	if c.tls {
		return "https://127.0.0.1:" + strconv.Itoa(c.port)
	}
	return "http://127.0.0.1:" + strconv.Itoa(c.port)
}

// caddyfileFor wraps site directives into a complete test Caddyfile that
// logs to a file the test can read.
func (c *instance) caddyfileFor(directives string) string {
	admin := "admin off"
	if c.admin != 0 {
		admin = "admin 127.0.0.1:" + strconv.Itoa(c.admin)
	}
	site, tls, autoHTTPS := "http://127.0.0.1:"+strconv.Itoa(c.port), "", "auto_https off"
	if c.tls {
		// As browsers reach Caddy: TLS with HTTP/2, from Caddy's own CA.
		site, tls = "https://127.0.0.1:"+strconv.Itoa(c.port), "tls internal\n"
		admin += "\n\tlocal_certs\n\tskip_install_trust\n\tstorage file_system " + filepath.Dir(c.logPath)
		autoHTTPS = "auto_https disable_redirects"
	}
	return `{
	` + admin + `
	` + autoHTTPS + `
	persist_config off
	grace_period 10s
` + c.globals + `
	log {
		output file ` + c.logPath + `
		level DEBUG
	}
}
` + site + ` {
` + tls + directives + `
}
`
}

// startCaddy runs Caddy with the given site directives until the test ends.
func startCaddy(t testing.TB, directives string) *instance {
	t.Helper()
	return startInstance(t, &instance{}, directives)
}

// startCaddyWith is startCaddy with extra global options.
func startCaddyWith(t testing.TB, globals, directives string) *instance {
	t.Helper()
	return startInstance(t, &instance{globals: globals}, directives)
}

// startCaddyAdmin is startCaddy with the admin API on, for reloads the way
// `caddy reload` makes them.
func startCaddyAdmin(t testing.TB, directives string) *instance {
	t.Helper()
	return startInstance(t, &instance{admin: freePort(t)}, directives)
}

// startCaddyTLS is startCaddy with the site served over TLS (HTTP/1.1 and
// HTTP/2), as automatic HTTPS serves it.
func startCaddyTLS(t testing.TB, directives string) *instance {
	t.Helper()
	return startInstance(t, &instance{tls: true}, directives)
}

// startInstance runs the process-wide Caddy with c's options until the
// test ends.
func startInstance(t testing.TB, c *instance, directives string) *instance {
	t.Helper()
	caddyMu.Lock()
	c.t, c.port, c.logPath = t, freePort(t), filepath.Join(t.TempDir(), "caddy.log")
	t.Cleanup(func() {
		_ = caddy.Stop()
		caddyMu.Unlock()
	})
	c.load(directives)
	if c.tls {
		c.waitCertificate()
	}
	return c
}

// waitCertificate waits for the site's certificate from Caddy's internal
// CA, which is issued in the background.
func (c *instance) waitCertificate() {
	c.t.Helper()
	conf := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // Caddy's internal CA, in a test
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := tls.Dial("tcp", "127.0.0.1:"+strconv.Itoa(c.port), conf)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no TLS certificate for the site: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// load (re)loads the configuration.
func (c *instance) load(directives string) {
	c.t.Helper()
	cfg := loadConfig(c.t, c.caddyfileFor(directives))
	if err := caddy.Load(cfg, true); err != nil {
		c.t.Fatalf("loading config: %v", err)
	}
	afterReload()
	waitListening(c.t, c.port)
}

// afterReload lets the old servers finish closing their listeners (Caddy
// starts their shutdowns in goroutines and returns; "the scheduler might
// still pause them right before calling Shutdown()", its comment says),
// then drops idle keep-alive connections: a POST on one the old server
// closed, or on a connection it accepted in that window, fails with EOF
// (clients retry only idempotent requests).
func afterReload() {
	time.Sleep(50 * time.Millisecond)
	http.DefaultClient.CloseIdleConnections()
	noCompressClient.CloseIdleConnections()
}

func loadConfig(t testing.TB, caddyfile string) []byte {
	t.Helper()
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v\n%s", err, caddyfile)
	}
	return cfg
}

func waitListening(t testing.TB, port int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("nothing listening on port %d", port)
}

// reload posts a new Caddyfile to the admin API's /load, as `caddy reload`
// does.
func (c *instance) reload(directives string) {
	c.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://127.0.0.1:"+strconv.Itoa(c.admin)+"/load",
		strings.NewReader(c.caddyfileFor(directives)))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("reload: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		c.t.Fatalf("reload: %d %s", resp.StatusCode, b)
	}
	afterReload()
}

// logs returns what Caddy logged so far.
func (c *instance) logs() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// readEvents reads SSE events (text up to and including the blank line)
// from r and sends each on the returned channel.
func readEvents(r *bufio.Reader) <-chan string {
	ch := make(chan string, 64)
	go func() {
		defer close(ch)
		var ev strings.Builder
		for {
			line, err := r.ReadString('\n')
			ev.WriteString(line)
			if err != nil {
				if ev.Len() > 0 {
					ch <- ev.String()
				}
				return
			}
			if line == "\n" || line == "\r\n" {
				ch <- ev.String()
				ev.Reset()
			}
		}
	}()
	return ch
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// waitLog waits until Caddy's log holds every one of the strings (the
// usage line is written after the client got the last byte) and returns
// the log.
func (c *instance) waitLog(want ...string) string {
	c.t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		logs := c.logs()
		missing := ""
		for _, w := range want {
			if !strings.Contains(logs, w) {
				missing = w
			}
		}
		if missing == "" {
			return logs
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("the log lacks %s", missing)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type syncWaitGroup = sync.WaitGroup

func nopLogger() *zap.Logger { return zap.NewNop() }

func sleepBriefly() { time.Sleep(10 * time.Millisecond) }
