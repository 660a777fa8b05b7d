#!/bin/sh
# "Pods" on one Linux machine, for the end-to-end tests of sidecar mode and for trying Tern
# without a cluster: one network namespace per pod, each with an eth0 on a shared bridge.
# Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN).
#
#   pods.sh up   PREFIX SUBNET POD...   bridge PREFIX-br at SUBNET.1/24; pod i (from 0) is
#                                       netns PREFIX-POD with eth0 at SUBNET.(10+i)
#   pods.sh down PREFIX POD...          removes them (safe to run twice)
#   pods.sh intercept PREFIX POD [ARGS] runs deploy/iptables/tern-iptables.sh in the pod
#
# Example: pods.sh up tern 10.77.0 web api-1 api-2
#          ip netns exec tern-web curl http://10.77.0.11:8080/
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:?usage: pods.sh up|down|intercept PREFIX ...}
prefix=${2:?PREFIX}
shift 2

case "$cmd" in
  up)
    subnet=${1:?SUBNET, e.g. 10.77.0}
    shift
    bridge="$prefix-br"
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    i=0
    for pod in "$@"; do
      ns="$prefix-$pod"
      # Interface names are at most 15 characters: number the host ends.
      host_end="${prefix}v$i"
      ip netns add "$ns"
      ip link add "$host_end" type veth peer name eth0 netns "$ns"
      ip link set "$host_end" master "$bridge" up
      ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
      ip -n "$ns" route add default via "$subnet.1"
      echo "$pod $subnet.$((10 + i))"
      i=$((i + 1))
    done
    ;;
  down)
    i=0
    for pod in "$@"; do
      ip netns del "$prefix-$pod" 2>/dev/null || true
      ip link del "${prefix}v$i" 2>/dev/null || true
      i=$((i + 1))
    done
    ip link del "$prefix-br" 2>/dev/null || true
    ;;
  intercept)
    pod=${1:?POD}
    shift
    ip netns exec "$prefix-$pod" "$here/../iptables/tern-iptables.sh" "$@"
    ;;
  *)
    echo "pods.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
