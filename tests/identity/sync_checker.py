"""The must-show checker: recompute what a two-way sync must end with from a log of the edits people made,
and compare it field by field with both systems, the hub's own writes and its store.

The entity (tests/identity/test_mustshow_functional.py): customers matched by normalised email; `email` and
`name` owned by the CRM, `plan` by marketing, `phone` shared under `latest` (the hub's clock); deletes
propagate. What the rules say, per customer (its key: the normalised email, which no edit changes):

  - deleted on either side -> gone from both (no live row or contact);
  - an owned field -> the owner's last edit, else the owner's first value, else the value the customer was
    created with on the other side (edits by the non-owner are written back over);
  - the shared field -> the last edit of one side; the later one when the two sides' last edits are more
    than `SETTLE_S` apart and the hub was up around both (the hub's clock orders closer ones);
  - 0 duplicates on either side; 0 hub writes into a field its target owns (the CRM's audit table, the
    marketing service's write log); hub writes per real change <= 1 and none once the edits stop;
  - every conflict in the store carries both values, and every non-owner edit the hub could see (not
    overwritten on its side within `SETTLE_S`, hub up) is in a conflict with its value.

The log is JSON lines: {"t", "side", "op": initial|create|edit|delete, "key", "values"} plus marks
{"mark": "edits"|"down"|"up"|"quiet", "t"}. Run it by hand on a kept test run:

  .venv/bin/python -m tests.identity.sync_checker --log edits.jsonl --store .patchbay/patchbay.db \\
      --pg-table pb_crm_x --marketing http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OWNER = {"email": "crm", "name": "crm", "plan": "marketing"}
SHARED = ("phone",)
FIELDS = ("email", "name", "plan", "phone")
SIDES = ("crm", "marketing")
SETTLE_S = 5.0
POLL_S = 3.5  # how late the CRM's poll reads a change: its period, the 2 s it leaves out, a margin


def key_of(email: Any) -> str:
    return str(email).strip().lower()


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def bad(self, what: str) -> None:
        self.problems.append(what)

    def text(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.figures.items()]
        shown = self.problems[:40]
        lines += [f"PROBLEM {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"... and {len(self.problems) - len(shown)} more problems")
        return "\n".join(lines)


@dataclass
class State:
    """What each side holds now, and what the hub wrote (from the systems themselves)."""

    crm: dict[str, list[dict[str, Any]]]  # key -> live rows
    marketing: dict[str, list[dict[str, Any]]]  # key -> live contacts
    hub_writes: list[dict[str, Any]]  # {side, t, op, key, fields: {field: (old, new)}}


# -------------------------------------------------------------- expected state, from the log
def expected(log: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """key -> {deleted, email, name, plan, phone: set of allowed values}, and the log's marks."""
    marks: dict[str, Any] = {"down": [], "up": []}
    first: dict[tuple[str, str], dict[str, Any]] = {}  # (key, side) -> values it started with there
    edits: dict[tuple[str, str, str], list[tuple[float, Any]]] = defaultdict(list)  # (key, side, field)
    deleted: set[str] = set()
    keys: list[str] = []
    for e in log:
        if "mark" in e:
            if e["mark"] in ("down", "up"):
                marks[e["mark"]].append(e["t"])
            else:
                marks[e["mark"]] = e["t"]
            continue
        k, side = e["key"], e["side"]
        if e["op"] in ("initial", "create"):
            first.setdefault((k, side), e["values"])
            if k not in keys:
                keys.append(k)
        elif e["op"] == "edit":
            for f, v in e["values"].items():
                edits[(k, side, f)].append((e["t"], v))
        elif e["op"] == "delete":
            deleted.add(k)
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        if k in deleted:
            out[k] = {"deleted": True}
            continue
        exp: dict[str, Any] = {"deleted": False}
        starts = [s for s in SIDES if (k, s) in first]
        for f in FIELDS:
            if f in OWNER:
                owner = OWNER[f]
                other = "marketing" if owner == "crm" else "crm"
                if edits.get((k, owner, f)):
                    v = edits[(k, owner, f)][-1][1]
                elif (k, owner) in first:
                    v = first[(k, owner)].get(f)
                else:
                    v = first[(k, other)].get(f)
                exp[f] = {v}
            else:
                last = {s: edits[(k, s, f)][-1] for s in SIDES if edits.get((k, s, f))}
                if not last:  # nobody edited it: the value they started with (the first side's)
                    exp[f] = {first[(k, s)].get(f) for s in starts}
                elif len(last) == 1:
                    exp[f] = {next(iter(last.values()))[1]}
                else:
                    (ta, va), (tb, vb) = last["crm"], last["marketing"]
                    clear = abs(ta - tb) > SETTLE_S and not any(_near_down(t, marks) for t in (ta, tb))
                    exp[f] = {va if ta > tb else vb} if clear else {va, vb}
        out[k] = exp
    return out, marks


def _near_down(t: float, marks: dict[str, Any]) -> bool:
    """Was the hub down (or just back) around `t`? Then both sides' changes are read in either order."""
    for d, u in zip(marks["down"], marks["up"], strict=False):
        if d - SETTLE_S <= t <= u + SETTLE_S:
            return True
    return False


def _hub_up(t0: float, t1: float, marks: dict[str, Any]) -> bool:
    return not any(d <= t1 and t0 <= u for d, u in zip(marks["down"], marks["up"], strict=False)) and not any(
        t0 <= d <= t1 for d in marks["down"]
    )


# -------------------------------------------------------------- the checks
def check(log: list[dict[str, Any]], state: State, store: Path) -> Report:
    r = Report()
    exp, marks = expected(log)
    live = {k: e for k, e in exp.items() if not e["deleted"]}
    r.figures["customers"] = len(exp)
    r.figures["live"] = len(live)
    r.figures["deleted"] = len(exp) - len(live)
    # Duplicates, and customers nobody expects.
    for side, held in (("crm", state.crm), ("marketing", state.marketing)):
        dups = {k: len(v) for k, v in held.items() if len(v) > 1}
        r.figures[f"duplicates_{side}"] = sum(n - 1 for n in dups.values())
        for k, n in list(dups.items())[:10]:
            r.bad(f"{side} holds {k} {n} times")
        for k in held:
            if k not in exp:
                r.bad(f"{side} holds {k}, which no log entry made")
    # Field by field.
    wrong = 0
    for k, e in exp.items():
        for side, held in (("crm", state.crm), ("marketing", state.marketing)):
            rows = held.get(k, [])
            if e["deleted"]:
                if rows:
                    wrong += 1
                    r.bad(f"{k}: deleted (policy propagate) but still live in {side}")
                continue
            if not rows:
                wrong += 1
                r.bad(f"{k}: missing in {side}")
                continue
            for f in FIELDS:
                if rows[0].get(f) not in e[f]:
                    wrong += 1
                    r.bad(f"{k}.{f} in {side} is {rows[0].get(f)!r}, the rules say {sorted(map(str, e[f]))}")
    r.figures["wrong_values"] = wrong
    # The hub's writes: never into a field the target owns; per real change; none after the edits.
    against = [
        w
        for w in state.hub_writes
        if w["op"] == "update" and any(OWNER.get(f) == w["side"] for f in w["fields"])
    ]
    r.figures["writes_against_owner"] = len(against)
    for w in against[:10]:
        r.bad(f"the hub wrote {sorted(w['fields'])} of {w['key']} into {w['side']}, which owns it: {w}")
    t_edits, t_quiet = marks.get("edits", 0.0), marks.get("quiet", float("inf"))
    during = [w for w in state.hub_writes if t_edits <= w["t"] < t_quiet]
    after = [w for w in state.hub_writes if w["t"] >= t_quiet]
    changes = [x for x in log if "mark" not in x and x["op"] != "initial" and x["t"] >= t_edits]
    r.figures["real_changes"] = len(changes)
    r.figures["hub_writes_during_edits"] = len(during)
    r.figures["writes_per_change"] = round(len(during) / max(1, len(changes)), 3)
    r.figures["hub_writes_after_quiet"] = len(after)
    if len(during) > len(changes):
        r.bad(f"{len(during)} hub writes for {len(changes)} real changes: an echo")
    for w in after[:10]:
        r.bad(f"a write after the edits had stopped and both sides agreed (an echo): {w}")
    _check_store(r, store, exp, log, state, marks)
    return r


def _check_store(
    r: Report,
    store: Path,
    exp: dict[str, dict[str, Any]],
    log: list[dict[str, Any]],
    state: State,
    marks: dict[str, Any],
) -> None:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        docs = [json.loads(d) for (d,) in conn.execute("SELECT doc FROM identities WHERE entity='customer'")]
        conflicts = [
            (kind, json.loads(vals), fld)
            for kind, vals, fld in conn.execute("SELECT kind, vals, field FROM identity_conflicts")
        ]
        reviews = conn.execute("SELECT COUNT(*) FROM identity_reviews WHERE status='open'").fetchone()[0]
    finally:
        conn.close()
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in docs:
        g = d.get("golden", {}).get("email")
        if g and g.get("value") is not None:
            by_key[key_of(g["value"])].append(d)
    r.figures["identities"] = len(docs)
    r.figures["open_reviews"] = reviews
    if len(docs) != len(exp):
        r.bad(f"{len(docs)} identities for {len(exp)} customers")
    for k, e in exp.items():
        ds = by_key.get(k, [])
        if len(ds) != 1:
            r.bad(f"{k}: {len(ds)} identities")
            continue
        if e["deleted"]:
            continue
        for side in SIDES:
            if (ds[0].get("systems", {}).get(side) or {}).get("id") is None:
                r.bad(f"{k}: identity {ds[0]['id']} has no {side} id")
    r.figures["conflicts"] = len(conflicts)
    r.figures["conflicts_owned"] = sum(1 for c in conflicts if c[0] == "owned")
    r.figures["conflicts_concurrent"] = sum(1 for c in conflicts if c[0] == "concurrent")
    half = [c for c in conflicts if len(c[1]) != 2 or {v.get("system") for v in c[1]} != set(SIDES)]
    for c in half[:10]:
        r.bad(f"a conflict without both systems' values: {c}")
    seen = {(f, str(v.get("value"))) for _, vals, f in conflicts for v in vals}
    # Every non-owner edit the hub could see is in a conflict with its value.
    writes: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for x in log:
        if "mark" not in x and x["op"] == "edit":
            for f in x["values"]:
                writes[(x["side"], x["key"], f)].append(x["t"])
    hub: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for w in state.hub_writes:
        for f in w["fields"]:
            hub[(w["side"], w["key"], f)].append(w["t"])
    visible = missed = 0
    for x in log:
        if "mark" in x or x["op"] != "edit" or exp.get(x["key"], {}).get("deleted"):
            continue
        for f, v in x["values"].items():
            if OWNER.get(f) in (None, x["side"]):
                continue
            t = x["t"]
            if not _hub_up(t - 1, t + SETTLE_S, marks):
                continue
            if any(t < t2 <= t + SETTLE_S for t2 in writes[(x["side"], x["key"], f)]):
                continue  # overwritten on its side by another edit before the hub surely read it
            # The CRM is read up to POLL_S late: a hub write within that (of another change) can overwrite the
            # edit before it is read. Marketing's webhook tells each change at once.
            if x["side"] == "crm" and any(t < t2 <= t + POLL_S for t2 in hub[(x["side"], x["key"], f)]):
                continue
            visible += 1
            if (f, str(v)) not in seen:
                missed += 1
                r.bad(f"{x['side']} changed {f} of {x['key']} to {v!r} (it does not own it): no conflict")
    r.figures["non_owner_edits_visible"] = visible
    r.figures["non_owner_edits_without_conflict"] = missed


# -------------------------------------------------------------- reading the systems
async def read_state(pg_table: str, marketing_url: str, pg: dict[str, Any] | None = None) -> State:
    import aiohttp
    import psycopg

    pg = pg or {"host": "127.0.0.1", "port": 5432, "dbname": "test", "user": "postgres"}
    crm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    writes: list[dict[str, Any]] = []
    async with await psycopg.AsyncConnection.connect(**pg, autocommit=True) as conn:
        cur = await conn.execute(
            f'SELECT id, email, name, plan, phone FROM "{pg_table}" WHERE deleted_at IS NULL ORDER BY id'
        )
        for rid, email, name, plan, phone in await cur.fetchall():
            crm[key_of(email)].append({"id": rid, "email": email, "name": name, "plan": plan, "phone": phone})
        cur = await conn.execute(
            f"SELECT extract(epoch FROM at)::float8, op, old, new FROM \"{pg_table}_audit\" WHERE actor = 'hub' "
            "ORDER BY n"
        )
        for t, op, old, new in await cur.fetchall():
            row = new or old
            changed = {
                f: ((old or {}).get(f), (new or {}).get(f))
                for f in FIELDS
                if op != "UPDATE" or old.get(f) != new.get(f)
            }
            writes.append(
                {"side": "crm", "t": t, "op": op.lower(), "key": key_of(row["email"]), "fields": changed}
            )
    mk: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ids: dict[str, str] = {}  # contact id -> key, deleted ones too
    async with aiohttp.ClientSession() as s:
        since: str | None = "0"
        while since is not None:
            async with s.get(f"{marketing_url}/contacts", params={"since": since, "limit": 5000}) as resp:
                body = await resp.json()
            for item in body["data"]:
                ids[item["id"]] = key_of(item["contact"]["email"])
                if item["type"] != "contact.deleted":
                    c = item["contact"]
                    mk[key_of(c["email"])].append({f: c.get(f) for f in ("id", *FIELDS)})
            since = body["next_cursor"]
        async with s.get(f"{marketing_url}/_writes") as resp:
            mk_writes = await resp.json()
    for w in mk_writes:
        op = {"POST": "insert", "PATCH": "update", "DELETE": "delete"}[w["method"]]
        body = w["body"] or {}
        key = key_of(body["email"]) if "email" in body else ids.get(w["id"], w["id"])
        writes.append(
            {"side": "marketing", "t": w["at"], "op": op, "key": key, "fields": dict.fromkeys(body)}
        )
    return State(dict(crm), dict(mk), writes)


def load_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, required=True, help="the test's edit log (JSON lines)")
    ap.add_argument("--store", type=Path, required=True, help="the hub's SQLite store file")
    ap.add_argument("--pg-table", required=True, help="the CRM table (its audit table is TABLE_audit)")
    ap.add_argument("--marketing", required=True, help="the marketing service's base URL")
    args = ap.parse_args(argv)
    state = asyncio.run(read_state(args.pg_table, args.marketing))
    report = check(load_log(args.log), state, args.store)
    print(report.text())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
