// Command caddy is the benchmark's Caddy: cmd/caddy (the standard modules,
// llm_stream and llm_mock) plus bench_floor, the least-work relay that
// bench/run.sh measures as the floor of any proxy inside Caddy. Not for
// deployments.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-llm-stream/caddy-llm-stream"
	_ "github.com/caddy-llm-stream/caddy-llm-stream/bench/floor"
	_ "github.com/caddy-llm-stream/caddy-llm-stream/mock"
)

func main() {
	caddycmd.Main()
}
