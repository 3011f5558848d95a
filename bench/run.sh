#!/usr/bin/env bash
# Runs the same load, on loopback, against llm_mock directly, through plain
# Caddy reverse_proxy, through nginx (proxy_buffering off; when installed)
# and through llm_stream, and prints the results side by side.
# Usage: bench/run.sh [open-streams]   (default 2000)
# LOAD_ARGS="-only burst" bench/run.sh runs one scenario (see bench/load -h).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out
mkdir -p "$out"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
open=${1:-2000}

echo "building caddy and the load tool" >&2
go build -o "$out/caddy" ./cmd/caddy
go build -o "$out/load" ./bench/load

MOCK=18081 RP=18082 NGX=18083 LLM=18084
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	[ -f "$out/nginx.pid" ] && kill "$(cat "$out/nginx.pid")" 2>/dev/null || true
}
trap cleanup EXIT

global='{
	admin off
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}'
cat > "$out/mock.caddyfile" <<CF
$global
http://:$MOCK {
	bind 127.0.0.1
	handle_path /paced/* {
		llm_mock {
			tokens 100
			interval 20ms
			stamp
		}
	}
	handle_path /burst/* {
		llm_mock {
			tokens 500
			interval 0
			stamp
		}
	}
	handle_path /steady/* {
		llm_mock {
			tokens 500
			interval 2ms
			stamp
		}
	}
	handle_path /slow/* {
		llm_mock {
			tokens 10
			interval 1s
			stamp
		}
	}
	handle_path /json/* {
		llm_mock {
			tokens 20
		}
	}
}
CF
cat > "$out/rp.caddyfile" <<CF
$global
http://:$RP {
	bind 127.0.0.1
	reverse_proxy 127.0.0.1:$MOCK {
		header_up Authorization "Bearer sk-bench"
	}
}
CF
cat > "$out/llm.caddyfile" <<CF
$global
http://:$LLM {
	bind 127.0.0.1
	llm_stream http://127.0.0.1:$MOCK {
		api_key sk-bench
		allow_paths /paced/* /burst/* /steady/* /slow/* /json/*
	}
}
CF

start() { # name config
	"$out/caddy" run --config "$2" --adapter caddyfile >"$out/$1.log" 2>&1 &
	pids+=($!)
	echo $!
}
wait_port() {
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "port $1 did not open" >&2
	exit 1
}

mock_pid=$(start mock "$out/mock.caddyfile")
rp_pid=$(start rp "$out/rp.caddyfile")
llm_pid=$(start llm "$out/llm.caddyfile")
wait_port $MOCK; wait_port $RP; wait_port $LLM

targets=("direct=http://127.0.0.1:$MOCK=0" "reverse_proxy=http://127.0.0.1:$RP=$rp_pid")
if command -v nginx >/dev/null 2>&1; then
	cat > "$out/nginx.conf" <<NG
worker_processes auto;
pid $PWD/$out/nginx.pid;
error_log $PWD/$out/nginx-error.log error;
events { worker_connections 16384; }
http {
	access_log off;
	upstream mock { server 127.0.0.1:$MOCK; keepalive 256; }
	server {
		listen 127.0.0.1:$NGX;
		location / {
			proxy_pass http://mock;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host \$host;
			proxy_set_header Authorization "Bearer sk-bench";
			proxy_buffering off;
		}
	}
}
NG
	nginx -c "$PWD/$out/nginx.conf" -e "$PWD/$out/nginx-error.log"
	wait_port $NGX
	master=$(cat "$out/nginx.pid")
	ngx_pids=$(echo "$master" $(pgrep -P "$master") | tr ' ' ',')
	targets+=("nginx=http://127.0.0.1:$NGX=$ngx_pids")
else
	echo "nginx not installed: its column is skipped (apt-get install nginx-light)" >&2
fi
targets+=("llm_stream=http://127.0.0.1:$LLM=$llm_pid")

"$out/load" -open "$open" ${LOAD_ARGS:-} "${targets[@]}" | tee "$out/results.md"
