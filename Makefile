.PHONY: test demo bench

# Runs every test (the README's test command).
test:
	go test -race ./...

# Builds Caddy with the module and runs the demo.
demo:
	go run ./cmd/caddy run --config examples/Caddyfile

# Side-by-side load benchmark (bench/run.sh) and the Go micro-benchmarks.
bench:
	bench/run.sh
	go test -run '^$$' -bench . -benchmem ./...
