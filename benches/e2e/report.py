#!/usr/bin/env python3
"""Reads `round<TAB>target<TAB>metric<TAB>value` lines (stdin), prints markdown tables.

Each figure is the median over rounds with the min..max spread; ratios and the added p99 are
computed within each round (same load generator, same minute) before taking the median.
Usage: report.py RATE < raw.tsv
"""

import statistics
import sys
from collections import defaultdict

ORDER = ["direct", "nginx", "haproxy", "tern", "tern_policy", "tern_log", "tern_t1", "tern_t100", "tern_b"]
LABEL = {
    "direct": "direct (upstream nginx)",
    "nginx": "nginx 1 worker",
    "haproxy": "HAProxy 1 thread",
    "tern": "tern-proxy",
    "tern_policy": "tern-proxy + resilience policies",
    "tern_log": "tern-proxy + JSON access log to a file",
    "tern_t1": "tern-proxy + tracing, 1 % sampled",
    "tern_t100": "tern-proxy + tracing, 100 % sampled",
    "tern_b": "tern-proxy B (TERN_BIN_B)",
}


def main():
    rate = sys.argv[1] if len(sys.argv) > 1 else "?"
    data = defaultdict(dict)  # (target, metric) -> {round: value}
    for line in sys.stdin:
        rnd, target, metric, value = line.rstrip("\n").split("\t")
        data[(target, metric)][int(rnd)] = float(value)
    targets = [t for t in ORDER if (t, "rss_idle_kib") in data]

    def rounds(t, m):
        return data.get((t, m), {})

    def fmt(values, digits):
        if not values:
            return "n/a"
        med = statistics.median(values)
        lo, hi = min(values), max(values)
        if len(values) == 1 or lo == hi:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"

    def per_round(t, m, base, op):
        a, b = rounds(t, m), rounds(base, m)
        return [op(a[r], b[r]) for r in sorted(a) if r in b and (op is not ratio or b[r])]

    def ratio(x, y):
        return x / y

    def diff(x, y):
        return x - y

    def one(t, m):
        return list(rounds(t, m).values())

    print(f"HTTP/1.1: max throughput `wrk -t1 -c32`; latency at a fixed {rate} req/s "
          "`oha -c16 --latency-correction`; CPU and RSS of the proxy process(es) "
          "(for `direct`: of the upstream).\n")
    print("| target | max req/s | × direct | × nginx | × tern | p50 ms @fixed | p99 ms @fixed "
          "| p99 added ms | CPU % @fixed | RSS idle MiB | RSS after MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        kib = lambda m: [v / 1024 for v in one(t, m)]  # noqa: E731
        print("| " + " | ".join([
            LABEL[t],
            fmt(one(t, "wrk_rps"), 0),
            fmt(per_round(t, "wrk_rps", "direct", ratio), 2),
            fmt(per_round(t, "wrk_rps", "nginx", ratio), 2) if "nginx" in targets else "n/a",
            fmt(per_round(t, "wrk_rps", "tern", ratio), 3) if t.startswith("tern") else "—",
            fmt(one(t, "fixed_p50_ms"), 3),
            fmt(one(t, "fixed_p99_ms"), 3),
            "—" if t == "direct" else fmt(per_round(t, "fixed_p99_ms", "direct", diff), 3),
            fmt(one(t, "cpu_pct"), 1),
            fmt(kib("rss_idle_kib"), 1),
            fmt(kib("rss_after_kib"), 1),
        ]) + " |")

    print("\nHTTP/1.1 latency at saturation (`wrk -c32`, not corrected) and achieved fixed rate:\n")
    print("| target | p50 ms @max | p99 ms @max | achieved req/s @fixed | p99.9 ms @fixed |")
    print("|---|---|---|---|---|")
    for t in targets:
        print("| " + " | ".join([
            LABEL[t],
            fmt(one(t, "wrk_p50_ms"), 3),
            fmt(one(t, "wrk_p99_ms"), 3),
            fmt(one(t, "fixed_rps"), 0),
            fmt(one(t, "fixed_p999_ms"), 3),
        ]) + " |")

    print("\nHTTP/2 h2c prior knowledge: `h2load -c16 -m10` (proxies forward over HTTP/1.1):\n")
    print("| target | req/s | × direct | × nginx | × tern |")
    print("|---|---|---|---|---|")
    for t in targets:
        print("| " + " | ".join([
            LABEL[t],
            fmt(one(t, "h2_rps"), 0),
            fmt(per_round(t, "h2_rps", "direct", ratio), 2),
            fmt(per_round(t, "h2_rps", "nginx", ratio), 2) if "nginx" in targets else "n/a",
            fmt(per_round(t, "h2_rps", "tern", ratio), 3) if t.startswith("tern") else "—",
        ]) + " |")

    errors = {
        (t, m): sum(one(t, m))
        for t in targets
        for m in ("wrk_errors", "fixed_errors", "h2_errors")
        if sum(one(t, m)) != 0
    }
    if errors:
        print("\nWARNING: failed or non-2xx requests: "
              + ", ".join(f"{t} {m}={int(n)}" for (t, m), n in errors.items()))
    else:
        print("\nNo failed or non-2xx requests in any run.")


if __name__ == "__main__":
    main()
