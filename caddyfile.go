package llmstream

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/dustin/go-humanize"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/cfparse"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/redact"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("llm_stream", parseCaddyfile)
	// Ordered like reverse_proxy, so no `order` global option is needed.
	httpcaddyfile.RegisterDirectiveOrder("llm_stream", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	llm_stream [<matcher>] [<upstream_url>] {
//	    upstream            <base_url>
//	    api_key             <key>
//	    header_up           [+|-]<field> [<value>]
//	    dial_timeout        <duration>
//	    first_byte_timeout  <duration>
//	    idle_timeout        <duration>
//	    heartbeat           <duration>|off
//	    max_request_body    <size>
//	    transport http {
//	        ...
//	    }
//	    upstream <base_url> {
//	        provider      openai|azure|anthropic|gemini
//	        api_key       <key> [<key>...]
//	        api_version   <version>
//	        models        <name|glob>...
//	        rename        <client_model> <upstream_model>
//	        weight        <n>
//	        priority      <n>
//	        header_up     [+|-]<field> [<value>]
//	        forward_proxy <url>
//	    }
//	    retries             <n>
//	    retry_on            connect|timeout|<status>...
//	    retry_backoff       <base> <max>
//	    unhealthy_after     <n> <cooldown>
//	    first_token_timeout <duration>
//	    route {
//	        if `<expression>` model <name>
//	        default model <name>
//	    }
//	    route_models        <name>...
//	    key_affinity        auto|prompt_cache_key|user|prefix|header <name>|off
//	    response_ttl        <duration>
//	    client_key          <key>|sha256:<hex> [<name>]
//	    client_keys_file    <path>
//	    identity            <placeholder>
//	    allow_models        <name|glob>...
//	    allow_paths         <path|glob>...
//	    price <model|glob> input <usd_per_1M> output <usd_per_1M> [cached <usd_per_1M>] [cache_write <usd_per_1M>]
//	    prices_file <path>
//	    limit {
//	        requests   <n> <window>
//	        tokens     <n> <window>
//	        spend      <usd> <window>
//	        concurrent <n>
//	        slot_lease <duration>
//	    }
//	    store memory
//	    store redis <address|url>... [<db>] {
//	        sentinel <master_name>
//	        sentinel_password <secret>
//	        username <name>
//	        password <secret>
//	        tls [{ ca <file>; insecure_skip_verify }]
//	        prefix   <prefix>
//	        fail     open|closed
//	    }
//	    on_disconnect       cancel|drain [<max_duration>]
//	    log_prompts         off|redacted|full
//	    log_prompts sealed {
//	        recipient <age_public_key|file>...
//	    }
//	    redact              phone|id_card|email|api_key...
//	    deny_words          <word>...
//	    deny_words_file     <path>
//	    deny_words_scope    request|response|both
//	    cache <ttl> {
//	        max_size           <size>
//	        store              memory|redis
//	        only_deterministic on|off
//	        scope              global|identity
//	        replay             instant|paced
//	    }
//	    stop_endpoint  <path>
//	    usage_endpoint <path>
//	    smooth         <max_chars> <interval>
//	    websocket [<path>] {
//	        api_path      <path>
//	        default_model <model>
//	        ping_interval <duration>|off
//	        origins       <host_pattern>...
//	    }
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	var ups []*Upstream
	blocks := false
	if d.NextArg() {
		if _, err := parseBaseURL(d.Val()); err != nil {
			return d.Err(err.Error())
		}
		ups = append(ups, &Upstream{URL: d.Val()})
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] && opt != "upstream" && !subdirectives[opt].repeatable {
			return d.Errf("%s already specified", opt)
		}
		seen[opt] = true
		switch sub, ok := subdirectives[opt]; {
		case opt == "upstream":
			u, block, err := parseUpstream(d)
			if err != nil {
				return err
			}
			blocks = blocks || block
			ups = append(ups, u)
		case !ok:
			return d.Errf("unrecognized subdirective '%s'", opt)
		default:
			if err := sub.parse(h, d); err != nil {
				return err
			}
		}
	}
	switch {
	case len(ups) == 0:
		return d.Err(errNoUpstream.Error())
	case len(ups) == 1 && !blocks:
		h.Upstream = ups[0].URL // the single-upstream form
	default:
		if h.APIKey != "" {
			return d.Err(errKeyInBlocks.Error())
		}
		h.Upstreams = ups
	}
	return nil
}

// subdirective parses one line (or block) of the llm_stream directive into
// the handler's config: syntax only; what the values mean is checked once,
// in Provision and Validate, for Caddyfile and JSON alike.
type subdirective struct {
	parse      func(h *Handler, d *caddyfile.Dispenser) error
	repeatable bool // may be given more than once; each adds to the list
}

// subdirectives are the llm_stream options but upstream, which shapes the
// topology and is read by UnmarshalCaddyfile itself.
var subdirectives = map[string]subdirective{
	"route":               {parse: parseRouteOption},
	"route_models":        {parse: parseRouteModelsOption},
	"price":               {parse: parsePriceOption, repeatable: true},
	"prices_file":         {parse: parsePricesFileOption},
	"response_ttl":        {parse: parseResponseTTLOption},
	"usage_endpoint":      {parse: parseUsageEndpointOption},
	"client_key":          {parse: parseClientKeyOption, repeatable: true},
	"client_keys_file":    {parse: parseClientKeysFileOption},
	"identity":            {parse: parseIdentityOption},
	"allow_models":        {parse: parseAllowModels, repeatable: true},
	"allow_paths":         {parse: parseAllowPaths, repeatable: true},
	"limit":               {parse: parseLimitOption},
	"store":               {parse: parseStoreOption},
	"cache":               {parse: parseCacheOption},
	"stop_endpoint":       {parse: parseStopEndpointOption},
	"smooth":              {parse: parseSmoothOption},
	"websocket":           {parse: parseWebSocketOption},
	"on_disconnect":       {parse: parseOnDisconnectOption},
	"log_prompts":         {parse: parseLogPromptsOption},
	"redact":              {parse: parseRedactOption},
	"deny_words":          {parse: parseDenyWordsOption, repeatable: true},
	"deny_words_file":     {parse: parseDenyWordsFileOption},
	"deny_words_scope":    {parse: parseDenyWordsScopeOption},
	"retries":             {parse: parseRetriesOption},
	"retry_on":            {parse: parseRetryOnOption},
	"retry_backoff":       {parse: parseRetryBackoffOption},
	"unhealthy_after":     {parse: parseUnhealthyAfterOption},
	"first_token_timeout": {parse: parseFirstTokenTimeoutOption},
	"key_affinity":        {parse: parseKeyAffinityOption},
	"api_key":             {parse: parseAPIKeyOption},
	"header_up":           {parse: parseHeaderUpOption, repeatable: true},
	"dial_timeout":        {parse: parseDialTimeoutOption},
	"first_byte_timeout":  {parse: parseFirstByteTimeoutOption},
	"idle_timeout":        {parse: parseIdleTimeoutOption},
	"heartbeat":           {parse: parseHeartbeatOption},
	"max_request_body":    {parse: parseMaxRequestBodyOption},
	"transport":           {parse: parseTransportOption},
}

func parseClientKeyOption(h *Handler, d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 1 || len(args) > 2 {
		return d.ArgErr()
	}
	name := ""
	if len(args) == 2 {
		name = args[1]
	}
	// Only the digest goes into the JSON config, never the key.
	k, err := parseClientKey(args[0], name)
	if err != nil {
		return d.Errf("client_key: %v", err)
	}
	h.ClientKeys = append(h.ClientKeys, k)
	return nil
}

func parseClientKeysFileOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.ClientKeysFile = d.Val()
	return nil
}

func parseIdentityOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.Identity = d.Val()
	return nil
}

func parseAllowModels(h *Handler, d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.ArgErr()
	}
	h.AllowModels = append(h.AllowModels, args...)
	return nil
}

func parseAllowPaths(h *Handler, d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.ArgErr()
	}
	h.AllowPaths = append(h.AllowPaths, args...)
	return nil
}

// parseRouteOption reads
//
//	route {
//	    if `<expression>` model <name>
//	    default model <name>
//	}
//
// The expression is compiled here too, so that a bad one fails with its
// line.
func parseRouteOption(h *Handler, d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	h.Route = new(RouteRules)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "if":
			args := d.RemainingArgs()
			if len(args) != 3 || args[1] != "model" {
				return d.Err("route: want if `<expression>` model <name>")
			}
			if _, err := compileRouteExpr(args[0]); err != nil {
				return d.Err(err.Error())
			}
			h.Route.Rules = append(h.Route.Rules, RouteRule{If: args[0], Model: args[2]})
		case "default":
			args := d.RemainingArgs()
			if len(args) != 2 || args[0] != "model" {
				return d.Err("route: want default model <name>")
			}
			h.Route.Default = args[1]
		default:
			return d.Errf("route: unrecognized '%s' (want if or default)", d.Val())
		}
	}
	if len(h.Route.Rules) == 0 && h.Route.Default == "" {
		return d.Err("route: no rule and no default")
	}
	return nil
}

func parseRouteModelsOption(h *Handler, d *caddyfile.Dispenser) error {
	h.RouteModels = d.RemainingArgs()
	if len(h.RouteModels) == 0 {
		return d.ArgErr()
	}
	return nil
}

// parsePriceOption reads `price <model|glob> input <usd_per_1M> output
// <usd_per_1M> [cached <usd_per_1M>] [cache_write <usd_per_1M>]`.
func parsePriceOption(h *Handler, d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 5 || len(args)%2 == 0 {
		return d.ArgErr()
	}
	p := Price{Model: args[0]}
	seen := map[string]bool{}
	for i := 1; i+1 < len(args); i += 2 {
		v, err := strconv.ParseFloat(strings.TrimPrefix(args[i+1], "$"), 64)
		if err != nil {
			return d.Errf("price %s: bad %s price '%s' (US dollars per million tokens)", p.Model, args[i], args[i+1])
		}
		if seen[args[i]] {
			return d.Errf("price %s: %s given twice", p.Model, args[i])
		}
		seen[args[i]] = true
		switch args[i] {
		case "input":
			p.Input = v
		case "output":
			p.Output = v
		case "cached":
			p.Cached = &v
		case "cache_write":
			p.CacheWrite = &v
		default:
			return d.Errf("price %s: '%s' is not input, output, cached or cache_write", p.Model, args[i])
		}
	}
	if !seen["input"] || !seen["output"] {
		return d.Errf("price %s: input and output prices are required", p.Model)
	}
	if err := checkPrice(p); err != nil {
		return d.Err(err.Error())
	}
	h.Prices = append(h.Prices, p)
	return nil
}

func parsePricesFileOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.PricesFile = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func parseUsageEndpointOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.UsageEndpoint = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	if err := checkEndpointPath("usage_endpoint", h.UsageEndpoint); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

func parseResponseTTLOption(h *Handler, d *caddyfile.Dispenser) error {
	return cfparse.Duration(d, &h.ResponseTTL)
}

func parseLimitOption(h *Handler, d *caddyfile.Dispenser) error {
	l, err := parseLimit(d)
	if err != nil {
		return err
	}
	h.Limit = l
	return nil
}

func parseStoreOption(h *Handler, d *caddyfile.Dispenser) error {
	sc, err := parseStore(d)
	if err != nil {
		return err
	}
	h.Store = sc
	return nil
}

func parseCacheOption(h *Handler, d *caddyfile.Dispenser) error {
	cc, err := parseCache(d)
	if err != nil {
		return err
	}
	h.Cache = cc
	return nil
}

func parseStopEndpointOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.StopEndpoint = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	if err := checkStopEndpoint(h.StopEndpoint); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

func parseSmoothOption(h *Handler, d *caddyfile.Dispenser) error {
	sc, err := parseSmooth(d)
	if err != nil {
		return err
	}
	h.Smooth = sc
	return nil
}

func parseWebSocketOption(h *Handler, d *caddyfile.Dispenser) error {
	wc, err := parseWebSocket(d)
	if err != nil {
		return err
	}
	h.WebSocket = wc
	return nil
}

func parseOnDisconnectOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	switch d.Val() {
	case "cancel":
		h.OnDisconnect = "cancel"
		if d.NextArg() {
			return d.ArgErr()
		}
	case "drain":
		h.OnDisconnect = "drain"
		if d.NextArg() {
			d.Prev()
			if err := cfparse.Duration(d, &h.DrainMax); err != nil {
				return err
			}
		}
	default:
		return d.Errf("on_disconnect: '%s' is not cancel or drain", d.Val())
	}
	return nil
}

func parseLogPromptsOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	switch v := d.Val(); v {
	case "off", "redacted", "full":
		h.LogPrompts = v
	case "sealed":
		h.LogPrompts = v
		h.Seal = new(SealConfig)
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			if d.Val() != "recipient" {
				return d.Errf("log_prompts sealed: unrecognized '%s' (want recipient)", d.Val())
			}
			keys := d.RemainingArgs()
			if len(keys) == 0 {
				return d.ArgErr()
			}
			h.Seal.Recipients = append(h.Seal.Recipients, keys...)
		}
		if len(h.Seal.Recipients) == 0 {
			return d.Err("log_prompts sealed: at least one recipient is required")
		}
		return nil
	default:
		return d.Errf("log_prompts: '%s' is not off, redacted, full or sealed", v)
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func parseRedactOption(h *Handler, d *caddyfile.Dispenser) error {
	h.Redact = d.RemainingArgs()
	if len(h.Redact) == 0 {
		return d.ArgErr()
	}
	for _, k := range h.Redact {
		if !redact.Valid(k) {
			return d.Errf("redact: '%s' is not phone, id_card, email or api_key", k)
		}
	}
	return nil
}

func parseDenyWordsOption(h *Handler, d *caddyfile.Dispenser) error {
	words := d.RemainingArgs()
	if len(words) == 0 {
		return d.ArgErr()
	}
	h.DenyWords = append(h.DenyWords, words...)
	return nil
}

func parseDenyWordsFileOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.DenyWordsFile = d.Val()
	return nil
}

func parseDenyWordsScopeOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	switch v := d.Val(); v {
	case "request", "response", "both":
		h.DenyWordsScope = v
	default:
		return d.Errf("deny_words_scope: '%s' is not request, response or both", v)
	}
	return nil
}

func parseRetriesOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n < 0 {
		return d.Errf("bad retries value '%s'", d.Val())
	}
	h.Retries = &n
	return nil
}

func parseRetryOnOption(h *Handler, d *caddyfile.Dispenser) error {
	h.RetryOn = d.RemainingArgs()
	if len(h.RetryOn) == 0 {
		return d.ArgErr()
	}
	for _, o := range h.RetryOn {
		if c, err := strconv.Atoi(o); o != "connect" && o != "timeout" && (err != nil || c < 400 || c > 599) {
			return d.Errf("retry_on: '%s' is not connect, timeout or a 4xx/5xx status", o)
		}
	}
	return nil
}

func parseRetryBackoffOption(h *Handler, d *caddyfile.Dispenser) error {
	if err := cfparse.DurationArg(d, &h.RetryBackoff); err != nil {
		return err
	}
	if err := cfparse.Duration(d, &h.RetryBackoffMax); err != nil {
		return err
	}
	if h.RetryBackoffMax < h.RetryBackoff {
		return d.Err("retry_backoff: the maximum is below the base")
	}
	return nil
}

func parseUnhealthyAfterOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n <= 0 {
		return d.Errf("bad unhealthy_after count '%s'", d.Val())
	}
	h.UnhealthyAfter = n
	if err := cfparse.Duration(d, &h.UnhealthyCooldown); err != nil {
		return err
	}
	return nil
}

func parseFirstTokenTimeoutOption(h *Handler, d *caddyfile.Dispenser) error {
	if err := cfparse.Duration(d, &h.FirstTokenTimeout); err != nil {
		return err
	}
	return nil
}

func parseKeyAffinityOption(h *Handler, d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	switch {
	case len(args) == 1 && args[0] == "off":
		h.KeyAffinity = ""
	case len(args) == 1 && args[0] != "header":
		h.KeyAffinity = args[0]
	case len(args) == 2 && args[0] == "header":
		h.KeyAffinity = affinityHeader + args[1]
	default:
		return d.Err("key_affinity: want auto, prompt_cache_key, user, prefix, 'header <name>' or off")
	}
	if err := checkKeyAffinity(h.KeyAffinity); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

func parseAPIKeyOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.APIKey = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func parseHeaderUpOption(h *Handler, d *caddyfile.Dispenser) error {
	if h.HeaderUp == nil {
		h.HeaderUp = new(headers.HeaderOps)
	}
	if err := parseHeaderOp(d, h.HeaderUp); err != nil {
		return err
	}
	return nil
}

func parseDialTimeoutOption(h *Handler, d *caddyfile.Dispenser) error {
	if err := cfparse.Duration(d, &h.DialTimeout); err != nil {
		return err
	}
	return nil
}

func parseFirstByteTimeoutOption(h *Handler, d *caddyfile.Dispenser) error {
	if err := cfparse.Duration(d, &h.FirstByteTimeout); err != nil {
		return err
	}
	return nil
}

func parseIdleTimeoutOption(h *Handler, d *caddyfile.Dispenser) error {
	if err := cfparse.Duration(d, &h.IdleTimeout); err != nil {
		return err
	}
	return nil
}

func parseHeartbeatOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	if d.Val() == "off" {
		h.Heartbeat = -1
		if d.NextArg() {
			return d.ArgErr()
		}
		return nil
	}
	d.Prev()
	if err := cfparse.Duration(d, &h.Heartbeat); err != nil {
		return err
	}
	if h.Heartbeat == 0 {
		return d.Err("heartbeat: use 'off' to turn heartbeats off")
	}
	return nil
}

func parseMaxRequestBodyOption(h *Handler, d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	size, err := humanize.ParseBytes(d.Val())
	if err != nil || size == 0 {
		return d.Errf("bad size value '%s'", d.Val())
	}
	h.MaxRequestBody = int64(size)
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func parseTransportOption(h *Handler, d *caddyfile.Dispenser) error {
	raw, err := parseTransport(d)
	if err != nil {
		return err
	}
	h.TransportRaw = raw
	return nil
}

// parseLimit reads a `limit { requests <n> <window>; tokens <n> <window>;
// concurrent <n> }` block.
func parseLimit(d *caddyfile.Dispenser) (*Limits, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	l := new(Limits)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if opt == "slot_lease" {
			if err := cfparse.Duration(d, &l.SlotLease); err != nil {
				return nil, err
			}
			continue
		}
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		if opt == "spend" {
			usd, err := strconv.ParseFloat(strings.TrimPrefix(d.Val(), "$"), 64)
			if err != nil || usd <= 0 || math.IsInf(usd, 0) {
				return nil, d.Errf("limit spend: bad amount of US dollars '%s'", d.Val())
			}
			l.Spend = usd
			if err := cfparse.Duration(d, &l.SpendWindow); err != nil {
				return nil, err
			}
			continue
		}
		n, err := strconv.ParseInt(d.Val(), 10, 64)
		if err != nil || n <= 0 {
			return nil, d.Errf("limit %s: bad count '%s'", opt, d.Val())
		}
		switch opt {
		case "requests":
			l.Requests = n
			err = cfparse.Duration(d, &l.RequestWindow)
		case "tokens":
			l.Tokens = n
			err = cfparse.Duration(d, &l.TokenWindow)
		case "concurrent":
			l.Concurrent = n
			if d.NextArg() {
				err = d.ArgErr()
			}
		default:
			return nil, d.Errf("unrecognized limit '%s'", opt)
		}
		if err != nil {
			return nil, err
		}
	}
	if l.Requests == 0 && l.Tokens == 0 && l.Concurrent == 0 && l.Spend == 0 {
		return nil, d.Err("limit: set requests, tokens, concurrent or spend")
	}
	return l, nil
}

// parseStore reads `store memory` or
//
//	store redis <address|url>... [<db>] {
//	    sentinel <master_name>
//	    username <name>
//	    password <secret>
//	    tls [{ ca <file>; insecure_skip_verify }]
//	    prefix   <prefix>
//	    fail     open|closed
//	}
func parseStore(d *caddyfile.Dispenser) (*StoreConfig, error) {
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	switch d.Val() {
	case "memory":
		if d.NextArg() {
			return nil, d.ArgErr()
		}
		return nil, nil
	case "redis":
	default:
		return nil, d.Errf("store: '%s' is not memory or redis", d.Val())
	}
	sc := new(StoreConfig)
	args := d.RemainingArgs()
	if len(args) == 0 {
		return nil, d.ArgErr()
	}
	if len(args) > 1 {
		if db, err := strconv.Atoi(args[len(args)-1]); err == nil {
			if db < 0 {
				return nil, d.Errf("store: bad database number '%d'", db)
			}
			sc.DB, args = db, args[:len(args)-1]
		}
	}
	if len(args) == 1 {
		sc.Redis = args[0] // the form every version accepts
	} else {
		sc.Addresses = args
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if opt == "tls" {
			t, err := parseStoreTLS(d)
			if err != nil {
				return nil, err
			}
			sc.TLS = t
			continue
		}
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		switch opt {
		case "sentinel":
			sc.Sentinel = d.Val()
		case "sentinel_password":
			sc.SentinelPassword = d.Val()
		case "username":
			sc.Username = d.Val()
		case "password":
			sc.Password = d.Val()
		case "prefix":
			sc.Prefix = d.Val()
		case "fail":
			switch d.Val() {
			case "open":
				sc.FailOpen = true
			case "closed":
				sc.FailOpen = false
			default:
				return nil, d.Errf("store: fail '%s' is not open or closed", d.Val())
			}
		default:
			return nil, d.Errf("store: unrecognized option '%s'", opt)
		}
		if d.NextArg() {
			return nil, d.ArgErr()
		}
	}
	return sc, nil
}

// parseStoreTLS reads `tls` or `tls { ca <file>; insecure_skip_verify }`.
func parseStoreTLS(d *caddyfile.Dispenser) (*StoreTLS, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	t := new(StoreTLS)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "ca":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			t.CA = d.Val()
		case "insecure_skip_verify":
			t.InsecureSkipVerify = true
		default:
			return nil, d.Errf("store tls: unrecognized option '%s'", d.Val())
		}
		if d.NextArg() {
			return nil, d.ArgErr()
		}
	}
	return t, nil
}

// parseCache reads `cache <ttl> { … }`.
func parseCache(d *caddyfile.Dispenser) (*CacheConfig, error) {
	cc := new(CacheConfig)
	if err := cfparse.Duration(d, &cc.TTL); err != nil {
		return nil, err
	}
	if err := checkCacheTTL(time.Duration(cc.TTL)); err != nil {
		return nil, d.Err(err.Error())
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return nil, d.Errf("cache: %s already specified", opt)
		}
		seen[opt] = true
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		v := d.Val()
		if d.NextArg() {
			return nil, d.ArgErr()
		}
		oneOf := func(field *string, allowed ...string) error {
			for _, a := range allowed {
				if v == a {
					*field = v
					return nil
				}
			}
			return d.Errf("cache: %s '%s' is not %s", opt, v, strings.Join(allowed, " or "))
		}
		var err error
		switch opt {
		case "max_size":
			size, perr := humanize.ParseBytes(v)
			if perr != nil || size == 0 {
				return nil, d.Errf("cache: bad size value '%s'", v)
			}
			cc.MaxSize = int64(size)
		case "store":
			err = oneOf(&cc.Store, "memory", "redis")
		case "only_deterministic":
			var on string
			if err = oneOf(&on, "on", "off"); err == nil {
				b := on == "on"
				cc.OnlyDeterministic = &b
			}
		case "scope":
			err = oneOf(&cc.Scope, "global", "identity")
		case "replay":
			err = oneOf(&cc.Replay, "instant", "paced")
		default:
			return nil, d.Errf("cache: unknown option '%s'", opt)
		}
		if err != nil {
			return nil, err
		}
	}
	return cc, nil
}

// parseUpstream reads `upstream <base_url> [{ ... }]`; block reports
// whether it had a block.
func parseUpstream(d *caddyfile.Dispenser) (*Upstream, bool, error) {
	if !d.NextArg() {
		return nil, false, d.ArgErr()
	}
	u := &Upstream{URL: d.Val()}
	if _, err := parseBaseURL(u.URL); err != nil {
		return nil, false, d.Err(err.Error())
	}
	if d.NextArg() {
		return nil, false, d.ArgErr()
	}
	block := false
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		block = true
		opt := d.Val()
		if seen[opt] && opt != "header_up" && opt != "api_key" && opt != "rename" && opt != "models" {
			return nil, false, d.Errf("%s already specified", opt)
		}
		seen[opt] = true
		if err := parseUpstreamOption(d, u, opt); err != nil {
			return nil, false, err
		}
	}
	return u, block, nil
}

// parseUpstreamOption reads one subdirective of an upstream block.
func parseUpstreamOption(d *caddyfile.Dispenser, u *Upstream, opt string) error {
	switch opt {
	case "provider":
		if !d.NextArg() {
			return d.ArgErr()
		}
		u.Provider = d.Val()
		if err := checkProvider(u.Provider); err != nil {
			return d.Err(err.Error())
		}
	case "api_key":
		keys := d.RemainingArgs()
		if len(keys) == 0 {
			return d.ArgErr()
		}
		u.APIKeys = append(u.APIKeys, keys...)
	case "api_version":
		if !d.NextArg() {
			return d.ArgErr()
		}
		u.APIVersion = d.Val()
	case "models":
		ms := d.RemainingArgs()
		if len(ms) == 0 {
			return d.ArgErr()
		}
		u.Models = append(u.Models, ms...)
	case "rename":
		args := d.RemainingArgs()
		if len(args) != 2 {
			return d.ArgErr()
		}
		if u.Rename == nil {
			u.Rename = map[string]string{}
		}
		u.Rename[args[0]] = args[1]
	case "weight", "priority":
		if !d.NextArg() {
			return d.ArgErr()
		}
		n, err := strconv.Atoi(d.Val())
		if err != nil || (opt == "weight" && n <= 0) {
			return d.Errf("bad %s value '%s'", opt, d.Val())
		}
		if opt == "weight" {
			u.Weight = n
		} else {
			u.Priority = n
		}
	case "header_up":
		if u.HeaderUp == nil {
			u.HeaderUp = new(headers.HeaderOps)
		}
		if err := parseHeaderOp(d, u.HeaderUp); err != nil {
			return err
		}
	case "forward_proxy":
		if !d.NextArg() {
			return d.ArgErr()
		}
		u.ForwardProxy = d.Val()
	default:
		return d.Errf("unrecognized upstream subdirective '%s'", opt)
	}
	return nil
}

// parseSmooth reads `smooth <max_chars> <interval>`.
func parseSmooth(d *caddyfile.Dispenser) (*SmoothConfig, error) {
	sc := new(SmoothConfig)
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n <= 0 {
		return nil, d.Errf("smooth: max_chars '%s' is not a positive number", d.Val())
	}
	sc.MaxChars = n
	if err := cfparse.Duration(d, &sc.Interval); err != nil {
		return nil, err
	}
	if err := checkSmoothInterval(time.Duration(sc.Interval)); err != nil {
		return nil, d.Err(err.Error())
	}
	return sc, nil
}

// parseWebSocket reads `websocket [<path>] { ... }`.
func parseWebSocket(d *caddyfile.Dispenser) (*WebSocketConfig, error) {
	wc := new(WebSocketConfig)
	if d.NextArg() {
		wc.Path = d.Val()
		if err := checkWebSocketPath(wc.Path); err != nil {
			return nil, d.Err(err.Error())
		}
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "api_path", "default_model":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			if opt == "api_path" {
				wc.APIPath = d.Val()
			} else {
				wc.DefaultModel = d.Val()
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "ping_interval":
			if d.NextArg() && d.Val() == "off" {
				wc.PingInterval = -1
				if d.NextArg() {
					return nil, d.ArgErr()
				}
				continue
			}
			d.Prev()
			if err := cfparse.Duration(d, &wc.PingInterval); err != nil {
				return nil, err
			}
		case "origins":
			wc.OriginPatterns = append(wc.OriginPatterns, d.RemainingArgs()...)
			if len(wc.OriginPatterns) == 0 {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("websocket: unknown option '%s'", opt)
		}
	}
	return wc, nil
}

// parseHeaderOp reads `header_up [+|-]<field> [<value> [<replacement>]]`
// the way reverse_proxy does.
func parseHeaderOp(d *caddyfile.Dispenser, ops *headers.HeaderOps) error {
	args := d.RemainingArgs()
	var err error
	switch len(args) {
	case 1:
		err = headers.CaddyfileHeaderOp(ops, args[0], "", nil)
	case 2:
		err = headers.CaddyfileHeaderOp(ops, args[0], args[1], nil)
	case 3:
		err = headers.CaddyfileHeaderOp(ops, args[0], args[1], &args[2])
	default:
		return d.ArgErr()
	}
	if err != nil {
		return d.Err(err.Error())
	}
	return nil
}

// parseTransport reads `transport <name> { ... }` with the named
// reverse_proxy transport module's own Caddyfile syntax.
func parseTransport(d *caddyfile.Dispenser) (json.RawMessage, error) {
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	name := d.Val()
	mod, err := caddyfile.UnmarshalModule(d, "http.reverse_proxy.transport."+name)
	if err != nil {
		return nil, err
	}
	return caddyconfig.JSONModuleObject(mod, "protocol", name, nil), nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
