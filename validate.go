package llmstream

import (
	"errors"
	"fmt"
	"math"
	"path"
	"strings"
	"time"
)

// Checks made once for both ways of configuring the handler: Provision
// runs them on the JSON, and the Caddyfile parser runs the same ones on
// what it read, so a Caddyfile user gets the same message with its line
// number.

func checkStopEndpoint(p string) error { return checkEndpointPath("stop_endpoint", p) }

func checkEndpointPath(name, p string) error {
	if !strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.ContainsAny(p, "*?{}") {
		return fmt.Errorf("%s: must be a path such as /v1/%s (no trailing slash, no wildcards)", name, strings.TrimSuffix(name, "_endpoint"))
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

func checkPrice(p Price) error {
	if p.Model == "" {
		return errors.New("price: a model name or glob is required")
	}
	if _, err := path.Match(p.Model, ""); err != nil {
		return fmt.Errorf("price: '%s' is not a valid glob", p.Model)
	}
	for _, v := range []*float64{&p.Input, &p.Output, p.Cached, p.CacheWrite} {
		if v != nil && (*v < 0 || math.IsNaN(*v) || math.IsInf(*v, 0)) {
			return fmt.Errorf("price %s: prices are US dollars per million tokens, zero or more", p.Model)
		}
	}
	return nil
}

func checkKeyAffinity(a string) error {
	switch {
	case a == "", a == affinityAuto, a == affinityCacheKey, a == affinityUser, a == affinityPrefix:
		return nil
	case strings.HasPrefix(a, affinityHeader) && len(a) > len(affinityHeader):
		return nil
	}
	return fmt.Errorf("key_affinity: %q is not auto, prompt_cache_key, user, prefix or header:<name>", a)
}
