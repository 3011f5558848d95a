package llmstream

import (
	"encoding/json"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/dustin/go-humanize"
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
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		h.Upstream = d.Val()
		if _, err := parseBaseURL(h.Upstream); err != nil {
			return d.Err(err.Error())
		}
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] && opt != "header_up" {
			return d.Errf("%s already specified", opt)
		}
		seen[opt] = true
		switch opt {
		case "upstream":
			if h.Upstream != "" {
				return d.Err("upstream already specified")
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Upstream = d.Val()
			if _, err := parseBaseURL(h.Upstream); err != nil {
				return d.Err(err.Error())
			}
			if d.NextArg() {
				return d.ArgErr()
			}
		case "api_key":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.APIKey = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		case "header_up":
			if h.HeaderUp == nil {
				h.HeaderUp = new(headers.HeaderOps)
			}
			if err := parseHeaderOp(d, h.HeaderUp); err != nil {
				return err
			}
		case "dial_timeout":
			if err := parseDuration(d, &h.DialTimeout); err != nil {
				return err
			}
		case "first_byte_timeout":
			if err := parseDuration(d, &h.FirstByteTimeout); err != nil {
				return err
			}
		case "idle_timeout":
			if err := parseDuration(d, &h.IdleTimeout); err != nil {
				return err
			}
		case "heartbeat":
			if !d.NextArg() {
				return d.ArgErr()
			}
			if d.Val() == "off" {
				h.Heartbeat = -1
				if d.NextArg() {
					return d.ArgErr()
				}
				break
			}
			d.Prev()
			if err := parseDuration(d, &h.Heartbeat); err != nil {
				return err
			}
			if h.Heartbeat == 0 {
				return d.Err("heartbeat: use 'off' to turn heartbeats off")
			}
		case "max_request_body":
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
		case "transport":
			raw, err := parseTransport(d)
			if err != nil {
				return err
			}
			h.TransportRaw = raw
		default:
			return d.Errf("unrecognized subdirective '%s'", opt)
		}
	}
	if h.Upstream == "" {
		return d.Err("llm_stream: an upstream base URL is required")
	}
	return nil
}

// parseDuration reads one positive (or zero) duration argument.
func parseDuration(d *caddyfile.Dispenser, into *caddy.Duration) error {
	name := d.Val()
	if !d.NextArg() {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return d.Errf("bad duration value '%s': %v", d.Val(), err)
	}
	if dur < 0 {
		return d.Errf("%s: duration must not be negative, got %s", name, time.Duration(dur))
	}
	*into = caddy.Duration(dur)
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
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
	rt, ok := mod.(caddyfile.Unmarshaler)
	if !ok {
		return nil, d.Errf("transport module '%s' is not a Caddyfile unmarshaler", name)
	}
	return caddyconfig.JSONModuleObject(rt, "protocol", name, nil), nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
