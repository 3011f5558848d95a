// Command load runs the llm_stream benchmark scenarios against several
// targets (the mock directly, reverse_proxy, nginx, llm_stream) on loopback
// and prints them side by side. Every scenario is bounded in requests and
// time. Targets are given as name=url=pid[,pid...]; the pids are the
// proxy's processes, read from /proc for CPU time and memory.
//
// The mock must run with `stamp`, so each chunk carries the time it was
// sent (mock_sent_ns) and the per-chunk delay can be measured end to end.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type target struct {
	name, url string
	pids      []int
}

func main() {
	var (
		paced  = flag.String("paced", "/paced/v1/chat/completions", "path of the 100 chunks @20ms stream")
		burst  = flag.String("burst", "/burst/v1/chat/completions", "path of the 500 chunks, no delay stream")
		steady = flag.String("steady", "/steady/v1/chat/completions", "path of the 500 chunks @2ms stream (a chunk a read)")
		slow   = flag.String("slow", "/slow/v1/chat/completions", "path of the slow stream")
		open   = flag.Int("open", 2000, "concurrent slow streams")
		rpsDur = flag.Duration("rps-time", 4*time.Second, "duration of the requests/s scenario")
		only   = flag.String("only", "", "run only this scenario (paced, burst, open or rps); for profiling")
		caFile = flag.String("ca", "", "PEM file of the CA that signed the targets' certificates (https targets)")
		h2     = flag.Bool("h2", false, "speak HTTP/2 to https targets (as browsers do); else HTTP/1.1")
		usage  = flag.Bool("include-usage", false, "streams ask for include_usage themselves, so every proxy relays the same bytes (llm_stream otherwise asks for it and drops the usage chunk)")
	)
	flag.Parse()
	if err := setClient(*caFile, *h2); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	onlyScenario = *only
	if *usage {
		body = bodyWithUsage
	}
	var targets []target
	for _, arg := range flag.Args() {
		parts := strings.SplitN(arg, "=", 3)
		if len(parts) != 3 {
			fmt.Fprintln(os.Stderr, "target must be name=url=pid[,pid]")
			os.Exit(2)
		}
		t := target{name: parts[0], url: parts[1]}
		for _, p := range strings.Split(parts[2], ",") {
			if n, err := strconv.Atoi(p); err == nil && n > 0 {
				t.pids = append(t.pids, n)
			}
		}
		targets = append(targets, t)
	}
	if len(targets) > 0 {
		if u, err := url.Parse(targets[0].url); err == nil {
			mockPort, _ = strconv.Atoi(u.Port())
		}
	}
	rows := map[string][]string{}
	add := func(row, v string) { rows[row] = append(rows[row], v) }
	var direct *result
	for i, t := range targets {
		fmt.Fprintf(os.Stderr, "== %s\n", t.name)
		r := runAll(t, *paced, *burst, *slow, *open, *rpsDur)
		if i == 0 {
			direct = r
		}
		rel := func(v, base float64) string {
			if i == 0 {
				return fmt.Sprintf("(%.2f)", v)
			}
			return fmt.Sprintf("%+.2f", v-base)
		}
		add("proto", r.proto)
		add("ttft", rel(r.ttftP50, direct.ttftP50)+" / "+rel(r.ttftP99, direct.ttftP99))
		add("chunk", rel(r.chunkP50, direct.chunkP50)+" / "+rel(r.chunkP99, direct.chunkP99))
		add("cpu", "-") // measured below, in interleaved rounds
		add("mem", fmt.Sprintf("%.1f", r.memPerStream))
		add("openttft", rel(r.openTTFTP50, direct.openTTFTP50)+" / "+rel(r.openTTFTP99, direct.openTTFTP99))
		add("opencpu", fmt.Sprintf("%.1f", r.openCPUPerChunk))
		add("upconns", strconv.Itoa(r.upConns))
		add("errors", strconv.Itoa(r.errors))
		add("rps", fmt.Sprintf("%.0f", r.rps))
		rows["_mem"] = append(rows["_mem"], fmt.Sprint(r.memPerStream))
	}
	var burstRounds, steadyRounds, requestRounds [][]float64
	if enabled("burst") {
		burstRounds = cpuRounds(targets, *burst, cpuBurstRounds)
		// The same count of chunks, paced so that every proxy reads one
		// chunk at a time: without a delay, how many chunks a read holds
		// depends on how fast each proxy happens to read.
		steadyRounds = cpuRounds(targets, *steady, cpuSteadyRounds)
		for i := range targets {
			rows["cpu"][i] = fmt.Sprintf("%.2f", median(burstRounds[i]))
			rows["cpusteady"] = append(rows["cpusteady"], fmt.Sprintf("%.2f", median(steadyRounds[i])))
		}
	}
	if enabled("rps") {
		requestRounds = cpuRequestRounds(targets, requestRoundsN)
		for i := range targets {
			rows["cpureq"] = append(rows["cpureq"], fmt.Sprintf("%.1f", median(requestRounds[i])))
		}
	}
	head := "| scenario (medians; proxies: added = minus direct) |"
	sep := "|---|"
	for _, t := range targets {
		head += " " + t.name + " |"
		sep += "---|"
	}
	fmt.Println(head)
	fmt.Println(sep)
	labels := []struct{ key, text string }{
		{"proto", "protocol the load tool spoke"},
		{"ttft", "50 streams × 100 chunks @20 ms: TTFT p50 / p99 (ms)"},
		{"chunk", "same: per-chunk delay p50 / p99 (ms)"},
		{"cpu", fmt.Sprintf("100 streams × 500 chunks, no delay: proxy CPU per chunk (µs, median of %d interleaved rounds)", cpuBurstRounds)},
		{"cpusteady", fmt.Sprintf("100 streams × 500 chunks @2 ms (a chunk a read): proxy CPU per chunk (µs, median of %d interleaved rounds)", cpuSteadyRounds)},
		{"mem", fmt.Sprintf("%d open slow streams: proxy memory per stream (KB)", *open)},
		{"openttft", fmt.Sprintf("%d open slow streams (opened 1 per ms): TTFT p50 / p99 (ms)", *open)},
		{"opencpu", "same: proxy CPU per chunk over the streams' lives (µs; a chunk a read, a second apart)"},
		{"upconns", "same: the proxy's open connections to the mock"},
		{"errors", "errors (all scenarios)"},
		{"rps", "non-streaming requests/s (32 in flight)"},
		{"cpureq", fmt.Sprintf("non-streaming requests (32 in flight): proxy CPU per request (µs, median of %d interleaved rounds)", requestRoundsN)},
	}
	for _, l := range labels {
		fmt.Printf("| %s | %s |\n", l.text, strings.Join(rows[l.key], " | "))
	}
	// ratios, round by round where rounds were run: llm_stream against
	// reverse_proxy (the targets), the floor (the least a handler
	// inside Caddy can do) against reverse_proxy, and llm_stream against
	// the floor (how much of its figure is its own); with a baseline
	// column (an earlier build), llm_stream against it
	idx := func(name string) int {
		return slices.IndexFunc(targets, func(t target) bool { return t.name == name })
	}
	f := func(k string, i int) float64 { v, _ := strconv.ParseFloat(rows[k][i], 64); return v }
	fmt.Println()
	for _, p := range [][2]string{{"llm_stream", "reverse_proxy"}, {"floor", "reverse_proxy"}, {"llm_stream", "floor"}, {"llm_stream", "baseline"}, {"baseline", "reverse_proxy"}} {
		a, b := idx(p[0]), idx(p[1])
		if a < 0 || b < 0 {
			continue
		}
		if m := f("_mem", b); m > 0 {
			fmt.Printf("%s / %s: memory per open stream %.2f×\n", p[0], p[1], f("_mem", a)/m)
		}
		if requestRounds != nil {
			m, lo, hi := pairedRatio(requestRounds[a], requestRounds[b])
			fmt.Printf("%s / %s: CPU per non-streamed request: %.2f× (median of %d rounds' ratios; range %.2f–%.2f×)\n",
				p[0], p[1], m, len(requestRounds[a]), lo, hi)
		}
		if burstRounds != nil {
			// Each round's ratio, both proxies measured under the same
			// load: steadier than a ratio of medians on a shared machine.
			for _, c := range []struct {
				name   string
				rounds [][]float64
			}{{"no delay", burstRounds}, {"@2 ms", steadyRounds}} {
				m, lo, hi := pairedRatio(c.rounds[a], c.rounds[b])
				fmt.Printf("%s / %s: CPU per chunk, %s: %.2f× (median of %d rounds' ratios; range %.2f–%.2f×)\n",
					p[0], p[1], c.name, m, len(c.rounds[a]), lo, hi)
			}
		}
	}
}

type result struct {
	proto                                string
	upConns                              int
	ttftP50, ttftP99, chunkP50, chunkP99 float64
	memPerStream                         float64
	openCPUPerChunk                      float64
	openTTFTP50, openTTFTP99             float64
	errors                               int
	rps                                  float64
}

var client = &http.Client{Transport: &http.Transport{
	MaxIdleConnsPerHost: 4096,
	DisableCompression:  true,
}}

// setClient makes the client trust caFile and, with h2, speak HTTP/2 (many
// streams over few connections, as a browser does); without h2 it keeps
// HTTP/1.1 (a connection per stream).
func setClient(caFile string, h2 bool) error {
	if caFile == "" {
		return nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s: no certificate", caFile)
	}
	tr := &http.Transport{
		MaxIdleConnsPerHost: 4096,
		DisableCompression:  true,
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:   h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{} // HTTP/1.1 only
	}
	client = &http.Client{Transport: tr}
	return nil
}

// body is what each stream asks; bodyWithUsage asks for include_usage too.
var body = `{"model":"mock-1","stream":true,"messages":[{"role":"user","content":"hello"}]}`

const bodyWithUsage = `{"model":"mock-1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello"}]}`

// stream runs one streamed request and reports the time to the first
// content chunk and each chunk's delay since the mock sent it.
func stream(ctx context.Context, url string, started chan<- struct{}) (ttft time.Duration, delays []time.Duration, chunks int, err error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer client")
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		_, _ = io.Copy(io.Discard, resp.Body)
		return 0, nil, 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	br := bufio.NewReaderSize(resp.Body, 4096)
	done := false
	for {
		line, rerr := br.ReadSlice('\n')
		now := time.Now()
		if bytes.HasPrefix(line, []byte("data: ")) {
			if bytes.HasPrefix(line, []byte("data: [DONE]")) {
				done = true
			} else if i := bytes.Index(line, []byte(`"mock_sent_ns":`)); i >= 0 {
				rest := line[i+len(`"mock_sent_ns":`):]
				j := bytes.IndexAny(rest, ",}")
				ns, _ := strconv.ParseInt(string(rest[:j]), 10, 64)
				if chunks == 0 {
					ttft = now.Sub(t0)
					if started != nil {
						started <- struct{}{}
					}
				}
				delays = append(delays, now.Sub(time.Unix(0, ns)))
				chunks++
			}
		}
		if rerr != nil {
			if rerr == io.EOF && done {
				return ttft, delays, chunks, nil
			}
			if rerr == io.EOF {
				return ttft, delays, chunks, fmt.Errorf("stream ended without [DONE]")
			}
			return ttft, delays, chunks, rerr
		}
	}
}

func pct(ds []time.Duration, p float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return float64(ds[int(float64(len(ds)-1)*p)]) / 1e6
}

// cpuSeconds is the CPU time the processes' threads ran, from
// /proc/<pid>/task/*/schedstat (nanoseconds, unlike the 10 ms ticks of
// /proc/<pid>/stat, which is the fallback).
func cpuSeconds(pids []int) float64 {
	var total float64
	for _, pid := range pids {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		var ns float64
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, task.Name()))
			if err != nil {
				continue
			}
			v, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
			ns += v
		}
		if ns > 0 {
			total += ns / 1e9
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
		u, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		total += (u + st) / 100 // USER_HZ
	}
	return total
}

// rssKB is the resident memory of the processes.
func rssKB(pids []int) float64 {
	var total float64
	for _, pid := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				v, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
				total += v
			}
		}
	}
	return total
}

// mockPort is the direct target's (the first's) port.
var mockPort int

// connsTo counts the established TCP connections the processes hold to a
// loopback port (their sockets in /proc/net/tcp{,6}).
func connsTo(pids []int, port int) int {
	inodes := map[string]bool{}
	for _, pid := range pids {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err == nil && strings.HasPrefix(l, "socket:[") {
				inodes[l[8:len(l)-1]] = true
			}
		}
	}
	n := 0
	want := fmt.Sprintf(":%04X", port)
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, _ := os.ReadFile(f)
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			// local, remote, state (01 established), …, inode
			if len(fs) > 9 && strings.HasSuffix(fs[2], want) && fs[3] == "01" && inodes[fs[9]] {
				n++
			}
		}
	}
	return n
}

// probe is the protocol a request to the target is answered in.
func probe(url string) string {
	req, _ := http.NewRequest(http.MethodPost, url+"/json/v1/chat/completions",
		strings.NewReader(`{"model":"mock-1","messages":[{"role":"user","content":"hello"}]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return "error: " + err.Error()
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.Proto
}

// onlyScenario limits a run to one scenario, for profiling.
var onlyScenario string

func enabled(name string) bool { return onlyScenario == "" || onlyScenario == name }

func runAll(t target, paced, burst, slow string, open int, rpsDur time.Duration) *result {
	r := new(result)
	var errs atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r.proto = probe(t.url)

	// 1. 50 paced streams
	var mu sync.Mutex
	var ttfts []time.Duration
	var wg sync.WaitGroup
	if enabled("paced") {
		var delays []time.Duration
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tt, d, _, err := stream(ctx, t.url+paced, nil)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs.Add(1)
					return
				}
				ttfts = append(ttfts, tt)
				delays = append(delays, d...)
			}()
		}
		wg.Wait()
		r.ttftP50, r.ttftP99 = pct(ttfts, .5), pct(ttfts, .99)
		r.chunkP50, r.chunkP99 = pct(delays, .5), pct(delays, .99)
	}

	// 2. 100 burst streams
	if enabled("burst") {
		// CPU per chunk is measured in interleaved rounds after all
		// targets ran (see cpuRounds); here the burst only warms the
		// process for the memory scenario, as production traffic would.
		for i := 0; i < 100; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, _, _, err := stream(ctx, t.url+burst, nil); err != nil {
					errs.Add(1)
				}
			}()
		}
		wg.Wait()
	}

	// 3. many open slow streams: memory per stream and TTFT. Measured on
	// a process warmed by the scenarios above, as a proxy in production is:
	// RSS counts only touched pages, so a fresh process under-reports
	// buffers that bursts will fill.
	if enabled("open") {
		runtimeSettle()
		rss0, cpu0 := rssKB(t.pids), cpuSeconds(t.pids)
		var openChunks atomic.Int64
		started := make(chan struct{}, open)
		ttfts = ttfts[:0]
		for i := 0; i < open; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tt, _, n, err := stream(ctx, t.url+slow, started)
				openChunks.Add(int64(n))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs.Add(1)
					return
				}
				ttfts = append(ttfts, tt)
			}()
			// Arrivals spread evenly over 2 s (1,000 new streams a second), as
			// real traffic arrives, rather than in bursts that only measure
			// accept-queue depth.
			time.Sleep(time.Millisecond)
		}
		for i := 0; i < open; i++ {
			select {
			case <-started:
			case <-time.After(30 * time.Second):
				i = open
			}
		}
		time.Sleep(300 * time.Millisecond)
		if len(t.pids) > 0 {
			r.memPerStream = (rssKB(t.pids) - rss0) / float64(open)
			r.upConns = connsTo(t.pids, mockPort)
		}
		wg.Wait()
		r.openTTFTP50, r.openTTFTP99 = pct(ttfts, .5), pct(ttfts, .99)
		if n := openChunks.Load(); n > 0 && len(t.pids) > 0 {
			// every stream's whole life: its request, its chunks (one a
			// read, a second apart) and its end
			r.openCPUPerChunk = (cpuSeconds(t.pids) - cpu0) / float64(n) * 1e6
		}
	}

	// 4. non-streaming requests per second, 32 in flight
	if enabled("rps") {
		var reqs atomic.Int64
		end := time.Now().Add(rpsDur)
		for i := 0; i < 32; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					if !plainRequest(t.url) {
						errs.Add(1)
						continue
					}
					reqs.Add(1)
				}
			}()
		}
		wg.Wait()
		r.rps = float64(reqs.Load()) / rpsDur.Seconds()
	}
	r.errors = int(errs.Load())
	client.CloseIdleConnections()
	return r
}

// plainRequest sends one non-streamed chat completion and reports whether
// the whole answer came back.
func plainRequest(url string) bool {
	req, _ := http.NewRequest(http.MethodPost, url+"/json/v1/chat/completions",
		strings.NewReader(`{"model":"mock-1","messages":[{"role":"user","content":"hello"}]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode == 200 && bytes.Contains(b, []byte(`"chat.completion"`))
}

// Rounds of the CPU scenarios. A no-delay round takes about 0.15 s per
// target, and a single one swings by ±30–80 % with what else the machine does
// (a garbage collection, the load tool's own scheduling): many rounds make
// the median steady. A paced round takes about 1.2 s and swings far less.
// 15 of them keep the median of a target's ratios within a few percent
// (with 5, one run's median moved by ±8 % from the next run's).
// A round of non-streamed requests (512, 32 in flight) takes about 0.2 s
// per target.
const (
	cpuBurstRounds  = 61
	cpuSteadyRounds = 15
	requestRoundsN  = 21
)

// runtimeSettle gives the proxies' garbage collectors a moment after the
// burst scenario, so the baseline is not taken mid-collection.
func runtimeSettle() { time.Sleep(2 * time.Second) }

// cpuRounds measures proxy CPU time per relayed chunk for 100 streams of
// 500 chunks at path; see cpuRoundsOf.
func cpuRounds(targets []target, path string, rounds int) [][]float64 {
	ctx := context.Background()
	return cpuRoundsOf(targets, rounds, func(t target) int64 {
		var chunks atomic.Int64
		var wg sync.WaitGroup
		for s := 0; s < 100; s++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _, n, _ := stream(ctx, t.url+path, nil)
				chunks.Add(int64(n))
			}()
		}
		wg.Wait()
		return chunks.Load()
	})
}

// cpuRequestRounds measures proxy CPU time per non-streamed request: 512
// requests a round, 32 in flight; see cpuRoundsOf.
func cpuRequestRounds(targets []target, rounds int) [][]float64 {
	return cpuRoundsOf(targets, rounds, func(t target) int64 {
		var ok atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < 32; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 16 {
					if plainRequest(t.url) {
						ok.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		return ok.Load()
	})
}

// cpuRoundsOf measures proxy CPU time per unit of work (the count work
// returns), in rounds that take the targets in turn, so that changes in
// the machine's load hit every target alike, and in reverse order every
// other round, so that no target always runs right after another one; it
// returns each target's value per round, in µs (0 for a target with no
// process to measure).
func cpuRoundsOf(targets []target, rounds int, work func(target) int64) [][]float64 {
	per := make([][]float64, len(targets))
	for i := range per {
		per[i] = make([]float64, rounds)
	}
	for round := 0; round < rounds; round++ {
		for j := range targets {
			i := j
			if round%2 == 1 {
				i = len(targets) - 1 - j
			}
			t := targets[i]
			if len(t.pids) == 0 {
				continue
			}
			cpu0 := cpuSeconds(t.pids)
			if n := work(t); n > 0 {
				per[i][round] = (cpuSeconds(t.pids) - cpu0) / float64(n) * 1e6
			}
		}
	}
	return per
}

// median returns the median of v (0 for none).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Sorted(slices.Values(v))
	return v[len(v)/2]
}

// pairedRatio compares a with b round by round (both measured under the
// same machine load): the median of a[i]/b[i], and the smallest and largest.
func pairedRatio(a, b []float64) (med, lo, hi float64) {
	var r []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			r = append(r, a[i]/b[i])
		}
	}
	if len(r) == 0 {
		return 0, 0, 0
	}
	return median(r), slices.Min(r), slices.Max(r)
}
