#!/usr/bin/env python3
"""Reads `round<TAB>json` lines from xds_load (stdin), prints markdown tables.

Each figure is the median over rounds with the min–max spread in parentheses. Runs that
failed are listed below the tables. Usage: report.py < raw.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict

ORDER = ["sotw", "delta"]
LABEL = {"sotw": "State of the World", "delta": "incremental (delta)"}
GOALS = {"edit_p99_ms": 100.0, "sync_ms": 2000.0, "rss_peak_mib": 100.0}


def fmt(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    if len(values) == 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main():
    runs = defaultdict(list)  # protocol -> [run]
    failures = []
    for line in sys.stdin:
        if not line.strip():
            continue
        rnd, text = line.rstrip("\n").split("\t", 1)
        try:
            run = json.loads(text)
        except json.JSONDecodeError:
            failures.append((rnd, "?", text[:200]))
            continue
        if "error" in run:
            failures.append((rnd, run.get("protocol", "?"), run["error"]))
            continue
        runs[run["protocol"]].append(run)
    protocols = [p for p in ORDER if p in runs]
    if not protocols:
        print("No run finished.")
    else:
        first = runs[protocols[0]][0]
        print(f"{first['streams']} streams × {first['services']} services × "
              f"{first['endpoints']} endpoints (+ {first['listeners']} listeners with RDS); "
              f"mesh file {first['mesh_bytes'] / 1024:.0f} KiB; "
              f"{first['edits']} edits per run.\n")

    def col(p, key, digits):
        return fmt([r.get(key) for r in runs[p]], digits)

    if protocols:
        print("Latency (ms): full sync = start of the 100 streams → the last one has ACKed every "
              "resource; edit → ACK = rename of the mesh file → a stream ACKs the changed "
              "ClusterLoadAssignment, over all (stream, edit) pairs; slowest stream = per edit, "
              "the time until all streams have ACKed.\n")
        print("| protocol | runs | full sync | edit→ACK p50 | edit→ACK p99 "
              "| slowest stream per edit, median | slowest stream per edit, max "
              "| control plane's own mean (noticed → ACK) | missing ACKs | NACKs |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for p in protocols:
            print("| " + " | ".join([
                LABEL[p], str(len(runs[p])),
                col(p, "sync_ms", 0), col(p, "edit_p50_ms", 1), col(p, "edit_p99_ms", 1),
                col(p, "edit_max_p50_ms", 1), col(p, "edit_max_max_ms", 1),
                col(p, "cp_eds_push_mean_ms", 1), col(p, "edit_missing", 0),
                col(p, "nacks", 0),
            ]) + " |")
        print("\nControl plane process: RSS (MiB) idle after start-up, 1 s after the full sync, "
              "at the end, and peak (VmHWM); CPU (user + system seconds, 100 % of one core = 1 s "
              "per s) during the sync and during the edit phase.\n")
        print("| protocol | RSS idle | RSS after sync | RSS end | RSS peak | CPU sync s "
              "| CPU edits s | CPU per edit ms | load generator CPU during sync s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p in protocols:
            print("| " + " | ".join([
                LABEL[p],
                col(p, "rss_idle_mib", 1), col(p, "rss_after_sync_mib", 1),
                col(p, "rss_end_mib", 1), col(p, "rss_peak_mib", 1),
                col(p, "cpu_sync_s", 2), col(p, "cpu_edits_s", 2),
                col(p, "cpu_per_edit_ms", 1), col(p, "loadgen_cpu_sync_s", 2),
            ]) + " |")
        print("\nGoals (worst run): ", end="")
        verdicts = []
        for p in protocols:
            for key, limit in GOALS.items():
                worst = max(r[key] for r in runs[p] if r.get(key) is not None)
                verdicts.append(f"{p} {key} {worst:.1f} {'<' if worst < limit else '≥'} "
                                f"{limit:g} {'met' if worst < limit else 'NOT met'}")
        print("; ".join(verdicts) + ".")
    if failures:
        print("\nFailed runs:\n")
        for rnd, p, err in failures:
            print(f"- round {rnd}, {p}: {err}")


if __name__ == "__main__":
    main()
