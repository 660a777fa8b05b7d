#!/usr/bin/env bash
# The mesh path on loopback: client -> sidecar A -> (mTLS, HTTP/2) -> sidecar B -> server,
# against the server direct and against the same two proxies in plaintext, same run.
#
# Rows:  direct       wrk/oha -> nginx upstream
#        plain-2hop   -> tern A (plaintext HTTP/1.1) -> tern B -> upstream
#        mtls-2hop    -> tern A (identity web) -> mTLS h2 -> tern B (identity api, strict,
#                        authorization allow web, peer identity header) -> upstream
# Per round and row: wrk -t1 -c32 (max HTTP/1.1 throughput), oha at a fixed rate (latency,
# coordinated-omission corrected; CPU of both proxies), and wrk with `Connection: close`
# through the TCP listeners (every request a new connection: for mtls-2hop a new mTLS
# handshake between the proxies; the handshake rate).
# Certificates come from tern-control-plane's CA (bootstrap tokens).
#
# Placement: load generators on core 0; upstream, both proxies and the CA on core 1.
# Usage: benches/mesh/run.sh   (about 3 minutes with 3 rounds)
# Env:   ROUNDS=3 RATE=1000 WRK_SECS=5 FIXED_SECS=10 OUT=file.md
#        CARGO_TARGET_DIR is honoured to find (or build) the release binaries.
# Needs: nginx wrk oha python3 curl taskset.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-1000}"
WRK_SECS="${WRK_SECS:-5}"
FIXED_SECS="${FIXED_SECS:-10}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"

die() { echo "mesh/run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in nginx wrk python3 curl taskset; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk curl)"
done
OHA="$(command -v oha || true)"
[ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ] && OHA="$HOME/.cargo/bin/oha"
[ -n "$OHA" ] || die "oha not found (cargo install oha --locked)"
if [ ! -x "$TARGET/tern-proxy" ] || [ ! -x "$TARGET/tern-control-plane" ]; then
    log "building tern-proxy and tern-control-plane (release)"
    (cd "$ROOT" && cargo build --release -p tern-proxy -p tern-control-plane) >&2
fi

LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
TMP="$(mktemp -d /tmp/tern-mesh.XXXXXX)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_UP P_CA P_XDS P_CPADMIN \
    P_A P_AT P_AADM P_B P_BT P_BADM \
    P_PA P_PAT P_PAADM P_PB P_PBT P_PBADM < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(16)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks: s.close()')

USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user root;"
mkdir -p "$TMP/nginx/logs"
cat >"$TMP/nginx/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$P_UP;
        location / { return 200 "ok\n"; }
    }
}
EOF

WEB=spiffe://cluster.local/ns/default/sa/web
API=spiffe://cluster.local/ns/default/sa/api
printf '%s bench-token-web-0123456789\n%s bench-token-api-0123456789\n' "$WEB" "$API" >"$TMP/tokens"
echo bench-token-web-0123456789 >"$TMP/web.token"
echo bench-token-api-0123456789 >"$TMP/api.token"
printf 'listeners: []\nservices: []\n' >"$TMP/mesh.yaml"

# Sidecar B: the server's. mtls=1 makes its ports strict and lets only `web` in.
server_conf() { # file admin http tcp mtls
    local mtls=""
    if [ "$5" = 1 ]; then
        mtls="    mtls: { mode: strict, authorization: { default: deny, identities: [\"$WEB\"] }, peer_identity_header: x-peer-identity }"
    fi
    cat >"$1" <<EOF
admin: { address: 127.0.0.1:$2 }
listeners:
  - name: inbound
    address: 127.0.0.1:$3
    protocol: http
$mtls
    routes:
      - backends: [ { service: app } ]
  - name: inbound-tcp
    address: 127.0.0.1:$4
    protocol: tcp
    service: app-tcp
$mtls
services:
  - name: app
    protocol: http1
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
  - name: app-tcp
    protocol: tcp
    endpoints: [ { address: 127.0.0.1:$P_UP } ]
EOF
}
# Sidecar A: the client's. mtls=1 names the server's identity, which turns on mTLS.
client_conf() { # file admin http tcp server_http server_tcp mtls
    local id=""
    [ "$7" = 1 ] && id="    identity: \"$API\""
    cat >"$1" <<EOF
admin: { address: 127.0.0.1:$2 }
listeners:
  - name: outbound
    address: 127.0.0.1:$3
    protocol: http
    routes:
      - backends: [ { service: api } ]
  - name: outbound-tcp
    address: 127.0.0.1:$4
    protocol: tcp
    service: api-tcp
services:
  - name: api
    protocol: http1
$id
    endpoints: [ { address: 127.0.0.1:$5 } ]
  - name: api-tcp
    protocol: tcp
$id
    endpoints: [ { address: 127.0.0.1:$6 } ]
EOF
}

start() { # name, command...
    local name=$1; shift
    # A simple command in the background (not a function), so that $! is the process
    # itself: taskset execs it.
    taskset -c 1 "$@" >"$TMP/$name.log" 2>&1 &
    PIDS+=("$!")
    eval "PID_${name//-/_}=$!"
}
wait_http() { # url
    for _ in $(seq 200); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    die "$1 never answered"
}

start upstream nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx"
start ca "$TARGET/tern-control-plane" --config "$TMP/mesh.yaml" --xds-address "127.0.0.1:$P_XDS" \
    --admin-address "127.0.0.1:$P_CPADMIN" --ca --ca-address "127.0.0.1:$P_CA" \
    --bootstrap-tokens "$TMP/tokens" --ca-roots-out "$TMP/roots.pem"
for _ in $(seq 100); do [ -s "$TMP/roots.pem" ] && break; sleep 0.05; done
[ -s "$TMP/roots.pem" ] || die "the CA did not start: $(cat "$TMP/ca.log")"

server_conf "$TMP/b.yaml" "$P_BADM" "$P_B" "$P_BT" 1
client_conf "$TMP/a.yaml" "$P_AADM" "$P_A" "$P_AT" "$P_B" "$P_BT" 1
server_conf "$TMP/pb.yaml" "$P_PBADM" "$P_PB" "$P_PBT" 0
client_conf "$TMP/pa.yaml" "$P_PAADM" "$P_PA" "$P_PAT" "$P_PB" "$P_PBT" 0
mesh_args() { echo --identity "$1" --ca "127.0.0.1:$P_CA" --ca-roots "$TMP/roots.pem" --token-file "$2"; }
export RUST_LOG=warn
# shellcheck disable=SC2046
start tern-b "$TARGET/tern-proxy" --config "$TMP/b.yaml" $(mesh_args "$API" "$TMP/api.token")
# shellcheck disable=SC2046
start tern-a "$TARGET/tern-proxy" --config "$TMP/a.yaml" $(mesh_args "$WEB" "$TMP/web.token")
start plain-b "$TARGET/tern-proxy" --config "$TMP/pb.yaml"
start plain-a "$TARGET/tern-proxy" --config "$TMP/pa.yaml"
for port in "$P_AADM" "$P_BADM" "$P_PAADM" "$P_PBADM"; do wait_http "http://127.0.0.1:$port/ready"; done
wait_http "http://127.0.0.1:$P_UP/"
body="$(curl -fsS "http://127.0.0.1:$P_A/")"
[ "$body" = "ok" ] || die "mtls path answered $body"

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
RSS_IDLE="$(rss_kib "$PID_tern_a") $(rss_kib "$PID_tern_b") $(rss_kib "$PID_plain_a") $(rss_kib "$PID_plain_b")"

RAW="$TMP/raw.tsv"
: >"$RAW"
url_of() { case $1 in direct) echo "http://127.0.0.1:$P_UP/";; plain-2hop) echo "http://127.0.0.1:$P_PA/";; mtls-2hop) echo "http://127.0.0.1:$P_A/";; esac; }
tcp_of() { case $1 in direct) echo "http://127.0.0.1:$P_UP/";; plain-2hop) echo "http://127.0.0.1:$P_PAT/";; mtls-2hop) echo "http://127.0.0.1:$P_AT/";; esac; }
pids_of() { case $1 in direct) echo "$PID_upstream";; plain-2hop) echo "$PID_plain_a $PID_plain_b";; mtls-2hop) echo "$PID_tern_a $PID_tern_b";; esac; }
ticks_of() { local t=0 p; for p in $1; do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }

ROWS=(direct plain-2hop mtls-2hop)
HZ="$(getconf CLK_TCK)"
for round in $(seq "$ROUNDS"); do
    # Rotate the order each round so that no row always runs first (or last).
    order=("${ROWS[@]:$(( (round - 1) % 3 ))}" "${ROWS[@]:0:$(( (round - 1) % 3 ))}")
    for row in "${order[@]}"; do
        url="$(url_of "$row")"
        log "round $round: $row"
        max="$(taskset -c 0 wrk -t1 -c32 -d"${WRK_SECS}s" "$url" | awk '/^Requests\/sec/ { print $2 }')"
        t0="$(ticks_of "$(pids_of "$row")")"; s0="$(date +%s.%N)"
        taskset -c 0 "$OHA" -q "$RATE" -c16 -z"${FIXED_SECS}s" --latency-correction --no-tui \
            --output-format json "$url" >"$TMP/oha.json" 2>/dev/null \
            || taskset -c 0 "$OHA" -q "$RATE" -c16 -z"${FIXED_SECS}s" --latency-correction --no-tui -j "$url" >"$TMP/oha.json"
        t1="$(ticks_of "$(pids_of "$row")")"; s1="$(date +%s.%N)"
        read -r p50 p99 ok < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
print(p["p50"] * 1000, p["p99"] * 1000, sum(v for k, v in codes.items() if k.startswith("2")) / max(1, sum(codes.values())))
' "$TMP/oha.json")
        cpu="$(python3 -c "print(100 * ($t1 - $t0) / $HZ / ($s1 - $s0))")"
        conns="$(taskset -c 0 wrk -t1 -c8 -d"${WRK_SECS}s" -H 'Connection: close' "$(tcp_of "$row")" | awk '/^Requests\/sec/ { print $2 }')"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$row" "$max" "$p50" "$p99" "$cpu" "$conns" "$ok" >>"$RAW"
    done
done
sleep 6 # past the 4 s upstream idle timeout: pooled connections closed
RSS_AFTER="$(rss_kib "$PID_tern_a") $(rss_kib "$PID_tern_b") $(rss_kib "$PID_plain_a") $(rss_kib "$PID_plain_b")"
HANDSHAKES="$(curl -fsS "http://127.0.0.1:$P_BADM/metrics" | awk '/^tern_tls_inbound_handshakes_total\{listener="inbound-tcp",result="ok"\}/ { print $2 }')"

python3 - "$RAW" "$RSS_IDLE" "$RSS_AFTER" "$LOAD_START" "$RATE" "$ROUNDS" "${HANDSHAKES:-0}" <<'EOF' | tee "${OUT:-/dev/null}"
import statistics, sys
raw, rss_idle, rss_after, load, rate, rounds, handshakes = sys.argv[1:]
rows = {}
for line in open(raw):
    r, row, mx, p50, p99, cpu, conns, ok = line.split("\t")
    rows.setdefault(row, []).append(dict(r=int(r), max=float(mx), p50=float(p50), p99=float(p99),
                                         cpu=float(cpu), conns=float(conns), ok=float(ok)))
by_round = {}
for row, rs in rows.items():
    for x in rs:
        by_round.setdefault(x["r"], {})[row] = x
def med(xs):
    xs = sorted(xs)
    return f"{statistics.median(xs):.3g} ({xs[0]:.3g}–{xs[-1]:.3g})" if len(xs) > 1 else f"{xs[0]:.3g}"
def ratio(row, key, base="direct"):
    return med([by_round[r][row][key] / by_round[r][base][key] for r in by_round])
def added(row, key):
    return med([by_round[r][row][key] - by_round[r]["direct"][key] for r in by_round])
mib = lambda kib: f"{int(kib) / 1024:.1f}"
ia, ib, ipa, ipb = rss_idle.split()
aa, ab, apa, apb = rss_after.split()
print(f"Rounds: {rounds}; fixed rate {rate} req/s; load average before: {load}; "
      "load generators on core 0, upstream + both proxies + CA on core 1.\n")
print("| path | max req/s | × direct | p50 ms @fixed | p99 ms @fixed | p99 added ms | CPU % of both proxies @fixed | new conns/s (Connection: close) | × direct | 2xx share |")
print("|---|---|---|---|---|---|---|---|---|---|")
for row in ["direct", "plain-2hop", "mtls-2hop"]:
    rs = rows[row]
    print(f"| {row} | {med([x['max'] for x in rs])} | {ratio(row, 'max')} | {med([x['p50'] for x in rs])} | "
          f"{med([x['p99'] for x in rs])} | {'—' if row == 'direct' else added(row, 'p99')} | "
          f"{'—' if row == 'direct' else med([x['cpu'] for x in rs])} | {med([x['conns'] for x in rs])} | "
          f"{ratio(row, 'conns')} | {min(x['ok'] for x in rs):.4f} |")
print()
print(f"mtls-2hop vs plain-2hop, same rounds: throughput {ratio('mtls-2hop', 'max', 'plain-2hop')}, "
      f"new connections {ratio('mtls-2hop', 'conns', 'plain-2hop')}.")
print(f"mTLS handshakes completed by sidecar B on its TCP port: {handshakes}.\n")
print("| proxy | RSS idle MiB | RSS after MiB |")
print("|---|---|---|")
print(f"| mTLS client sidecar (A) | {mib(ia)} | {mib(aa)} |")
print(f"| mTLS server sidecar (B) | {mib(ib)} | {mib(ab)} |")
print(f"| plaintext client (A) | {mib(ipa)} | {mib(apa)} |")
print(f"| plaintext server (B) | {mib(ipb)} | {mib(apb)} |")
EOF
