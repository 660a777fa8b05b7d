#!/usr/bin/env bash
# End-to-end load benchmark on loopback: direct to the upstream (the limit), through
# nginx (1 worker), through HAProxy (1 thread, if installed) and through tern-proxy, with
# the same upstream and the same load generators in the same run. Prints tables of ratios.
# `tern-policy` is the same binary with retries, timeouts, breaker, outlier detection and
# health checks configured: its ratio to `tern` is the cost of the resilience layers.
# `tern-log` is the same binary writing a JSON access log line per request to a file;
# `tern-t100` / `tern-t1` trace 100 % / 1 % of requests over OTLP to `otlp_sink`.
#
# Placement: load generators on core 0, upstream and proxy under test on core 1.
# Per round and target: wrk (max HTTP/1.1 throughput), oha at a fixed rate (latency with
# coordinated-omission correction, CPU of the proxy), h2load (h2c prior knowledge).
# Rounds rotate the order of the targets; the report gives medians and min..max.
#
# Usage: benches/e2e/run.sh            (from anywhere; about 5 minutes with 3 rounds)
# Env:   ROUNDS=3 RATE=2000 TERN_BIN=path/to/tern-proxy OUT=file.md (markdown copy)
#        ONLY="tern tern_policy" measures only those targets (and direct)
#        TERN_BIN_B=path/to/other/tern-proxy adds a row `tern-b` (A/B a proxy change)
#        CARGO_TARGET_DIR is honoured when building tern-proxy if TERN_BIN is missing.
# Needs: nginx wrk h2load (nghttp2-client) oha, optional haproxy, python3, curl, taskset, chrt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-2000}"
WRK_SECS="${WRK_SECS:-5}"
FIXED_SECS="${FIXED_SECS:-10}"
H2_SECS="${H2_SECS:-5}"
LOADGEN_CPU=0
SERVER_CPU=1

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in nginx wrk h2load python3 curl taskset chrt; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk nghttp2-client curl)"
done
OHA="$(command -v oha || true)"
[ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ] && OHA="$HOME/.cargo/bin/oha"
[ -n "$OHA" ] || die "oha not found (cargo install oha --locked)"
HAPROXY="$(command -v haproxy || true)"
[ "$(nproc --all)" -ge 2 ] || die "needs at least 2 cores"

if [ -z "${TERN_BIN:-}" ]; then
    TERN_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tern-proxy"
    if [ ! -x "$TERN_BIN" ]; then
        log "building tern-proxy (release)"
        (cd "$ROOT" && cargo build --release -p tern-proxy) >&2
    fi
fi
[ -x "$TERN_BIN" ] || die "no tern-proxy binary at $TERN_BIN"
OTLP_SINK="${OTLP_SINK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/otlp_sink}"
if [ ! -x "$OTLP_SINK" ]; then
    log "building otlp_sink (release)"
    (cd "$ROOT" && cargo build --release -p tern-benches --bin otlp_sink) >&2 || true
fi

# Other work on the machine skews everything: say how busy it was before and during the run.
LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: load average is $LOAD_START before starting; results will be noisy"
fi
cpu_jiffies() { awk '/^cpu / { print $2+$3+$4+$5+$6+$7+$8+$9, $9 }' /proc/stat; }
read -r JIFFIES0 STEAL0 < <(cpu_jiffies)

TMP="$(mktemp -d /tmp/tern-e2e.XXXXXX)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports, chosen by the kernel.
read -r P_UP P_UP_H2 P_NGX P_NGX_H2 P_HA P_HA_H2 P_TERN P_ADMIN P_TERN_B P_ADMIN_B P_TERN_P P_ADMIN_P P_TERN_L P_ADMIN_L P_OTLP P_TERN_T1 P_ADMIN_T1 P_TERN_T100 P_ADMIN_T100 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(19)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks: s.close()')

USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user root;"

nginx_conf() { # name, then the http{} body
    local dir="$TMP/$1"
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
$2
}
EOF
}

nginx_conf upstream "
    server {
        listen 127.0.0.1:$P_UP;
        listen 127.0.0.1:$P_UP_H2 http2;
        location / { return 200 \"ok\\n\"; }
    }"

nginx_conf nginx "
    upstream up {
        server 127.0.0.1:$P_UP;
        # 32 idle connections cover wrk's 32; h2load keeps 160 requests in flight, and with
        # only 32 cached nginx would open and close upstream connections all the time.
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$P_NGX;
        listen 127.0.0.1:$P_NGX_H2 http2;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

mkdir -p "$TMP/haproxy"
cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$P_HA
    bind 127.0.0.1:$P_HA_H2 proto h2
    default_backend be
backend be
    server up 127.0.0.1:$P_UP
EOF

tern_conf() { # file, admin port, listener port
    cat >"$1" <<EOF
admin: { address: 127.0.0.1:$2 }
listeners:
  - name: bench
    address: 127.0.0.1:$3
    protocol: http
    routes:
      - backends: [ { service: upstream } ]
services:
  - name: upstream
    protocol: http1
    load_balancer: round_robin
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
EOF
}
# The same proxy with every resilience layer of issue 4 on (retry with budget and per-try
# timeout, route timeout, circuit breaker, outlier detection, active health check): the
# cost of those layers on the happy path, where no request fails.
tern_policy_conf() { # file, admin port, listener port
    cat >"$1" <<EOF
admin: { address: 127.0.0.1:$2 }
listeners:
  - name: bench
    address: 127.0.0.1:$3
    protocol: http
    routes:
      - backends: [ { service: upstream } ]
        timeout: 2s
        retry: { attempts: 3, on: [5xx, connect-failure, reset], per_try_timeout: 500ms,
                 backoff: { base: 25ms, max: 250ms }, budget: { ratio: 0.2, min_per_second: 10 } }
services:
  - name: upstream
    protocol: http1
    load_balancer: round_robin
    connect_timeout: 1s
    # max_pending_requests above h2load's 160 streams: the happy path, not refusals (with
    # the issue's 128 the first burst of new upstream dials is refused, as it should be).
    circuit_breaker: { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }
    outlier_detection: { consecutive_5xx: 5, consecutive_gateway_failure: 5, consecutive_connect_failure: 5,
                         interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50 }
    health_check: { http: { path: /, expected_statuses: [200] }, interval: 5s, timeout: 1s,
                    healthy_threshold: 2, unhealthy_threshold: 3 }
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
EOF
}
# The same proxy writing a JSON access log line per request to a file.
tern_log_conf() { # file, admin port, listener port
    tern_conf "$1" "$2" "$3"
    printf 'telemetry:\n  access_log: { path: "%s", format: json }\n' "$TMP/tern/access.log" >>"$1"
}
# The same proxy tracing every request (ratio 1.0) or 1 % of them, exporting over OTLP/gRPC
# to `otlp_sink` (on the load generators' core at idle priority: the collector's work is not
# the proxy's).
tern_trace_conf() { # file, admin port, listener port, ratio
    tern_conf "$1" "$2" "$3"
    printf 'telemetry:\n  tracing: { otlp_endpoint: "http://127.0.0.1:%s", sample_ratio: %s }\n' "$P_OTLP" "$4" >>"$1"
}
mkdir -p "$TMP/tern"
tern_trace_conf "$TMP/tern/tern-t1.yaml" "$P_ADMIN_T1" "$P_TERN_T1" 0.01
tern_trace_conf "$TMP/tern/tern-t100.yaml" "$P_ADMIN_T100" "$P_TERN_T100" 1.0
tern_conf "$TMP/tern/tern.yaml" "$P_ADMIN" "$P_TERN"
tern_log_conf "$TMP/tern/tern-log.yaml" "$P_ADMIN_L" "$P_TERN_L"
tern_conf "$TMP/tern/tern-b.yaml" "$P_ADMIN_B" "$P_TERN_B"
tern_policy_conf "$TMP/tern/tern-policy.yaml" "$P_ADMIN_P" "$P_TERN_P"

# Starts a server on the server core; its pid is appended to PIDS.
start() { # name, command...
    local name="$1"; shift
    taskset -c "$SERVER_CPU" "$@" >"$TMP/$name.out" 2>&1 &
    PIDS+=("$!")
    eval "PID_$name=$!"
}

answers() { # url: polls for up to 10 s
    for _ in $(seq 100); do
        if curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

wait_http() { # url, name
    answers "$1" && return 0
    cat "$TMP/$2.out" >&2 || true
    die "$2 did not answer on $1"
}

# Pids whose memory and CPU count for a target: the process and its children (nginx worker).
proc_tree() { # pid
    echo "$1"
    pgrep -P "$1" || true
}

cpu_ticks() { # pid... -> utime+stime of all, in clock ticks
    local total=0 pid fields
    for pid in "$@"; do
        # Field 2 (comm) is in parentheses and may hold spaces: cut after the last ')'.
        fields="$(sed 's/.*) //' "/proc/$pid/stat")"
        set -- $fields
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

rss_kib() { # pid... -> sum of VmRSS in KiB
    local total=0 pid kib
    for pid in "$@"; do
        kib="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
        total=$((total + kib))
    done
    echo "$total"
}

log "starting upstream, nginx, ${HAPROXY:+haproxy, }tern-proxy (server core $SERVER_CPU)"
start upstream nginx -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf" -e "$TMP/upstream/logs/error.log"
wait_http "http://127.0.0.1:$P_UP/" upstream
start nginx nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log"
wait_http "http://127.0.0.1:$P_NGX/" nginx
TARGETS=(direct nginx)
if [ -n "$HAPROXY" ]; then
    start haproxy "$HAPROXY" -db -f "$TMP/haproxy/haproxy.cfg"
    if answers "http://127.0.0.1:$P_HA/"; then
        TARGETS+=(haproxy)
    else
        log "haproxy did not start, skipping it:"; cat "$TMP/haproxy.out" >&2
        HAPROXY=""
    fi
fi
start tern env RUST_LOG=warn "$TERN_BIN" --config "$TMP/tern/tern.yaml"
wait_http "http://127.0.0.1:$P_ADMIN/ready" tern
wait_http "http://127.0.0.1:$P_TERN/" tern
TARGETS+=(tern)
start tern_policy env RUST_LOG=warn "$TERN_BIN" --config "$TMP/tern/tern-policy.yaml"
wait_http "http://127.0.0.1:$P_ADMIN_P/ready" tern_policy
wait_http "http://127.0.0.1:$P_TERN_P/" tern_policy
TARGETS+=(tern_policy)
start tern_log env RUST_LOG=warn "$TERN_BIN" --config "$TMP/tern/tern-log.yaml"
wait_http "http://127.0.0.1:$P_ADMIN_L/ready" tern_log
wait_http "http://127.0.0.1:$P_TERN_L/" tern_log
TARGETS+=(tern_log)
if [ -x "$OTLP_SINK" ]; then
    # At idle priority (SCHED_IDLE): decoding a batch of a few hundred spans takes the sink
    # 1-2 ms, and at normal priority that held up the load generator on the same core, so the
    # proxy under test sat idle (3 % of its core in `perf`) and the tracing rows measured the
    # sink. In a mesh the collector runs elsewhere.
    chrt --idle 0 taskset -c "$LOADGEN_CPU" "$OTLP_SINK" --address "127.0.0.1:$P_OTLP" >"$TMP/otlp_sink.out" 2>&1 &
    PIDS+=("$!")
    for t in t1 t100; do
        eval "port=\$P_TERN_$(echo $t | tr a-z A-Z); admin=\$P_ADMIN_$(echo $t | tr a-z A-Z)"
        start "tern_$t" env RUST_LOG=warn "$TERN_BIN" --config "$TMP/tern/tern-$t.yaml"
        wait_http "http://127.0.0.1:$admin/ready" "tern_$t"
        wait_http "http://127.0.0.1:$port/" "tern_$t"
        TARGETS+=("tern_$t")
    done
else
    log "no otlp_sink at $OTLP_SINK: tracing rows skipped"
fi
if [ -n "${TERN_BIN_B:-}" ]; then
    start tern_b env RUST_LOG=warn "$TERN_BIN_B" --config "$TMP/tern/tern-b.yaml"
    wait_http "http://127.0.0.1:$P_ADMIN_B/ready" tern_b
    wait_http "http://127.0.0.1:$P_TERN_B/" tern_b
    TARGETS+=(tern_b)
fi

# ONLY="tern tern_policy" measures a subset (direct is kept: every ratio needs it).
if [ -n "${ONLY:-}" ]; then
    kept=(direct)
    for t in "${TARGETS[@]}"; do
        [ "$t" != direct ] && [[ " $ONLY " == *" $t "* ]] && kept+=("$t")
    done
    TARGETS=("${kept[@]}")
fi

declare -A URL H2URL PROCS
URL[direct]="http://127.0.0.1:$P_UP/";    H2URL[direct]="http://127.0.0.1:$P_UP_H2/"
URL[nginx]="http://127.0.0.1:$P_NGX/";    H2URL[nginx]="http://127.0.0.1:$P_NGX_H2/"
URL[haproxy]="http://127.0.0.1:$P_HA/";   H2URL[haproxy]="http://127.0.0.1:$P_HA_H2/"
URL[tern]="http://127.0.0.1:$P_TERN/";    H2URL[tern]="http://127.0.0.1:$P_TERN/"
PROCS[direct]="$(proc_tree "$PID_upstream")"
PROCS[nginx]="$(proc_tree "$PID_nginx")"
[ -n "$HAPROXY" ] && PROCS[haproxy]="$(proc_tree "$PID_haproxy")"
PROCS[tern]="$PID_tern"
URL[tern_policy]="http://127.0.0.1:$P_TERN_P/"; H2URL[tern_policy]="http://127.0.0.1:$P_TERN_P/"
PROCS[tern_policy]="$PID_tern_policy"
URL[tern_log]="http://127.0.0.1:$P_TERN_L/"; H2URL[tern_log]="http://127.0.0.1:$P_TERN_L/"
PROCS[tern_log]="$PID_tern_log"
URL[tern_t1]="http://127.0.0.1:$P_TERN_T1/"; H2URL[tern_t1]="http://127.0.0.1:$P_TERN_T1/"
URL[tern_t100]="http://127.0.0.1:$P_TERN_T100/"; H2URL[tern_t100]="http://127.0.0.1:$P_TERN_T100/"
[ -n "${PID_tern_t1:-}" ] && PROCS[tern_t1]="$PID_tern_t1"
[ -n "${PID_tern_t100:-}" ] && PROCS[tern_t100]="$PID_tern_t100"
URL[tern_b]="http://127.0.0.1:$P_TERN_B/"; H2URL[tern_b]="http://127.0.0.1:$P_TERN_B/"
[ -n "${TERN_BIN_B:-}" ] && PROCS[tern_b]="$PID_tern_b"

RAW="$TMP/raw.tsv"
: >"$RAW"
emit() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }

sleep 1
for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    emit 0 "$t" rss_idle_kib "$(rss_kib ${PROCS[$t]})"
done

loadgen() { taskset -c "$LOADGEN_CPU" "$@"; }

measure() { # round, target
    local r="$1" t="$2" out c0 c1 w0 w1
    # shellcheck disable=SC2086
    set -- ${PROCS[$t]}

    out="$(loadgen wrk -t1 -c32 -d"${WRK_SECS}s" --latency "${URL[$t]}")"
    echo "$out" >"$TMP/wrk-$r-$t.txt"
    python3 "$HERE/parse.py" wrk "$r" "$t" <<<"$out" >>"$RAW"

    c0="$(cpu_ticks "$@")"; w0="$(date +%s.%N)"
    out="$(loadgen "$OHA" -q "$RATE" -c16 -z"${FIXED_SECS}s" -w --latency-correction --no-tui \
        --output-format json "${URL[$t]}")"
    c1="$(cpu_ticks "$@")"; w1="$(date +%s.%N)"
    echo "$out" >"$TMP/oha-$r-$t.json"
    python3 "$HERE/parse.py" oha "$r" "$t" <<<"$out" >>"$RAW"
    emit "$r" "$t" cpu_pct "$(python3 -c "print(round(($c1-$c0)/$(getconf CLK_TCK)/($w1-$w0)*100, 1))")"

    out="$(loadgen h2load -c16 -m10 -D"$H2_SECS" "${H2URL[$t]}")"
    echo "$out" >"$TMP/h2load-$r-$t.txt"
    python3 "$HERE/parse.py" h2load "$r" "$t" <<<"$out" >>"$RAW"
}

# Warm every path once (upstream pools, page cache, CPU frequency).
for t in "${TARGETS[@]}"; do
    loadgen wrk -t1 -c32 -d1s "${URL[$t]}" >/dev/null
done

n="${#TARGETS[@]}"
for r in $(seq 1 "$ROUNDS"); do
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${TARGETS[$(((i + r - 1) % n))]}"); done
    log "round $r/$ROUNDS: ${order[*]}"
    for t in "${order[@]}"; do measure "$r" "$t"; done
done

# Past the upstream pools' idle timeouts (tern: 4 s), so that "after" is idle again.
sleep 6
for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    emit 0 "$t" rss_after_kib "$(rss_kib ${PROCS[$t]})"
done

read -r JIFFIES1 STEAL1 < <(cpu_jiffies)
STEAL_PCT="$(python3 -c "print(round(100*($STEAL1-$STEAL0)/max(1,$JIFFIES1-$JIFFIES0), 1))")"
{
    echo "Load average before: $LOAD_START; CPU steal during the run: $STEAL_PCT%."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc --all) cores; $(uname -r); rounds: $ROUNDS;"
    echo "load generators on core $LOADGEN_CPU, upstream + proxy on core $SERVER_CPU;"
    echo "$(nginx -v 2>&1 | sed 's/.*: //'), ${HAPROXY:+$("$HAPROXY" -v | head -1 | awk '{print "HAProxy " $3}'), }$("$OHA" --version), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), h2load $(h2load --version | awk '{print $2}')"
    echo
    python3 "$HERE/report.py" "$RATE" <"$RAW"
} >"$TMP/report.md"
cat "$TMP/report.md"
[ -n "${OUT:-}" ] && cp "$TMP/report.md" "$OUT"
[ -n "${RAW_OUT:-}" ] && cp "$RAW" "$RAW_OUT"
exit 0
