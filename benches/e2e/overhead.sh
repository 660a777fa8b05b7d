#!/usr/bin/env bash
# The throughput cost of access logging and tracing, as paired ratios: the plain proxy and
# one variant are loaded back to back for a few seconds each, in alternating order, many
# times over, and the ratio of each pair is kept. On a shared VM the machine's speed drifts
# by more than the few percent being measured between the rounds of `run.sh` (1.7 minutes
# apart); within a pair of short runs it mostly does not, and the median of the pairs is a
# steadier figure than a ratio of medians.
#
# Same placement as run.sh: load generator (and the OTLP sink, at idle priority) on core 0,
# nginx upstream and the proxies on core 1. Every proxy runs for the whole script, idle while
# another one is measured.
#
# Beside each throughput ratio the script gives the ratio of the proxy's own CPU time per
# request (utime + stime from /proc, over the same runs): what a saturated sidecar's
# throughput follows, and steadier than req/s where the load generator and nginx share the
# noise of the VM. Above 1 the variant costs more CPU per request than the plain proxy.
#
# Usage: benches/e2e/overhead.sh            (about 1 minute per pair and protocol)
# Env:   PAIRS=10  DUR=4 (seconds per run)  PROTOS="h1 h2c"  TERN_BIN=...  OTLP_SINK=...
# Needs: nginx wrk h2load python3 curl taskset chrt
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PAIRS="${PAIRS:-10}"
DUR="${DUR:-4}"
PROTOS="${PROTOS:-h1 h2c}"
TERN_BIN="${TERN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tern-proxy}"
OTLP_SINK="${OTLP_SINK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/otlp_sink}"
for tool in nginx wrk h2load python3 curl taskset chrt; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
for bin in "$TERN_BIN" "$OTLP_SINK"; do
    [ -x "$bin" ] || { echo "no $bin (cargo build --release -p tern-proxy -p tern-benches)" >&2; exit 1; }
done

TMP="$(mktemp -d /tmp/tern-overhead.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# shellcheck source=lib.sh
. "$HERE/lib.sh"
read -r P_UP P_OTLP P_PLAIN P_LOG P_T1 P_T100 A_PLAIN A_LOG A_T1 A_T100 < <(free_ports 10)
nginx_upstream_conf "$TMP/nginx" "$P_UP"
taskset -c 1 nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" >"$TMP/nginx.out" 2>&1 &
PIDS+=("$!")
# Idle priority: the sink's decoding must not hold up the load generator (see README).
chrt --idle 0 taskset -c 0 "$OTLP_SINK" --address "127.0.0.1:$P_OTLP" >"$TMP/sink.out" 2>&1 &
PIDS+=("$!")

start() { # name, listener port, admin port, extra telemetry yaml
    local f="$TMP/$1.yaml"
    cat >"$f" <<EOF
admin: { address: 127.0.0.1:$3 }
listeners:
  - name: bench
    address: 127.0.0.1:$2
    protocol: http
    routes:
      - backends: [ { service: upstream } ]
services:
  - name: upstream
    protocol: http1
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
$4
EOF
    RUST_LOG=warn taskset -c 1 "$TERN_BIN" --config "$f" >"$TMP/$1.out" 2>&1 &
    PIDS+=("$!")
    # taskset execs the proxy: this is its pid, for its CPU time.
    eval "PID_$(echo "$1" | tr a-z A-Z)=$!"
    for _ in $(seq 100); do
        curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$2/" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$1 did not start: $(cat "$TMP/$1.out")" >&2
    exit 1
}
start plain "$P_PLAIN" "$A_PLAIN" ""
start log "$P_LOG" "$A_LOG" "telemetry:
  access_log: { path: \"$TMP/access.log\", format: json }"
start t1 "$P_T1" "$A_T1" "telemetry:
  tracing: { otlp_endpoint: \"http://127.0.0.1:$P_OTLP\", sample_ratio: 0.01 }"
start t100 "$P_T100" "$A_T100" "telemetry:
  tracing: { otlp_endpoint: \"http://127.0.0.1:$P_OTLP\", sample_ratio: 1.0 }"

cpu_ticks() { # pid -> utime + stime of the whole process (dead threads included)
    # Fields 14 and 15 of /proc/PID/stat; counted after the ")" that ends the name.
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

rate() { # proto, port, seconds, proxy pid -> "requests/s  proxy CPU µs per request"
    local out before after n rps
    before="$(cpu_ticks "$4")"
    case "$1" in
        h1) out="$(taskset -c 0 wrk -t1 -c32 -d"$3"s "http://127.0.0.1:$2/")"
            n="$(awk '/ requests in / { print $1 }' <<<"$out")"
            rps="$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")" ;;
        h2c) out="$(taskset -c 0 h2load -c16 -m10 -D "$3" "http://127.0.0.1:$2/" 2>/dev/null)"
            n="$(awk '/^requests:/ { print $8 }' <<<"$out")"
            rps="$(awk '/^finished in/ { gsub(",", "", $4); print $4 }' <<<"$out")" ;;
    esac
    after="$(cpu_ticks "$4")"
    awk -v r="$rps" -v n="$n" -v t=$((after - before)) -v us="$TICK_US" \
        'BEGIN { printf "%s %.3f\n", r, (n > 0 ? t * us / n : 0) }'
}

# Warm every proxy (pools, page cache, the export connection).
for proto in $PROTOS; do
    for v in PLAIN LOG T1 T100; do
        eval "rate \"\$proto\" \"\$P_$v\" 1 \"\$PID_$v\"" >/dev/null
    done
done

echo "| protocol | variant | req/s × plain: median of $PAIRS pairs | quartiles | proxy CPU/request × plain: median | quartiles | plain req/s, CPU µs/request (medians) |"
echo "|---|---|---|---|---|---|---|"
for proto in $PROTOS; do
    for variant in log t1 t100; do
        V="$(echo "$variant" | tr a-z A-Z)"
        eval "port=\$P_$V pid=\$PID_$V"
        : >"$TMP/pairs"
        for i in $(seq "$PAIRS"); do
            # Alternate which goes first, so a drift within a pair cancels out over pairs.
            if [ $((i % 2)) = 1 ]; then
                a="$(rate "$proto" "$P_PLAIN" "$DUR" "$PID_PLAIN")"; b="$(rate "$proto" "$port" "$DUR" "$pid")"
            else
                b="$(rate "$proto" "$port" "$DUR" "$pid")"; a="$(rate "$proto" "$P_PLAIN" "$DUR" "$PID_PLAIN")"
            fi
            echo "$a $b" >>"$TMP/pairs"
        done
        python3 - "$proto" "$variant" "$TMP/pairs" <<'EOF'
import statistics, sys
proto, variant, path = sys.argv[1:]
rows = [tuple(map(float, l.split())) for l in open(path) if l.strip()]
# Each row: plain req/s, plain CPU µs/request, variant req/s, variant CPU µs/request.
def summary(values):
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{statistics.median(values):.3f} | {q[0]:.3f}-{q[2]:.3f}"
rps = summary(b / a for a, _, b, _ in rows if a > 0)
cpu = summary(d / c for _, c, _, d in rows if c > 0)
names = {"log": "JSON access log to a file", "t1": "tracing 1 %", "t100": "tracing 100 %"}
print(f"| {proto} | {names[variant]} | {rps} | {cpu} "
      f"| {statistics.median(a for a, *_ in rows):.0f}, "
      f"{statistics.median(c for _, c, *_ in rows):.1f} |")
EOF
    done
done
