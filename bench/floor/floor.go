// Package floor is a Caddy HTTP handler for the benchmark only, never built
// into the plugin's Caddy: the least a Caddy handler can do to relay a
// stream. It forwards the request through Caddy's own `http` transport
// (the one llm_stream and reverse_proxy use), then reads the answer into a
// pooled buffer (1 KiB, 32 KiB once a read fills it) and writes and
// flushes every read, with nothing else: no request parsing, no usage, no
// timers, no logs.
//
// Its figures in bench/run.sh are what Caddy, net/http and the transport
// themselves cost per stream and per chunk, so they bound from below what
// any proxy inside Caddy can reach, llm_stream and reverse_proxy alike.
package floor

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Floor{})
	httpcaddyfile.RegisterHandlerDirective("bench_floor", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("bench_floor", httpcaddyfile.Before, "reverse_proxy")
}

// Floor relays every request to one upstream with as little work as a
// Caddy handler can do.
type Floor struct {
	// The upstream's base URL; the request's path and query are appended.
	Upstream string `json:"upstream"`

	// Sent as the Authorization header's bearer token.
	APIKey string `json:"api_key,omitempty"`

	// Caddy's transport module (`http.reverse_proxy.transport`); default
	// the `http` transport.
	TransportRaw json.RawMessage `json:"transport,omitempty" caddy:"namespace=http.reverse_proxy.transport inline_key=protocol"`

	base string
	rt   http.RoundTripper
}

// CaddyModule returns the Caddy module information.
func (Floor) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.bench_floor",
		New: func() caddy.Module { return new(Floor) },
	}
}

// Provision loads the transport.
func (f *Floor) Provision(ctx caddy.Context) error {
	u, err := url.Parse(f.Upstream)
	if err != nil || u.Host == "" {
		return fmt.Errorf("bench_floor: upstream %q is not a URL", f.Upstream)
	}
	f.base = u.Scheme + "://" + u.Host
	if f.TransportRaw == nil {
		f.TransportRaw = json.RawMessage(`{"protocol":"http"}`)
	}
	mod, err := ctx.LoadModule(f, "TransportRaw")
	if err != nil {
		return fmt.Errorf("bench_floor: loading transport: %w", err)
	}
	rt, ok := mod.(http.RoundTripper)
	if !ok {
		return fmt.Errorf("bench_floor: transport %T is not an http.RoundTripper", mod)
	}
	f.rt = rt
	return nil
}

// Read buffers: 1 KiB while a stream is paced (an open stream holds no
// more), 32 KiB (reverse_proxy's size) once a read fills the small one, so
// that a burst takes as few reads as reverse_proxy's.
var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, 1<<10); return &b }}
	largePool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
)

// ServeHTTP forwards the request and relays the answer read by read.
func (f *Floor) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	out, err := http.NewRequestWithContext(r.Context(), r.Method, f.base+r.URL.RequestURI(), r.Body)
	if err != nil {
		return caddyhttp.Error(http.StatusBadRequest, err)
	}
	out.ContentLength = r.ContentLength
	if ct := r.Header.Get("Content-Type"); ct != "" {
		out.Header.Set("Content-Type", ct)
	}
	if f.APIKey != "" {
		out.Header.Set("Authorization", "Bearer "+f.APIKey)
	}
	resp, err := f.rt.RoundTrip(out)
	if err != nil {
		return caddyhttp.Error(http.StatusBadGateway, err)
	}
	defer resp.Body.Close()
	hdr := w.Header()
	for k, v := range resp.Header {
		hdr[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(w)
	bp, pool := smallPool.Get().(*[]byte), &smallPool
	defer func() { pool.Put(bp) }()
	for {
		n, err := resp.Body.Read(*bp)
		if n > 0 {
			if _, werr := w.Write((*bp)[:n]); werr != nil {
				return nil
			}
			if werr := rc.Flush(); werr != nil {
				return nil
			}
			if n == len(*bp) && pool == &smallPool {
				smallPool.Put(bp)
				bp, pool = largePool.Get().(*[]byte), &largePool
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return nil // headers are out: the client sees the stream end
		}
	}
}

// UnmarshalCaddyfile reads
//
//	bench_floor <upstream> {
//		api_key <key>
//		transport http { ... }
//	}
func (f *Floor) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive
	if !d.Args(&f.Upstream) {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "api_key":
			if !d.Args(&f.APIKey) {
				return d.ArgErr()
			}
		case "transport":
			if !d.NextArg() {
				return d.ArgErr()
			}
			name := d.Val()
			unm, err := caddyfile.UnmarshalModule(d, "http.reverse_proxy.transport."+name)
			if err != nil {
				return err
			}
			f.TransportRaw = caddyconfig.JSONModuleObject(unm, "protocol", name, nil)
		default:
			return d.Errf("unknown bench_floor option %q", d.Val())
		}
	}
	return nil
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	f := new(Floor)
	err := f.UnmarshalCaddyfile(h.Dispenser)
	return f, err
}

var (
	_ caddy.Provisioner           = (*Floor)(nil)
	_ caddyhttp.MiddlewareHandler = (*Floor)(nil)
	_ caddyfile.Unmarshaler       = (*Floor)(nil)
)
