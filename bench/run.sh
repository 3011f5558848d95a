#!/usr/bin/env bash
# Runs the same load, on loopback, against llm_mock directly, through plain
# Caddy reverse_proxy, through nginx (proxy_buffering off; when installed)
# and through llm_stream, and prints the results side by side.
# Usage: bench/run.sh [open-streams]   (default 2000)
# LOAD_ARGS="-only burst" bench/run.sh runs one scenario (see bench/load -h).
# SHAPE=tls runs the deployed shape instead of plaintext HTTP/1.1: the mock
# serves HTTP/2 over TLS (as hosted model APIs do) and the proxies serve
# clients over TLS (as automatic HTTPS does), HTTP/2 to the client unless
# CLIENT=h1. reverse_proxy speaks HTTP/2 to the mock; nginx HTTP/1.1 over
# TLS (it cannot proxy to an upstream over HTTP/2); llm_stream as
# configured by default (HTTP/2 when the upstream offers it).
# BASELINE=path/to/caddy adds a column "baseline": that build (of an earlier
# commit, say) running the same llm_stream site, for before/after tables in
# one run.
# The floor column is bench_floor (bench/floor): the least a handler inside
# Caddy can do to relay a stream, through the same transport; what Caddy and
# net/http cost on their own, below which no Caddy proxy can go.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out
mkdir -p "$out"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
open=${1:-2000}
shape=${SHAPE:-plain}
client=${CLIENT:-h2}

echo "building caddy (with bench_floor) and the load tool" >&2
go build -o "$out/caddy" ./bench/caddy
go build -o "$out/load" ./bench/load

MOCK=18081 RP=18082 NGX=18083 LLM=18084 FLOOR=18085 BASE=18086
scheme=http site=http tlsline="" upstream_tls="" rp_tls="" load_tls=()
if [ "$shape" = tls ]; then
	# one CA and one certificate for 127.0.0.1, made once
	tlsdir="$PWD/$out/tls"
	if [ ! -f "$tlsdir/cert.pem" ]; then
		mkdir -p "$tlsdir"
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj /CN=bench-ca \
			-keyout "$tlsdir/ca-key.pem" -out "$tlsdir/ca.pem" 2>/dev/null
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
			-keyout "$tlsdir/key.pem" -out "$tlsdir/req.pem" 2>/dev/null
		printf 'subjectAltName=IP:127.0.0.1\n' >"$tlsdir/ext.cnf"
		openssl x509 -req -in "$tlsdir/req.pem" -CA "$tlsdir/ca.pem" -CAkey "$tlsdir/ca-key.pem" -CAcreateserial \
			-days 365 -extfile "$tlsdir/ext.cnf" -out "$tlsdir/cert.pem" 2>/dev/null
	fi
	scheme=https site=https
	tlsline="tls $tlsdir/cert.pem $tlsdir/key.pem"
	upstream_tls="transport http {
			tls_trust_pool file $tlsdir/ca.pem
		}"
	rp_tls="transport http {
			tls_trust_pool file $tlsdir/ca.pem
			versions 2
		}"
	load_tls=(-ca "$tlsdir/ca.pem")
	[ "$client" = h2 ] && load_tls+=(-h2)
fi
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
$site://:$MOCK {
	bind 127.0.0.1
	$tlsline
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
$site://:$RP {
	bind 127.0.0.1
	$tlsline
	reverse_proxy $scheme://127.0.0.1:$MOCK {
		header_up Authorization "Bearer sk-bench"
		$rp_tls
	}
}
CF
cat > "$out/llm.caddyfile" <<CF
$global
$site://:$LLM {
	bind 127.0.0.1
	$tlsline
	llm_stream $scheme://127.0.0.1:$MOCK {
		api_key sk-bench
		allow_paths /paced/* /burst/* /steady/* /slow/* /json/*
		$upstream_tls
	}
}
CF
cat > "$out/floor.caddyfile" <<CF
$global
$site://:$FLOOR {
	bind 127.0.0.1
	$tlsline
	bench_floor $scheme://127.0.0.1:$MOCK {
		api_key sk-bench
		$upstream_tls
	}
}
CF

started=""
start() { # name config; the process id in $started (not in a subshell, so cleanup sees it)
	"$out/caddy" run --config "$2" --adapter caddyfile >"$out/$1.log" 2>&1 &
	started=$!
	pids+=("$started")
}
wait_port() {
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "port $1 did not open" >&2
	exit 1
}

start mock "$out/mock.caddyfile"
start rp "$out/rp.caddyfile"
rp_pid=$started
start llm "$out/llm.caddyfile"
llm_pid=$started
start floor "$out/floor.caddyfile"
floor_pid=$started
wait_port $MOCK; wait_port $RP; wait_port $LLM; wait_port $FLOOR
base_target=()
if [ -n "${BASELINE:-}" ]; then
	sed "s/:$LLM {/:$BASE {/" "$out/llm.caddyfile" >"$out/base.caddyfile"
	"$BASELINE" run --config "$out/base.caddyfile" --adapter caddyfile >"$out/base.log" 2>&1 &
	pids+=("$!")
	base_target=("baseline=$scheme://127.0.0.1:$BASE=$!")
	wait_port $BASE
fi

targets=("direct=$scheme://127.0.0.1:$MOCK=0" "reverse_proxy=$scheme://127.0.0.1:$RP=$rp_pid")
ngx_listen="listen 127.0.0.1:$NGX;" ngx_upstream_tls=""
if [ "$shape" = tls ]; then
	ngx_h2=""
	[ "$client" = h2 ] && ngx_h2=" http2"
	ngx_listen="listen 127.0.0.1:$NGX ssl$ngx_h2;
		ssl_certificate $tlsdir/cert.pem;
		ssl_certificate_key $tlsdir/key.pem;"
	ngx_upstream_tls="proxy_ssl_trusted_certificate $tlsdir/ca.pem;
			proxy_ssl_name 127.0.0.1;
			proxy_ssl_verify on;
			proxy_ssl_session_reuse on;"
fi
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
		$ngx_listen
		location / {
			proxy_pass $scheme://mock;
			$ngx_upstream_tls
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
	targets+=("nginx=$scheme://127.0.0.1:$NGX=$ngx_pids")
else
	echo "nginx not installed: its column is skipped (apt-get install nginx-light)" >&2
fi
targets+=("floor=$scheme://127.0.0.1:$FLOOR=$floor_pid" "${base_target[@]}" "llm_stream=$scheme://127.0.0.1:$LLM=$llm_pid")

echo "shape: $shape$([ "$shape" = tls ] && echo ", $client to the client"), $open open streams" | tee "$out/results.md"
"$out/load" -open "$open" "${load_tls[@]}" ${LOAD_ARGS:-} "${targets[@]}" | tee -a "$out/results.md"
