package llmstream

import (
	"errors"
	"strings"
	"time"
)

// Checks made once for both ways of configuring the handler: Provision
// runs them on the JSON, and the Caddyfile parser runs the same ones on
// what it read, so a Caddyfile user gets the same message with its line
// number.

func checkStopEndpoint(p string) error {
	if !strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.ContainsAny(p, "*?{}") {
		return errors.New("stop_endpoint: must be a path such as /v1/stop (no trailing slash, no wildcards)")
	}
	return nil
}

func checkWebSocketPath(p string) error {
	if p != "" && !strings.HasPrefix(p, "/") {
		return errors.New("websocket: the path must start with /")
	}
	return nil
}

func checkCacheTTL(ttl time.Duration) error {
	if ttl <= 0 {
		return errors.New("cache: a positive ttl is required")
	}
	return nil
}

func checkSmoothInterval(d time.Duration) error {
	if d <= 0 {
		return errors.New("smooth: interval must be positive")
	}
	return nil
}

func checkProvider(name string) error {
	if _, ok := dialects[name]; !ok {
		return errors.New("unknown provider '" + name + "' (want " + providerNames() + ")")
	}
	return nil
}

var (
	errNoUpstream  = errors.New("upstream: a base URL is required")
	errKeyInBlocks = errors.New("api_key: with upstream blocks, set api_key inside each block")
)
