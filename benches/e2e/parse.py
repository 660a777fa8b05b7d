#!/usr/bin/env python3
"""Turns one load generator's output (stdin) into `round<TAB>target<TAB>metric<TAB>value` lines.

Usage: parse.py wrk|oha|h2load ROUND TARGET < output
Latencies are written in milliseconds, rates in requests per second.
"""

import json
import re
import sys

UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(text):
    out = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["wrk_rps"] = float(m.group(1)) if m else 0.0
    for pct, key in (("50", "wrk_p50_ms"), ("99", "wrk_p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if m:
            out[key] = float(m.group(1)) * UNITS_MS[m.group(2)]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(g) for g in m.groups())
    out["wrk_errors"] = errors
    return out


def oha(text):
    data = json.loads(text)
    summary = data["summary"]
    pct = data["latencyPercentiles"]
    codes = data.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if str(code).startswith("2"))
    total = sum(codes.values()) + sum(data.get("errorDistribution", {}).values())
    return {
        "fixed_rps": summary["requestsPerSec"],
        "fixed_p50_ms": pct["p50"] * 1000.0,
        "fixed_p99_ms": pct["p99"] * 1000.0,
        "fixed_p999_ms": pct["p99.9"] * 1000.0,
        "fixed_errors": total - ok,
    }


def h2load(text):
    out = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    out["h2_rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    out["h2_errors"] = sum(int(g) for g in m.groups()[1:]) if m else -1
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["h2_errors"] += sum(int(g) for g in m.groups()[1:])
    return out


def main():
    kind, rnd, target = sys.argv[1:4]
    text = sys.stdin.read()
    for metric, value in {"wrk": wrk, "oha": oha, "h2load": h2load}[kind](text).items():
        print(f"{rnd}\t{target}\t{metric}\t{value}")


if __name__ == "__main__":
    main()
