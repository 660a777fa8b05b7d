#!/bin/sh
# Sends a pod's TCP traffic through its Tern sidecar (run in the pod's network namespace,
# as root or with CAP_NET_ADMIN: by the Kubernetes init container, or by deploy/local/).
#
#   inbound:  every TCP connection arriving at the pod  -> REDIRECT to the inbound port (15006)
#   outbound: every TCP connection the pod's apps open  -> REDIRECT to the outbound port (15001)
#
# The proxy's own connections are recognised by its user id and left alone, so they do not
# loop back into it; so is loopback traffic to 127.0.0.1 (an app calling itself, the proxy
# reaching the app). The proxy reads the original destination with SO_ORIGINAL_DST.
#
# Usage: tern-iptables.sh [--clean] [--proxy-uid UID] [--outbound-port P] [--inbound-port P]
#                         [--exclude-inbound-ports P,P] [--exclude-outbound-ports P,P]
#                         [--exclude-outbound-cidrs CIDR,CIDR]
# Idempotent: the TERN_* chains are flushed and rebuilt on every run.
set -eu

PROXY_UID=1337
OUTBOUND_PORT=15001
INBOUND_PORT=15006
# The proxy's admin port stays reachable (kubelet probes, Prometheus) without the proxy.
EXCLUDE_INBOUND_PORTS=15000
EXCLUDE_OUTBOUND_PORTS=
EXCLUDE_OUTBOUND_CIDRS=
CLEAN=0

while [ $# -gt 0 ]; do
  case "$1" in
    --clean) CLEAN=1 ;;
    --proxy-uid) PROXY_UID=$2; shift ;;
    --outbound-port) OUTBOUND_PORT=$2; shift ;;
    --inbound-port) INBOUND_PORT=$2; shift ;;
    --exclude-inbound-ports) EXCLUDE_INBOUND_PORTS=$2; shift ;;
    --exclude-outbound-ports) EXCLUDE_OUTBOUND_PORTS=$2; shift ;;
    --exclude-outbound-cidrs) EXCLUDE_OUTBOUND_CIDRS=$2; shift ;;
    *) echo "tern-iptables: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

for n in "$PROXY_UID" "$OUTBOUND_PORT" "$INBOUND_PORT"; do
  case "$n" in ''|*[!0-9]*) echo "tern-iptables: $n is not a number" >&2; exit 2 ;; esac
done

# IPv4 always; IPv6 when the pod has ip6tables and IPv6 nat support.
TABLES=iptables
if command -v ip6tables >/dev/null 2>&1 && ip6tables -t nat -L >/dev/null 2>&1; then
  TABLES="iptables ip6tables"
fi

for ipt in $TABLES; do
  loopback=127.0.0.1/32
  [ "$ipt" = ip6tables ] && loopback=::1/128

  # Unhook and drop the chains of an earlier run.
  $ipt -t nat -D PREROUTING -p tcp -j TERN_INBOUND 2>/dev/null || true
  $ipt -t nat -D OUTPUT -p tcp -j TERN_OUTPUT 2>/dev/null || true
  for chain in TERN_INBOUND TERN_OUTPUT; do
    $ipt -t nat -F $chain 2>/dev/null || true
    $ipt -t nat -X $chain 2>/dev/null || true
  done
  [ "$CLEAN" = 1 ] && continue

  $ipt -t nat -N TERN_INBOUND
  $ipt -t nat -N TERN_OUTPUT

  # Inbound: everything but the excluded ports goes to the inbound listener.
  for port in $(echo "$EXCLUDE_INBOUND_PORTS" | tr ',' ' '); do
    $ipt -t nat -A TERN_INBOUND -p tcp --dport "$port" -j RETURN
  done
  $ipt -t nat -A TERN_INBOUND -p tcp -j REDIRECT --to-ports "$INBOUND_PORT"

  # Outbound: the proxy's own traffic first (no loop), then loopback, then exclusions.
  $ipt -t nat -A TERN_OUTPUT -m owner --uid-owner "$PROXY_UID" -j RETURN
  $ipt -t nat -A TERN_OUTPUT -d "$loopback" -j RETURN
  for port in $(echo "$EXCLUDE_OUTBOUND_PORTS" | tr ',' ' '); do
    $ipt -t nat -A TERN_OUTPUT -p tcp --dport "$port" -j RETURN
  done
  if [ "$ipt" = iptables ]; then
    for cidr in $(echo "$EXCLUDE_OUTBOUND_CIDRS" | tr ',' ' '); do
      $ipt -t nat -A TERN_OUTPUT -d "$cidr" -j RETURN
    done
  fi
  $ipt -t nat -A TERN_OUTPUT -p tcp -j REDIRECT --to-ports "$OUTBOUND_PORT"

  $ipt -t nat -A PREROUTING -p tcp -j TERN_INBOUND
  $ipt -t nat -A OUTPUT -p tcp -j TERN_OUTPUT
done
