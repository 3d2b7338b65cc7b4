#!/usr/bin/env python3
"""Markdown summary of a bench/run.sh results folder: Patchbay's figures, the peers', ratios, floors.

summarize.py RESULTS_DIR        (cells are median [min–max] over repetitions)
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from typing import Any

FLOOR_NODE_RED = 1.5  # Patchbay sustained delivered/s >= 1.5 x Node-RED's
FLOOR_N8N = 20.0  # ... >= 20 x n8n's
FLOOR_P99_C64_MS = 50.0
FLOOR_IDLE_RSS_MB = 100.0
FLAT_RSS_MB = 10.0  # backlog RSS counts as flat if 10k -> 100k grows less than this

Runs = list[dict[str, Any]]
Floor = tuple[str, str, bool | None]


def med(vals: list[Any]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def mr(vals: list[Any], fmt: str = "{:.0f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    m = fmt.format(statistics.median(vals))
    return m if len(vals) == 1 else f"{m} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def get(r: dict[str, Any], path: str) -> Any:
    """`get(r, "server.peak_tree_rss_mb")`: a dotted path into a result, None when missing."""
    cur: Any = r
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def col(runs: Runs, path: str, fmt: str = "{:.0f}") -> str:
    return mr([get(r, path) for r in runs], fmt)


def lat(runs: Runs, key: str, fmt: str = "{:.1f}") -> str:
    return f"{col(runs, key + '.p50', fmt)} / {col(runs, key + '.p99', fmt)}"


def num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def load_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def group(d: str, pattern: str) -> dict[str, Runs]:
    """{key: [json, ...]} for files in `d` matching `pattern` (a regex whose group 1 is the key)."""
    out: dict[str, Runs] = {}
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        m = re.fullmatch(pattern, os.path.basename(f))
        j = load_json(f) if m else None
        if m and j is not None:
            out.setdefault(m.group(1), []).append(j)
    return out


class Report:
    def __init__(self, d: str) -> None:
        self.d = d
        self.lines: list[str] = []
        self.floors: list[Floor] = []
        self.idle = (load_json(os.path.join(d, "patchbay-idle.json")) or {}).get("idle_tree_rss_mb")
        self.e2e = group(d, r"patchbay-e2e-c(\d+)-r\d+\.json")
        self.ingress = group(d, r"patchbay-ingress-c(\d+)-r\d+\.json")
        self.auth = group(d, r"patchbay-auth-(\w+-c\d+)\.json")
        self.open = load_json(os.path.join(d, "patchbay-open-c64.json"))
        self.cs = [str(c) for c in sorted({int(c) for c in self.e2e} | {int(c) for c in self.ingress})]
        pd = os.path.join(d, "peers")
        self.peers = {}
        for f in sorted(glob.glob(os.path.join(pd, "*-load-c*-r*.json"))):
            m = re.search(r"([^/]+)-load-c(\d+)-r\d+\.json$", f)
            j = load_json(f)
            if m and j:
                self.peers.setdefault((m.group(1), m.group(2)), []).append(j)
        self.peer_idle = {k: v[0].get("idle_tree_rss_mb") for k, v in group(pd, r"(.+)-idle\.json").items()}
        self.peer_faults = group(pd, r"(.+)-fault-r\d+\.json")
        self.peer_open = load_json(os.path.join(pd, "node-red-open-c64.json"))

    def w(self, line: str = "") -> None:
        self.lines.append(line)

    def row(self, name: str, cell: Callable[[str], str]) -> None:
        self.w(f"| {name} | " + " | ".join(cell(c) for c in self.cs) + " |")

    # ------------------------------------------------------------------ sections
    def environment(self) -> None:
        env = os.path.join(self.d, "env.txt")
        if os.path.exists(env):
            self.w("## Environment\n\n```\n" + open(env).read().strip() + "\n```\n")

    def patchbay(self) -> None:
        e2e, ing = self.e2e, self.ingress
        self.w(
            "## Patchbay (median [min–max] over repetitions; wrk via the harness's load.py unless noted)\n"
        )
        self.w("| figure | " + " | ".join(f"c{c}" for c in self.cs) + " |")
        self.w("|---|" + "---|" * len(self.cs))
        self.row(
            "ingress: accepted/s (durable 202), delivery running",
            lambda c: col(e2e.get(c, []), "accepted_per_s"),
        )
        self.row("ingress: ack p50 / p99 ms", lambda c: lat(e2e.get(c, []), "ack_ms"))
        self.row("delivered/s during the load", lambda c: col(e2e.get(c, []), "delivered_per_s_during_load"))
        self.row("backlog when the load stopped (events)", lambda c: col(e2e.get(c, []), "backlog_at_end"))
        self.row("drain after the load (s)", lambda c: col(e2e.get(c, []), "drain_s", "{:.1f}"))
        self.row(
            "**sustained delivered/s** (run incl. drain)",
            lambda c: "**" + col(e2e.get(c, []), "sustained_delivered_per_s") + "**",
        )
        self.row(
            "end to end p50 / p99 ms (received → sink answered)",
            lambda c: lat(e2e.get(c, []), "e2e_ms", "{:.0f}"),
        )
        self.row("lost / undelivered after drain", lambda c: col(e2e.get(c, []), "undelivered_after_drain"))
        self.row("ingress only (destination paused): accepted/s", lambda c: col(ing.get(c, []), "rps_ok"))
        self.row("ingress only: ack p50 / p99 ms", lambda c: lat(ing.get(c, []), "latency_ms"))
        self.row(
            "ingress only: hub CPU ms per accepted event",
            lambda c: col(ing.get(c, []), "server.cpu_ms_per_ok_req", "{:.2f}"),
        )
        for v in ("unsigned", "signed"):
            self.row(f"drive.py {v}: ack/s, p50 / p99 ms", lambda c, v=v: self._auth(v, c, "ack"))
            self.row(
                f"drive.py {v}: end to end p50 / p99 ms (client send → delivered)",
                lambda c, v=v: self._auth(v, c, "e2e"),
            )
        self.row(
            "hub CPU ms per delivered event (ingest + delivery)",
            lambda c: col(e2e.get(c, []), "hub_cpu_ms_per_event", "{:.2f}"),
        )
        self.row(
            "hub peak RSS MB (e2e runs)", lambda c: col(e2e.get(c, []), "server.peak_tree_rss_mb", "{:.1f}")
        )
        self.row(
            "CPU cores: hub / load+sink / other processes",
            lambda c: " / ".join(
                col(e2e.get(c, []), f"cpu.{k}", "{:.2f}")
                for k in ("server_cores", "loadgen_cores", "other_cores")
            ),
        )
        self.w(f"\nIdle RSS: **{self.idle} MB** (tree, 3 s after start).\n")
        op, nro = self.open, self.peer_open
        if op:
            text = (
                f"Open loop, {op.get('offered_rate'):g} requests/s offered over 64 connections "
                "(drive.py; latency "
                f"from each request's due time): Patchbay ack p50 / p99 **{op['ack_ms']['p50']:.1f} / "
                f"{op['ack_ms']['p99']:.1f} ms**, end to end p50 / p99 {op['e2e_ms']['p50']:.0f} / "
                f"{op['e2e_ms']['p99']:.0f} ms, {op['ack_rps']:.0f} acked/s, backlog at the end "
                f"{op['backlog_at_end']}, other cores {get(op, 'cpu.other_cores')}"
            )
            if nro:
                text += (
                    f"; Node-RED (answers after delivering) p50 / p99 {nro['latency_ms']['p50']:.1f} / "
                    f"{nro['latency_ms']['p99']:.1f} ms, {nro['rps_ok']:.0f} ok/s, other cores "
                    f"{get(nro, 'cpu.other_cores')}"
                )
            self.w(text + ".\n")

    def _auth(self, variant: str, c: str, what: str) -> str:
        runs = self.auth.get(f"{variant}-c{c}")
        if not runs:
            return "n/a"
        r = runs[0]
        if what == "ack":
            return f"{r['ack_rps']:.0f}, {r['ack_ms']['p50']:.1f} / {r['ack_ms']['p99']:.1f}"
        return f"{r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f}"

    def backlog(self) -> None:
        bl = load_json(os.path.join(self.d, "patchbay-backlog.json"))
        if not bl:
            return
        self.w("### Backlog behind a paused destination (401), fresh store\n")
        self.w(f"Idle before: {bl['idle_rss_mb']} MB. Acked {bl.get('acked')}, errors {bl.get('errors')}.\n")
        self.w("| queued | destination | RSS MB | VmHWM MB | accepted/s in the phase | store MB |")
        self.w("|---|---|---|---|---|---|")
        for p in bl["points"]:
            cells = (
                p["queued"],
                p["destination"],
                p["rss_mb"],
                p["hwm_mb"],
                p["phase_accepted_per_s"],
                p["db_mb"],
            )
            self.w("| " + " | ".join(str(x) for x in cells) + " |")
        growth = bl.get("rss_growth_mb")
        self.w(f"\nRSS growth first → last point: **{growth} MB**; peak VmHWM {bl.get('peak_hwm_mb')} MB.")
        if bl.get("drain"):
            dr = bl["drain"]
            self.w(
                f"Drain after `patchbay resume` (no ingress): {dr['delivered']} of {dr['queued']} in "
                f"{dr['seconds']} s = **{dr['per_s']}/s**, {dr['left']} left, "
                f"peak RSS {dr['peak_rss_mb']} MB.\n"
            )
        if growth is not None:
            last = bl["points"][-1]["queued"]
            self.floors.append(
                (
                    f"RSS flat as the backlog grows to {last} (growth < {FLAT_RSS_MB:g} MB)",
                    f"{growth} MB, peak {bl.get('peak_hwm_mb')} MB",
                    growth < FLAT_RSS_MB,
                )
            )

    def faults(self) -> bool | None:
        faults = group(self.d, r"patchbay-fault-r(\d+)\.json")
        if not faults:
            return None
        self.w("### kill -9 probe (harness fault.py, c16)\n")
        self.w(
            "| rep | caller 2xx | acked, never delivered | delivered twice | "
            "sink POSTs keyed / distinct keys / distinct ids | repeats reuse the key | s to first 2xx |"
        )
        self.w("|---|---|---|---|---|---|---|")
        ok = True
        for rep, runs in sorted(faults.items(), key=lambda kv: int(kv[0])):
            r = runs[0]
            s = load_json(os.path.join(self.d, f"patchbay-fault-r{rep}.sink.json")) or {}
            same_key = s.get("keyed") == s.get("count") and s.get("unique_keys") == s.get("unique")
            ok = ok and r["accepted_not_delivered"] == 0 and same_key
            keys = f"{s.get('keyed')} / {s.get('unique_keys')} / {s.get('unique')}"
            self.w(
                f"| {rep} | {r['ok_2xx_3xx']} | {r['accepted_not_delivered']} | {r['sink_duplicates']} | "
                f"{keys} | "
                f"{'yes' if same_key else 'NO'} | {r.get('outage_s')} |"
            )
        self.w()
        return ok

    def profile(self) -> None:
        hs = os.path.join(self.d, "hotspots.txt")
        if os.path.exists(hs):
            self.w(
                "### Profile (py-spy, c64)\n\n```\n"
                + "\n".join(open(hs).read().splitlines()[:45])
                + "\n```\n"
            )

    def peer_table(self) -> None:
        self.w("## Same run: peers (answer after delivering, so ok req/s = delivered/s)\n")
        self.w(
            "| system | conc | delivered/s | ack p50 / p99 ms | CPU ms/event | peak RSS MB | idle RSS MB "
            "| hub cores | other cores |"
        )
        self.w("|---|---|---|---|---|---|---|---|---|")
        for c in self.cs:
            runs = self.e2e.get(c, [])
            cells = [
                "patchbay", c, col(runs, "sustained_delivered_per_s") + " (sustained)", lat(runs, "ack_ms"),
                col(runs, "hub_cpu_ms_per_event", "{:.2f}"), col(runs, "server.peak_tree_rss_mb"),
                str(self.idle),
                col(runs, "cpu.server_cores", "{:.2f}"), col(runs, "cpu.other_cores", "{:.2f}"),
            ]  # fmt: skip
            self.w("| " + " | ".join(cells) + " |")
            for (tag, pc), pr in sorted(self.peers.items()):
                if pc != c:
                    continue
                cells = [
                    tag, c, col(pr, "rps_ok", "{:.1f}"), lat(pr, "latency_ms"),
                    col(pr, "server.cpu_ms_per_ok_req", "{:.2f}"), col(pr, "server.peak_tree_rss_mb"),
                    str(self.peer_idle.get(tag, "n/a")), col(pr, "cpu.server_cores", "{:.2f}"),
                    col(pr, "cpu.other_cores", "{:.2f}"),
                ]  # fmt: skip
                self.w("| " + " | ".join(cells) + " |")
        if self.peer_faults:
            parts = [
                f"{tag}: {col(rs, 'accepted_not_delivered')} acknowledged but never delivered "
                f"(of {col(rs, 'ok_2xx_3xx')} 2xx)"
                for tag, rs in sorted(self.peer_faults.items())
            ]
            self.w("\nPeer kill -9 probes: " + "; ".join(parts) + ".")

    def ratios(self) -> None:
        self.w("\n## Ratios (Patchbay sustained delivered/s ÷ peer delivered/s, medians, same concurrency)\n")
        self.w("| conc | patchbay | node-red | ratio (floor ≥ 1.5) | n8n | ratio (floor ≥ 20) |")
        self.w("|---|---|---|---|---|---|")
        for c in self.cs:
            pb = med([r["sustained_delivered_per_s"] for r in self.e2e.get(c, [])])
            nr = med([r["rps_ok"] for r in self.peers.get(("node-red", c), [])])
            n8 = med([r["rps_ok"] for r in self.peers.get(("n8n", c), [])])
            rn = pb / nr if pb and nr else None
            r8 = pb / n8 if pb and n8 else None
            self.w(
                f"| {c} | {num(pb, '{:.0f}')} | {num(nr, '{:.0f}')} | {num(rn, '{:.2f}×')} | "
                f"{num(n8, '{:.1f}')} | {num(r8, '{:.1f}×')} |"
            )
            if rn is not None:
                self.floors.append(
                    (f"delivered/s ≥ 1.5× Node-RED at c{c}", f"{rn:.2f}×", rn >= FLOOR_NODE_RED)
                )
            if r8 is not None:
                self.floors.append((f"delivered/s ≥ 20× n8n at c{c}", f"{r8:.1f}×", r8 >= FLOOR_N8N))
        self.w("\nCPU efficiency (peer CPU ms per delivered event ÷ Patchbay's; less moved by other load):\n")
        self.w("| conc | patchbay ms/event | node-red | ratio | n8n | ratio |")
        self.w("|---|---|---|---|---|---|")
        for c in self.cs:
            pb = med([r.get("hub_cpu_ms_per_event") for r in self.e2e.get(c, [])])
            nr = med([get(r, "server.cpu_ms_per_ok_req") for r in self.peers.get(("node-red", c), [])])
            n8 = med([get(r, "server.cpu_ms_per_ok_req") for r in self.peers.get(("n8n", c), [])])
            rn = nr / pb if nr and pb else None
            r8 = n8 / pb if n8 and pb else None
            self.w(
                f"| {c} | {num(pb, '{:.2f}')} | {num(nr, '{:.2f}')} | {num(rn, '{:.1f}×')} | "
                f"{num(n8, '{:.2f}')} | {num(r8, '{:.1f}×')} |"
            )

    def latency_floors(self) -> None:
        p99 = med([r["ack_ms"]["p99"] for r in self.e2e.get("64", [])])
        self.floors.append(
            (
                "ack p99 < 50 ms at c64, closed loop (wrk, delivery running)",
                num(p99, "{:.1f} ms"),
                None if p99 is None else p99 < FLOOR_P99_C64_MS,
            )
        )
        if self.open:
            p = self.open["ack_ms"]["p99"]
            self.floors.append(
                (
                    f"ack p99 < 50 ms at c64, open loop {self.open.get('offered_rate'):g}/s",
                    f"{p:.1f} ms",
                    p < FLOOR_P99_C64_MS,
                )
            )
        idle = self.idle
        self.floors.append(
            ("idle RSS < 100 MB", f"{idle} MB", None if idle is None else idle < FLOOR_IDLE_RSS_MB)
        )

    def render(self) -> str:
        self.environment()
        self.patchbay()
        self.backlog()
        fault_ok = self.faults()
        self.profile()
        if self.peers:
            self.peer_table()
            self.ratios()
        else:
            self.w("\n(no peer results: run without --no-peers after the harness's install.sh)\n")
        self.latency_floors()
        if fault_ok is not None:
            self.floors.append(
                ("kill -9: 0 acknowledged lost, repeats carry the same key", "see probe table", fault_ok)
            )
        self.w("\n## Floors\n")
        self.w("| floor | measured | met |")
        self.w("|---|---|---|")
        for name, val, ok in self.floors:
            self.w(f"| {name} | {val} | {'n/a' if ok is None else ('yes' if ok else '**NO**')} |")
        return "\n".join(self.lines)


if __name__ == "__main__":
    print(Report(sys.argv[1]).render())
