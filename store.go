package llmstream

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/store"
)

// StoreConfig says where state shared by several instances lives: limits,
// key rests and upstream health, and with `cache { store redis }` cached
// answers and with `stop_endpoint` stop signals.
type StoreConfig struct {
	// One Redis address, `host:port` or a URL
	// (`redis://[user:password@]host:port/db`, `rediss://…` for TLS). The
	// form every version accepts; use either this or Addresses.
	// Placeholders such as `{env.REDIS_URL}` are resolved at load, and the
	// value never appears in logs or errors.
	Redis string `json:"redis,omitempty"`

	// Several addresses or URLs: the nodes of a Redis Cluster, or the
	// sentinels when Sentinel is set. Placeholders allowed.
	Addresses []string `json:"addresses,omitempty"`

	// Redis database number (not on a Cluster). Default: 0, or the URL's.
	DB int `json:"db,omitempty"`

	// The Sentinel master name: the addresses are sentinels, which tell
	// where the current master is.
	Sentinel string `json:"sentinel,omitempty"`

	// The sentinels' own password (their `requirepass`), when they have
	// one; placeholders allowed. Default: none, as sentinels usually
	// protect only the master.
	SentinelPassword string `json:"sentinel_password,omitempty"`

	// ACL user name. Default: the URL's, else none.
	Username string `json:"username,omitempty"`

	// Redis password; placeholders such as `{env.REDIS_PASSWORD}` allowed.
	// Default: the URL's, else none.
	Password string `json:"password,omitempty"`

	// Connect with TLS (a `rediss://` URL does too).
	TLS *StoreTLS `json:"tls,omitempty"`

	// Prefix of every key this module writes. Default: `llm_stream:`.
	Prefix string `json:"prefix,omitempty"`

	// When Redis cannot be reached: false (the default) refuses requests
	// with 503 (fail closed); true admits them without limits (fail open).
	// Either way it is logged.
	FailOpen bool `json:"fail_open,omitempty"`
}

// StoreTLS configures TLS to Redis.
type StoreTLS struct {
	// A PEM file of the CAs that signed the server's certificate. Default:
	// the system's roots.
	CA string `json:"ca,omitempty"`

	// Skip verifying the server's certificate (testing only).
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
}

// redisLog carries go-redis's own messages (a pool that cannot dial, a
// sentinel switching masters) into Caddy's log instead of stderr. They
// name addresses, never passwords.
type redisLog struct{}

func (redisLog) Printf(_ context.Context, format string, v ...any) {
	caddy.Log().Named("http.handlers.llm_stream.redis").Warn(strings.TrimPrefix(fmt.Sprintf(format, v...), "redis: "))
}

var setRedisLogger sync.Once

// usesRedis reports whether anything configured keeps state in Redis.
func (h *Handler) usesRedis() bool {
	return h.Store != nil && (h.Store.Redis != "" || len(h.Store.Addresses) > 0)
}

// provisionStore connects the `store redis` client, before everything that
// uses it (limits, route state, the cache, stop signals). The client is
// pooled by its settings: a reload that keeps them keeps the connections,
// and streams or WebSockets of the old config never meet a closed client.
func (h *Handler) provisionStore() error {
	if !h.usesRedis() {
		return nil
	}
	setRedisLogger.Do(func() { redis.SetLogger(redisLog{}) })
	sc := h.Store
	if sc.Redis != "" && len(sc.Addresses) > 0 {
		return errors.New("store: use either one address or several, not both")
	}
	opts := store.RedisOptions{DB: sc.DB, MasterName: sc.Sentinel, Prefix: h.redisPrefix()}
	addrs := sc.Addresses
	if sc.Redis != "" {
		addrs = []string{sc.Redis}
	}
	for i, a := range addrs {
		v, err := resolveSecret(a)
		if err != nil || v == "" {
			return fmt.Errorf("store: address %d: unresolvable or empty", i+1)
		}
		opts.Addrs = append(opts.Addrs, v)
	}
	var err error
	if opts.Username, err = resolveSecret(sc.Username); err != nil {
		return fmt.Errorf("store: username: %w", err)
	}
	if opts.Password, err = resolveSecret(sc.Password); err != nil {
		return fmt.Errorf("store: password: %w", err)
	}
	if opts.SentinelPassword, err = resolveSecret(sc.SentinelPassword); err != nil {
		return fmt.Errorf("store: sentinel_password: %w", err)
	}
	if sc.TLS != nil {
		if opts.TLS, err = sc.TLS.config(); err != nil {
			return err
		}
	}
	if len(opts.Addrs) > 1 && sc.Sentinel == "" && sc.DB != 0 {
		return errors.New("store: a Redis Cluster has only database 0")
	}
	key := redisKey(opts, sc.TLS)
	h.redisSettings = key
	h.redis, err = share(h, redisPool, key, func() (*store.Redis, func() error, error) {
		r, err := store.NewRedis(opts)
		if err != nil {
			return nil, nil, fmt.Errorf("store: %w", err)
		}
		return r, r.Close, nil
	})
	if err != nil {
		return err
	}
	kind := "server"
	switch {
	case sc.Sentinel != "":
		kind = "sentinel"
	case len(opts.Addrs) > 1:
		kind = "cluster"
	}
	// A fingerprint of the settings, never an address or a password.
	h.logger.Info("store redis", zap.String("kind", kind), zap.Int("addresses", len(opts.Addrs)),
		zap.Bool("tls", opts.TLS != nil || strings.Contains(strings.Join(opts.Addrs, " "), "rediss://")),
		zap.String("settings", key[:15]))
	return nil
}

// redisKey names a connection's settings in the pool (a digest: the
// settings hold a password).
func redisKey(o store.RedisOptions, t *StoreTLS) string {
	hash := sha256.New()
	for _, part := range append(o.Addrs, o.MasterName, o.SentinelPassword, strconv.Itoa(o.DB), o.Username, o.Password, o.Prefix) {
		hash.Write([]byte(part))
		hash.Write([]byte{0})
	}
	if t != nil {
		_, _ = fmt.Fprintf(hash, "tls %s %t", t.CA, t.InsecureSkipVerify)
	}
	return "sha256:" + hex.EncodeToString(hash.Sum(nil))
}

// config is the TLS configuration for Redis connections.
func (t *StoreTLS) config() (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: t.InsecureSkipVerify} //nolint:gosec // the operator's explicit choice
	if t.CA != "" {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return nil, fmt.Errorf("store: tls ca: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, errors.New("store: tls ca: no certificate in the file")
		}
	}
	return c, nil
}

// redisPrefix is the prefix of every Redis key this module writes.
func (h *Handler) redisPrefix() string {
	if h.Store != nil && h.Store.Prefix != "" {
		return h.Store.Prefix
	}
	return "llm_stream:"
}
