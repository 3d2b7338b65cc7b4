#!/usr/bin/env python3
"""Summary of a bench/versions.sh run: per checkout, median [min-max] over repetitions, and each
checkout's median as a ratio of the first one's. Usage: versions_summary.py OUT_DIR LABEL [LABEL ...]"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

ROWS = [  # (title, file kind, getter, higher is better)
    ("sustained delivered/s", "e2e", lambda d: d["sustained_delivered_per_s"], True),
    ("accepted/s (delivery running)", "e2e", lambda d: d["accepted_per_s"], True),
    ("ack p50 ms", "e2e", lambda d: d["ack_ms"]["p50"], False),
    ("ack p99 ms", "e2e", lambda d: d["ack_ms"]["p99"], False),
    ("hub CPU ms per delivered event", "e2e", lambda d: d["hub_cpu_ms_per_event"], False),
    ("other cores (background load)", "e2e", lambda d: d["cpu"]["other_cores"], None),
    ("ingress only: accepted/s", "ingress", lambda d: d["rps_ok"], True),
    ("ingress only: ack p99 ms", "ingress", lambda d: d["latency_ms"]["p99"], False),
    ("ingress only: hub CPU ms per event", "ingress", lambda d: d["server"]["cpu_ms_per_ok_req"], False),
    ("ingress only: other cores", "ingress", lambda d: d["cpu"]["other_cores"], None),
]


def cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.4g} [{min(vals):.4g}–{max(vals):.4g}]"


def main() -> None:
    out, labels = sys.argv[1], sys.argv[2:]
    concs = sorted({int(p.rsplit("-c", 1)[1].split("-")[0]) for p in glob.glob(f"{out}/*-e2e-c*-r*.json")})
    kinds = [(f"e2e-c{c}", f"c{c}") for c in concs] + [("ingress-c64", "ingress c64")]
    heads = ["figure", *labels, *(f"{x} ÷ {labels[0]}" for x in labels[1:])]
    print("| " + " | ".join(heads) + " |")
    print("|---" * len(heads) + "|")
    for kind, kname in kinds:
        for title, fkind, get, _better in ROWS:
            if not kind.startswith(fkind):
                continue
            meds, cells = [], []
            for lab in labels:
                vals = []
                for p in sorted(glob.glob(f"{out}/{lab}-{kind}-r*.json")):
                    try:
                        vals.append(float(get(json.load(open(p)))))
                    except (KeyError, TypeError, ValueError):
                        pass
                cells.append(cell(vals))
                meds.append(statistics.median(vals) if vals else None)
            ratios = [f"{m / meds[0]:.3f}" if m is not None and meds[0] else "-" for m in meds[1:]]
            print("| " + " | ".join([f"{kname}: {title}", *cells, *ratios]) + " |")
    loads = [float(open(p).read()) for p in glob.glob(f"{out}/*.load")]
    if loads:
        print(
            f"\nload average (1 min) at the start of each e2e run: median {statistics.median(loads):.2f}, "
            f"range {min(loads):.2f}–{max(loads):.2f} ({len(loads)} runs)"
        )
    env = os.path.join(out, "env.txt")
    if os.path.exists(env):
        print("\n" + open(env).read().strip())


if __name__ == "__main__":
    main()
