// Command caddy is Caddy with the standard modules plus llm_stream: the
// program `xcaddy build --with github.com/caddy-llm-stream/caddy-llm-stream`
// generates, kept here so the project builds and tests without xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-llm-stream/caddy-llm-stream"
	_ "github.com/caddy-llm-stream/caddy-llm-stream/mock"
)

func main() {
	caddycmd.Main()
}
