"""Render one run's trace for a terminal: what came in, what each step made, what each destination said."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

MARK = {"success": "ok", "transient": "retry", "terminal": "FAIL", "auth": "PAUSE", "gone": "GONE"}


def _t(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S.%f")[:-3]


def _short(value: Any, limit: int = 400) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def render_batch_run(run: dict[str, Any]) -> str:
    """A batch run: its report (the run's payload), not a step-by-step trace."""
    rep = run["payload"] if isinstance(run["payload"], dict) else {}
    read, took = rep.get("read", 0), rep.get("duration_s") or 0.0
    rate = f" ({read / took:,.0f} rows/s)" if took else ""
    started = datetime.fromtimestamp(run["received_at"], UTC).isoformat(timespec="seconds")
    out = [
        f"run {run['id']}  flow {run['flow']}  batch run {str(rep.get('status', '?')).upper()}",
        f"started {started} by {run['meta'].get('trigger', '?')}, took {took:.1f}s{rate}; mode {rep.get('mode')}",
        "",
        "  "
        + ", ".join(
            f"{k} {rep.get(k, 0):,}" for k in ("read", "inserted", "updated", "unchanged", "deleted")
        ),
        "  " + ", ".join(f"{k} {rep.get(k, 0):,}" for k in ("quarantined", "filtered", "written")),
        f"  cursor {rep.get('cursor_from') or '(start)'} -> {rep.get('cursor_to') or '-'}",
        f"  schema {'; '.join(rep.get('schema_changes') or []) or 'unchanged'}",
    ]
    if rep.get("error"):
        out += [
            "",
            f"{rep.get('status')}: {rep['error']}",
            "Nothing of this run was written; fix it and run again.",
        ]
    if rep.get("quarantined"):
        out.append(f"quarantined rows: `patchbay dead --flow {run['flow']}`")
    return "\n".join(out)


def render_trace(run: dict[str, Any]) -> str:
    if run["meta"].get("batch"):
        return render_batch_run(run)
    out = [
        f"run {run['id']}  flow {run['flow']}  status {run['status'].upper()}",
        f"received {datetime.fromtimestamp(run['received_at'], UTC).isoformat(timespec='milliseconds')}"
        + (f"  key {run['record_key']}" if run.get("record_key") else ""),
    ]
    if run.get("reason"):
        out.append(f"reason: {run['reason']}")
    out.append("")
    out.append(
        f"1. trigger  received {len(json.dumps(run['payload'], default=str))} bytes from {run['meta'].get('remote', '?')}"
    )
    out.append(f"   payload  {_short(run['payload'])}")
    n = 1
    for step in run["trace"]:
        n += 1
        head = f"{n}. {step['step']}"
        if step.get("skipped"):
            out.append(f"{head}  skipped (when was false)")
        elif "error" in step:
            out.append(f"{head}  STOPPED here:")
            out.extend(f"     - {e}" for e in step["error"])
        elif "drift" in step:
            out.append(f"{head}  DRIFT from the flow's input contract:")
            out.extend(f"     - {d}" for d in step["drift"])
        elif "dropped" in step:
            out.append(f"{head}  filtered out: {step['dropped']}")
        elif "waiting" in step:  # a call or lookup asked, its answer not recorded yet
            out.append(f"{head}  waiting on call:{step['step']} (key {step['waiting']}; see below)")
        elif "call" in step:
            where = f"  element {step['element']}" if "element" in step else ""
            out.append(
                f"{head}  answer HTTP {step.get('status')} (call:{step['step']} below){where}"
                f" output {_short(step.get('output'))}"
            )
        elif "elements" in step:
            out.append(f"{head}  {step['elements']} elements, each goes on alone")
        elif "routes" in step:
            routes = ", ".join(
                f"{r['destination']}{'' if r['matched'] else ' (not matched)'}" for r in step["routes"]
            )
            out.append(f"{head}  -> {routes}")
        else:
            out.append(f"{head}  ({step.get('ms', 0)} ms) output {_short(step.get('output'))}")
    for d in run["deliveries"]:
        n += 1
        req = d["request"]
        out.append(
            f"{n}. deliver to {d['destination']}: {d['status'].upper()}  {req.get('method', '')} {req.get('url', '')}"
            f"  key {d['idempotency_key']}"
        )
        for a in d["attempts_log"]:
            code = a["status_code"] if a["status_code"] is not None else "---"
            line = f"     attempt {a['n']}  {_t(a['started_at'])}  {code}  {a['latency_ms']:.0f} ms  {MARK.get(a['outcome'], a['outcome'])}"
            if a["error"]:
                line += f"  {a['error']}"
            out.append(line)
            if a["excerpt"]:
                out.append(f"       response: {a['excerpt'][:300]}")
        if d.get("response"):
            out.append(f"     response fields: {_short(d['response'])}")
        if d["status"] == "pending" and d["attempts"]:
            out.append(f"     next attempt at {_t(d['next_at'])} UTC")
        if d["status"] == "dead":
            out.append(f"     dead letter: {d['last_error']}. Fix it, then `patchbay replay {run['id']}`")
    return "\n".join(out)
