"""Read-side queries of runs, traces and dead letters, shared by the CLI and the API."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class RunFilter:
    flow: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    key: str | None = None
    limit: int = 50


def list_runs(conn: sqlite3.Connection, f: RunFilter) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if f.flow:
        where.append("e.flow=?")
        args.append(f.flow)
    if f.status:
        where.append("e.status=?")
        args.append(f.status)
    if f.since is not None:
        where.append("e.received_at>=?")
        args.append(f.since)
    if f.until is not None:
        where.append("e.received_at<?")
        args.append(f.until)
    if f.key:
        where.append("(e.record_key=? OR e.record_key=lower(?))")
        args += [f.key, f.key]
    sql = (
        "SELECT e.id, e.flow, e.status, e.received_at, e.updated_at, e.record_key,"
        # Why it is not delivered: the step's reason, else the failing destination's last error.
        " COALESCE(e.reason, (SELECT d.destination || ': ' || d.last_error FROM deliveries d"
        "   WHERE d.event_id=e.id AND d.last_error IS NOT NULL AND d.status!='delivered'"
        "   ORDER BY d.status='dead' DESC, d.id LIMIT 1)) AS reason,"
        " (SELECT COUNT(*) FROM deliveries d WHERE d.event_id=e.id) AS deliveries,"
        " (SELECT COALESCE(SUM(d.attempts),0) FROM deliveries d WHERE d.event_id=e.id) AS attempts"
        " FROM events e" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.seq DESC LIMIT ?"
    )
    args.append(f.limit)
    return [dict(r) for r in conn.execute(sql, args)]


def get_run(
    conn: sqlite3.Connection, event_id: str, sensitive: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """One run for display: its flow's `sensitive` fields redacted (by default the paths are read from
    the flow files of the project this store belongs to)."""
    row = conn.execute("SELECT * FROM events WHERE id=? OR id=?", (event_id, f"evt_{event_id}")).fetchone()
    if row is None:
        return None
    run = dict(row)
    run["payload"] = _loads(run["payload"])
    run["meta"] = orjson.loads(run["meta"])
    run["trace"] = orjson.loads(run["trace"])
    run["deliveries"] = []
    for d in conn.execute("SELECT * FROM deliveries WHERE event_id=? ORDER BY id", (run["id"],)):
        dd = dict(d)
        dd["request"] = orjson.loads(dd["request"])
        dd["attempts_log"] = [
            dict(a)
            for a in conn.execute("SELECT * FROM attempts WHERE delivery_id=? ORDER BY n, id", (d["id"],))
        ]
        resp = conn.execute("SELECT fields FROM responses WHERE delivery_id=?", (d["id"],)).fetchone()
        dd["response"] = None if resp is None else orjson.loads(resp[0])
        run["deliveries"].append(dd)
    paths = list(sensitive) if sensitive is not None else project_sensitive_paths(conn).get(run["flow"], [])
    return redact_run(run, paths)  # with no paths, still shows values sealed at rest as [redacted]


def redact_run(run: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The run with the fields at `paths` redacted in the payload and request bodies, and their values
    redacted wherever else they appear (a response that echoed them, a reason quoting them)."""
    from patchbay.security.redaction import Scrubber, redact_paths, sensitive_values

    values = sensitive_values(run["payload"], paths)
    bodies: list[Any] = []
    for d in run["deliveries"]:
        body = d["request"].get("body") if isinstance(d["request"], dict) else None
        try:
            parsed = orjson.loads(body) if isinstance(body, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        bodies.append(parsed)
        values |= sensitive_values(parsed, paths)
    scrub = Scrubber(values)
    run["payload"] = scrub(redact_paths(run["payload"], paths))
    for d, parsed in zip(run["deliveries"], bodies, strict=True):
        if isinstance(parsed, dict):
            d["request"]["body"] = orjson.dumps(redact_paths(parsed, paths)).decode()
        for k in ("request", "last_error", "response"):
            d[k] = scrub(d.get(k))
        for a in d["attempts_log"]:
            a["excerpt"], a["error"] = scrub(a["excerpt"]), scrub(a["error"])
    for k in ("trace", "reason", "meta", "record_key"):
        if k in run:
            run[k] = scrub(run[k])
    return run


_SENSITIVE_CACHE: dict[str, tuple[tuple[tuple[str, int], ...], dict[str, list[str]]]] = {}


def project_sensitive_paths(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Each flow's `sensitive` paths, read from the flow files of the project whose store `conn` is.

    Read-side callers (the CLI, the API) often hold only the store; the project is found from the
    store file's location (a project keeps it under itself, `.patchbay/patchbay.db` by default).
    """
    from pathlib import Path

    import yaml

    from patchbay.security.project import store_path_of

    db = next((Path(r[2]) for r in conn.execute("PRAGMA database_list") if r[1] == "main" and r[2]), None)
    if db is None:
        return {}
    db = db.resolve()
    for root in list(db.parents)[:4]:
        if not (root / "flows").is_dir() or store_path_of(root).resolve() != db:
            continue
        files = sorted((root / "flows").glob("*.y*ml"))
        stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
        cached = _SENSITIVE_CACHE.get(str(db))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found: dict[str, list[str]] = {}
        for f in files:
            try:
                doc = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("sensitive"), list):
                found[str(doc.get("name") or f.stem)] = [str(p) for p in doc["sensitive"]]
        _SENSITIVE_CACHE[str(db)] = (stamp, found)
        return found
    return {}


def list_dead(conn: sqlite3.Connection, flow: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Dead deliveries and quarantined events, newest first, each with its reason."""
    args: list[Any] = []
    fl = ""
    if flow:
        fl = " AND flow=?"
        args.append(flow)
    rows = conn.execute(
        "SELECT 'delivery' AS kind, d.event_id, d.flow, d.destination, d.last_error AS reason, d.updated_at AS at,"
        " d.attempts, e.record_key, (SELECT a.excerpt FROM attempts a WHERE a.delivery_id=d.id"
        "   ORDER BY a.n DESC, a.id DESC LIMIT 1) AS response"
        " FROM deliveries d JOIN events e ON e.id=d.event_id WHERE d.status='dead'"
        + fl.replace("flow", "d.flow")
        + " UNION ALL SELECT 'quarantine', id, flow, NULL, reason, updated_at, 0, record_key, '' FROM events"
        " WHERE status='quarantined'" + fl + " ORDER BY at DESC LIMIT ?",
        [*args, *args, limit],
    ).fetchall()
    out = [dict(r) for r in rows]
    sensitive = project_sensitive_paths(conn) if out else {}
    for r in out:
        r["response"] = r["response"] or ""
        paths = sensitive.get(r["flow"])
        if paths:  # the destination's answer may echo a sensitive field: scrub it as `runs show` does
            r.update(_scrubbed(conn, r, paths))
    return out


def _scrubbed(conn: sqlite3.Connection, row: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    from patchbay.security.redaction import Scrubber, sensitive_values

    payload = conn.execute("SELECT payload FROM events WHERE id=?", (row["event_id"],)).fetchone()
    scrub = Scrubber(sensitive_values(_loads(payload[0]), paths) if payload else set())
    return {k: scrub(row[k]) for k in ("reason", "response", "record_key")}


def counts(conn: sqlite3.Connection) -> dict[str, Any]:
    ev = {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status")}
    dl = {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status")}
    return {"events": ev, "deliveries": dl}


def _loads(b: bytes) -> Any:
    try:
        return orjson.loads(b)
    except orjson.JSONDecodeError:
        return b.decode("utf-8", "replace")
