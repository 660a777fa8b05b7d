#!/usr/bin/env bash
# Control-plane load benchmark: tern-control-plane serving a generated mesh (1,000 services ×
# 10 endpoints) to 100 simulated proxies on ADS, State of the World and incremental, ROUNDS
# rounds each, alternating which protocol goes first. Prints a markdown table of medians with
# the min–max spread over the rounds.
#
# Placement: the load generator (xds_load, 100 streams) on core 0, the control plane on core 1.
# Every run is bounded: xds_load stops itself after RUN_SECS - 10 s and `timeout` kills it
# (and with it the control plane) after RUN_SECS.
#
# Usage: benches/xds/run.sh [extra xds_load flags, e.g. --edits 20]   (about 2 minutes)
# Env:   ROUNDS=3 PROTOCOLS="sotw delta" RUN_SECS=120 OUT=file.md RAW_OUT=file.jsonl
#        SKIP_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/release (default target/)
#        CONTROL_PLANE=path/to/tern-control-plane tests another build
# Needs: cargo, python3, taskset, timeout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${ROUNDS:-3}"
PROTOCOLS="${PROTOCOLS:-sotw delta}"
RUN_SECS="${RUN_SECS:-120}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN_CPU=0
CP_CPU=1

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in cargo python3 taskset timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[ "$(nproc --all)" -ge 2 ] || die "needs at least 2 cores"

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building tern-control-plane and xds_load (release, $TARGET_DIR)"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release \
        -p tern-control-plane -p tern-benches --bins) >&2
fi
CONTROL_PLANE="${CONTROL_PLANE:-$TARGET_DIR/release/tern-control-plane}"
XDS_LOAD="$TARGET_DIR/release/xds_load"
[ -x "$CONTROL_PLANE" ] || die "no control plane binary at $CONTROL_PLANE"
[ -x "$XDS_LOAD" ] || die "no xds_load binary at $XDS_LOAD"

# Other work on the machine skews everything: say how busy it was before and during the run.
LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: load average is $LOAD_START before starting; results will be noisy"
fi
cpu_jiffies() { awk '/^cpu / { print $2+$3+$4+$5+$6+$7+$8+$9, $9 }' /proc/stat; }
read -r JIFFIES0 STEAL0 < <(cpu_jiffies)

TMP="$(mktemp -d /tmp/tern-xds-bench.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM
RAW="$TMP/raw.jsonl"
: >"$RAW"

read -r -a protocols <<<"$PROTOCOLS"
n=${#protocols[@]}
failed=0
for r in $(seq 1 "$ROUNDS"); do
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${protocols[$(((i + r - 1) % n))]}"); done
    log "round $r/$ROUNDS: ${order[*]}"
    for p in "${order[@]}"; do
        log "  $p"
        set +e
        timeout -k 5 "$RUN_SECS" taskset -c "$LOADGEN_CPU" "$XDS_LOAD" \
            --control-plane "$CONTROL_PLANE" --cp-cpu "$CP_CPU" --protocol "$p" \
            --deadline "$((RUN_SECS - 10))s" "$@" >"$TMP/out.json" &
        pid=$!
        wait "$pid"
        status=$?
        # `timeout` leads a process group of its own: stop whatever is left in it (a control
        # plane whose parent was killed before it could stop it).
        kill -KILL -- "-$pid" 2>/dev/null || true
        set -e
        line="$(tail -n 1 "$TMP/out.json")"
        if [ "$status" -ne 0 ] || [ -z "$line" ]; then
            failed=$((failed + 1))
            log "  $p failed (exit $status)"
            [ -z "$line" ] && line="{\"protocol\": \"$p\", \"error\": \"exit $status\"}"
        fi
        printf '%s\t%s\n' "$r" "$line" >>"$RAW"
    done
done

read -r JIFFIES1 STEAL1 < <(cpu_jiffies)
STEAL_PCT="$(python3 -c "print(round(100*($STEAL1-$STEAL0)/max(1,$JIFFIES1-$JIFFIES0), 1))")"
COMMIT="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(cd "$ROOT" && git status --porcelain 2>/dev/null | wc -l)"
{
    echo "Load average before: $LOAD_START; CPU steal during the run: $STEAL_PCT%."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc --all) cores; $(uname -r); rounds: $ROUNDS;"
    echo "commit $COMMIT ($DIRTY paths changed in the tree); load generator on core $LOADGEN_CPU, control plane on core $CP_CPU."
    echo
    python3 "$HERE/report.py" <"$RAW"
} >"$TMP/report.md"
cat "$TMP/report.md"
[ -n "${OUT:-}" ] && cp "$TMP/report.md" "$OUT"
[ -n "${RAW_OUT:-}" ] && cp "$RAW" "$RAW_OUT"
[ "$failed" -eq 0 ] || die "$failed run(s) failed; see the table"
exit 0
