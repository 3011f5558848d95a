// Package cfparse holds the Caddyfile argument parsing the handler and the
// stand-in model share.
package cfparse

import (
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// DurationArg reads the next argument as a positive (or zero) duration.
func DurationArg(d *caddyfile.Dispenser, into *caddy.Duration) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return d.Errf("bad duration value '%s': %v", d.Val(), err)
	}
	if dur < 0 {
		return d.Errf("duration must not be negative, got %s", time.Duration(dur))
	}
	*into = caddy.Duration(dur)
	return nil
}

// Duration reads a line's last argument: one positive (or zero) duration
// and nothing after it.
func Duration(d *caddyfile.Dispenser, into *caddy.Duration) error {
	if err := DurationArg(d, into); err != nil {
		return err
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}
