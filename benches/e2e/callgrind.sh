#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: deterministic where
# throughput on this machine drifts by a few percent between runs. For each binary and each
# config (plain, tracing 1 %, tracing 100 %, JSON access log) the proxy runs twice under
# `valgrind --tool=callgrind`, once serving `oha -n 2000` and once `oha -n 12000` (`-c 8`,
# HTTP/1.1 to an nginx upstream); the difference over 10,000 requests leaves start-up and
# shutdown out. Kernel time (about two thirds of the proxy's CPU here) is not counted.
#
# Usage: benches/e2e/callgrind.sh BIN [BIN_B]     (about 1 minute per binary and config)
# Env:   CONFIGS="plain t1 t100 log"   OTLP_SINK=path/to/otlp_sink   KEEP=1 keeps the outputs
# Needs: valgrind nginx oha curl python3
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CONFIGS="${CONFIGS:-plain t1 t100 log}"
OTLP_SINK="${OTLP_SINK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/otlp_sink}"
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN_B]" >&2; exit 2; }
for tool in valgrind nginx oha curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
[ -x "$OTLP_SINK" ] || { echo "no otlp_sink at $OTLP_SINK (cargo build --release -p tern-benches --bin otlp_sink)" >&2; exit 1; }

TMP="$(mktemp -d /tmp/tern-callgrind.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "outputs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# shellcheck source=lib.sh
. "$HERE/lib.sh"
read -r P_UP P_OTLP P_ADMIN P_LISTEN < <(free_ports 4)
nginx_upstream_conf "$TMP/nginx" "$P_UP"
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" >"$TMP/nginx.out" 2>&1 &
PIDS+=("$!")
"$OTLP_SINK" --address "127.0.0.1:$P_OTLP" >"$TMP/otlp_sink.out" 2>&1 &
PIDS+=("$!")

conf() { # name -> config file
    local f="$TMP/$1.yaml"
    cat >"$f" <<EOF
admin: { address: 127.0.0.1:$P_ADMIN }
listeners:
  - name: bench
    address: 127.0.0.1:$P_LISTEN
    protocol: http
    routes:
      - backends: [ { service: upstream } ]
services:
  - name: upstream
    protocol: http1
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
EOF
    case "$1" in
        plain) ;;
        t1) printf 'telemetry:\n  tracing: { otlp_endpoint: "http://127.0.0.1:%s", sample_ratio: 0.01 }\n' "$P_OTLP" >>"$f" ;;
        t100) printf 'telemetry:\n  tracing: { otlp_endpoint: "http://127.0.0.1:%s", sample_ratio: 1.0 }\n' "$P_OTLP" >>"$f" ;;
        log) printf 'telemetry:\n  access_log: { path: "%s", format: json }\n' "$TMP/access.log" >>"$f" ;;
        *) echo "unknown config $1" >&2; exit 2 ;;
    esac
    echo "$f"
}

# Total instructions of one proxy run serving $3 requests.
count() { # bin, config file, requests
    local out="$TMP/cg.$(basename "$1").$(basename "$2" .yaml).$3.out"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$1" --config "$2" >"$TMP/proxy.out" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$P_LISTEN/" 2>/dev/null && break
        sleep 0.1
    done
    oha --no-tui -n "$3" -c 8 "http://127.0.0.1:$P_LISTEN/" >/dev/null
    # Let the exporter send what it holds, then stop (SIGTERM: drain, exit 0).
    sleep 1
    kill -TERM "$pid"
    wait "$pid" || true
    awk '/^summary:/ { print $2 }' "$out"
}

printf '| binary | config | instr/request |\n|---|---|---|\n'
for bin in "$@"; do
    for c in $CONFIGS; do
        f="$(conf "$c")"
        small="$(count "$bin" "$f" 2000)"
        large="$(count "$bin" "$f" 12000)"
        printf '| %s | %s | %s |\n' "$(basename "$bin")" "$c" "$(( (large - small) / 10000 ))"
    done
done
