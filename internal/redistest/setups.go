package redistest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// binary finds a Redis program, skipping the test when it is missing
// (failing under CI, which must install it).
func binary(t testing.TB, name string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed (CI must install it)", name)
		}
		t.Skipf("%s is not installed", name)
	}
	return bin
}

// freePort returns a free loopback port.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// run starts a Redis program and stops it when the test ends.
func run(t testing.TB, bin string, args ...string) *Server {
	t.Helper()
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &Server{cmd: cmd}
	t.Cleanup(s.Stop)
	return s
}

// waitPort waits until something listens on addr.
func waitPort(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", addr)
}

// StartArgs runs redis-server on a free loopback port with extra
// arguments (e.g. --requirepass).
func StartArgs(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin := binary(t, "redis-server")
	port := freePort(t)
	args := append([]string{"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no",
		"--dir", t.TempDir()}, extra...)
	s := run(t, bin, args...)
	s.Addr = "127.0.0.1:" + strconv.Itoa(port)
	waitPort(t, s.Addr)
	return s
}

// TLSServer is a redis-server that speaks TLS only, with a CA made for the
// test.
type TLSServer struct {
	*Server
	CAFile string
}

// StartTLS runs redis-server with TLS only, its certificate signed by a CA
// made here (written to CAFile).
func StartTLS(t testing.TB) *TLSServer {
	t.Helper()
	bin := binary(t, "redis-server")
	dir := t.TempDir()
	caFile, certFile, keyFile := writeCerts(t, dir)
	port := freePort(t)
	s := run(t, bin, "--bind", "127.0.0.1", "--port", "0", "--tls-port", strconv.Itoa(port),
		"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", caFile,
		"--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", dir)
	s.Addr = "127.0.0.1:" + strconv.Itoa(port)
	waitPort(t, s.Addr)
	return &TLSServer{Server: s, CAFile: caFile}
}

// writeCerts makes a CA and a server certificate for 127.0.0.1.
func writeCerts(t testing.TB, dir string) (ca, cert, key string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "redistest CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	ca, cert, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	write := func(path, typ string, der []byte) {
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(ca, "CERTIFICATE", caDER)
	write(cert, "CERTIFICATE", srvDER)
	write(key, "EC PRIVATE KEY", keyDER)
	return ca, cert, key
}

// Sentinel is a master, one replica and one sentinel watching them.
type Sentinel struct {
	Master, Replica *Server
	Addr            string // the sentinel's
	Name            string // the master name
	cli             string
	// redis-cli arguments that authenticate
	sentinelAuth, masterAuth []string
}

func cliAuth(pw string) []string {
	if pw == "" {
		return nil
	}
	return []string{"--no-auth-warning", "-a", pw}
}

// sentinelCmd runs redis-cli against the sentinel.
func (s *Sentinel) sentinelCmd(ctx context.Context, args ...string) *exec.Cmd {
	_, port, _ := net.SplitHostPort(s.Addr)
	return exec.CommandContext(ctx, s.cli, append(append([]string{"-p", port}, s.sentinelAuth...), args...)...)
}

// StartSentinel runs a master, a replica of it and a sentinel that fails
// over after one second without the master.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	return StartProtectedSentinel(t, "", "")
}

// StartProtectedSentinel is StartSentinel with a password on the master and
// replica (masterPW) and one on the sentinel itself (sentinelPW); either
// may be empty.
func StartProtectedSentinel(t testing.TB, masterPW, sentinelPW string) *Sentinel {
	t.Helper()
	sentinelBin := binary(t, "redis-sentinel")
	cli := binary(t, "redis-cli")
	var auth []string
	if masterPW != "" {
		auth = []string{"--requirepass", masterPW, "--masterauth", masterPW}
	}
	master := StartArgs(t, auth...)
	replica := StartArgs(t, append(auth, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port()))...)
	port := freePort(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf")
	cfg := "port " + strconv.Itoa(port) + "\nbind 127.0.0.1\ndir " + dir + "\n" +
		"sentinel monitor llm 127.0.0.1 " + strconv.Itoa(master.Port()) + " 1\n" +
		"sentinel down-after-milliseconds llm 1000\n" +
		"sentinel failover-timeout llm 5000\n"
	if masterPW != "" {
		cfg += "sentinel auth-pass llm " + masterPW + "\n"
	}
	if sentinelPW != "" {
		cfg += "requirepass " + sentinelPW + "\n"
	}
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, sentinelBin, conf)
	s := &Sentinel{Master: master, Replica: replica, Addr: "127.0.0.1:" + strconv.Itoa(port), Name: "llm", cli: cli,
		sentinelAuth: cliAuth(sentinelPW), masterAuth: cliAuth(masterPW)}
	waitPort(t, s.Addr)
	// Wait until the replica is in sync and the sentinel knows it.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := s.sentinelCmd(context.Background(), "sentinel", "replicas", "llm").Output()
		if strings.Contains(string(out), strconv.Itoa(replica.Port())) && strings.Contains(string(out), "slave") {
			info, _ := exec.Command(cli, append(append([]string{"-p", strconv.Itoa(replica.Port())}, s.masterAuth...), "info", "replication")...).Output()
			if strings.Contains(string(info), "master_link_status:up") {
				return s
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("the sentinel set-up did not come up")
	return nil
}

// Failover forces the sentinel to promote the replica, and waits until it
// reports the replica as master.
func (s *Sentinel) Failover(t testing.TB, ctx context.Context) {
	t.Helper()
	// A sentinel that has not yet judged the replica good enough answers
	// NOGOODSLAVE; ask again until it accepts.
	for {
		out, err := s.sentinelCmd(ctx, "sentinel", "failover", s.Name).CombinedOutput()
		if err == nil && strings.Contains(string(out), "OK") {
			break
		}
		if ctx.Err() != nil {
			t.Errorf("sentinel failover: %v %s", err, out)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.waitPromoted(t, ctx)
}

// KillMaster kills the master (SIGKILL, as a crash or an OOM kill would)
// and waits until the sentinel promoted the replica.
func (s *Sentinel) KillMaster(t testing.TB, ctx context.Context) {
	t.Helper()
	s.Master.Stop()
	s.waitPromoted(t, ctx)
}

// waitPromoted waits until the sentinel reports the replica as master.
func (s *Sentinel) waitPromoted(t testing.TB, ctx context.Context) {
	t.Helper()
	for ctx.Err() == nil {
		out, _ := s.sentinelCmd(ctx, "sentinel", "get-master-addr-by-name", s.Name).Output()
		if strings.Contains(string(out), strconv.Itoa(s.Replica.Port())) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Error("the sentinel did not promote the replica")
}

// Cluster is a Redis Cluster of three masters on loopback.
type Cluster struct {
	Addrs []string
}

// StartCluster runs three cluster nodes (on ports whose +10000 bus port is
// free too) and joins them with redis-cli --cluster create.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	bin := binary(t, "redis-server")
	cli := binary(t, "redis-cli")
	c := &Cluster{}
	for len(c.Addrs) < 3 {
		port := freePort(t)
		if port+10000 > 65535 {
			continue
		}
		if l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+10000)); err != nil {
			continue
		} else {
			l.Close()
		}
		dir := t.TempDir()
		s := run(t, bin, "--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(dir, "nodes.conf"), "--cluster-node-timeout", "2000",
			"--save", "", "--appendonly", "no", "--dir", dir)
		s.Addr = "127.0.0.1:" + strconv.Itoa(port)
		waitPort(t, s.Addr)
		c.Addrs = append(c.Addrs, s.Addr)
	}
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.Command(cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		_, port, _ := net.SplitHostPort(c.Addrs[0])
		out, _ := exec.Command(cli, "-p", port, "cluster", "info").Output()
		if strings.Contains(string(out), "cluster_state:ok") {
			return c
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("the cluster did not become ok")
	return nil
}
