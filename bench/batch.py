#!/usr/bin/env python3
"""Batch sync benchmark: Patchbay beside the COPY -> COPY limit, on the shared dlt bench's table.

  bash /work/shared/bench/dlt/setup_server.sh                              # role bench, databases src/dst
  source /work/shared/bench/dlt/env.sh && psql -d src -v n=1000000 -f /work/shared/bench/dlt/gen_source.sql
  .venv/bin/python bench/batch.py                  # full load, merge of 100k changed rows, RSS; ratios
  .venv/bin/python bench/batch.py --repeat 5       # each scenario 5 times (default 3): medians [min-max]
  .venv/bin/python bench/batch.py --pushdown off   # the flow's steps all in Python (no SQL pushdown)
  .venv/bin/python bench/batch.py --duckdb --mariadb   # also PG -> DuckDB, PG -> MariaDB and MariaDB -> PG
  # 5M rows: a separate database, so the 1M table stays as the other benches expect it
  psql -d postgres -c 'CREATE DATABASE src5m OWNER bench'
  psql -d src5m -v n=5000000 -f /work/shared/bench/dlt/gen_source.sql
  .venv/bin/python bench/batch.py --src-db src5m --skip-merge --skip-others --repeat 1

Every figure is taken in the same run as the limit it is compared with, scenario by scenario in each
repetition (the machine is shared and noisy: quote ratios; the load average is printed beside them).
Each Patchbay run is a child process, so its peak RSS is its own; its wall time includes starting
Python, and the run's own duration (what `patchbay run` reports) is shown beside it. The flow is the
dlt bench's table with a mapping (lower(trim(email)), attrs.tier pulled out of the jsonb, the rest
copied) and a validation step (email required and well formed). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG = {
    "host": os.environ.get("PGHOST", "127.0.0.1"),
    "port": int(os.environ.get("PGPORT", "5432")),
    "user": os.environ.get("PGUSER", "bench"),
}
PASSWORD = os.environ.get("PGPASSWORD", "bench")
SRC, DST = os.environ.get("SRC_DB", "src"), os.environ.get("DST_DB", "dst")
COLS = "id, email, first_name, last_name, company, country, updated_at, attrs"
DLT_README = "/work/shared/bench/dlt/README.md"

STEPS = (
    {
        "map": {
            "id": "id",
            "email": "lower(trim(email))",
            "first_name": "first_name",
            "last_name": "last_name",
            "company": "company",
            "country": "country",
            "updated_at": "updated_at",
            "tier": "attrs.tier",
            "attrs": "attrs",
        }
    },
    {"validate": {"email": {"required": True, "format": "email"}}},
)


def psql(db: str, sql: str) -> str:
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    args = [
        "psql",
        "-X",
        "-q",
        "-At",
        "-h",
        PG["host"],
        "-p",
        str(PG["port"]),
        "-U",
        PG["user"],
        "-d",
        db,
        "-c",
        sql,
    ]
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout.strip()


def timed_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read().decode() if proc.stdout else ""  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{args[:3]} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def copy_limit() -> float:
    """psql COPY | psql COPY into a fresh table, as the shared dlt bench measures it (text format): the limit."""
    psql(
        DST,
        "DROP TABLE IF EXISTS pb_limit; CREATE TABLE pb_limit (id bigint, email text, first_name text,"
        " last_name text, company text, country char(2), updated_at timestamptz, attrs jsonb)",
    )
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    base = f"psql -X -q -h {PG['host']} -p {PG['port']} -U {PG['user']}"
    cmd = (
        f"{base} -d {SRC} -c 'COPY public.customers ({COLS}) TO STDOUT' | "
        f"{base} -d {DST} -c 'COPY pb_limit ({COLS}) FROM STDIN'"
    )
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, check=True)
    wall = time.perf_counter() - t0
    psql(DST, "DROP TABLE pb_limit")
    return wall


def merge_reference(since: str) -> float:
    """COPY the changed rows into a temp stage, DELETE + INSERT in one transaction (the dlt bench's reference)."""
    import psycopg

    src = psycopg.connect(dbname=SRC, password=PASSWORD, **PG)
    dst = psycopg.connect(dbname=DST, password=PASSWORD, **PG)
    t0 = time.perf_counter()
    dst.execute("CREATE TEMP TABLE stage (LIKE pb_ref_merge)")
    with src.cursor().copy(
        f"COPY (SELECT {COLS} FROM public.customers WHERE updated_at >= '{since}') TO STDOUT (FORMAT binary)"
    ) as cin:
        with dst.cursor().copy(f"COPY stage ({COLS}) FROM STDIN (FORMAT binary)") as cout:
            for block in cin:
                cout.write(block)
    dst.execute("DELETE FROM pb_ref_merge t USING stage s WHERE t.id = s.id")
    dst.execute(f"INSERT INTO pb_ref_merge ({COLS}) SELECT {COLS} FROM stage")
    dst.commit()
    wall = time.perf_counter() - t0
    src.close()
    dst.close()
    return wall


# ---------------------------------------------------------------- the Patchbay side (a child process)
async def _sync(spec: dict[str, Any], flow: str) -> dict[str, Any]:
    from patchbay.config.batch import BatchSpec
    from patchbay.config.project import StepSpec
    from patchbay.connectors.base import Resources
    from patchbay.connectors.postgres import PostgresSystem
    from patchbay.connectors.postgres_bulk import PostgresBulk
    from patchbay.engine.batch import BatchRun
    from patchbay.registry import STEPS as REGISTRY
    from patchbay.registry import discover

    discover()
    steps = []
    for i, s in enumerate(STEPS):
        ((kind, raw),) = s.items()
        config = REGISTRY[kind].config.model_validate(raw)
        steps.append(
            StepSpec(kind=kind, name=f"{kind}#{i + 1}", config=config, step=REGISTRY[kind].cls(config))
        )

    def side(db: str) -> PostgresBulk:
        system = PostgresSystem.model_validate({**PG, "database": db, "password": {"env": "PGPASSWORD"}})
        return PostgresBulk(
            system, Resources(allow_private=True, secret=lambda ref: PASSWORD, system=db), 600
        )

    def dest(system: str) -> Any:
        if system == "mariadb":
            from patchbay.connectors.mysql import MysqlSystem
            from patchbay.connectors.mysql_bulk import MysqlBulk

            my = MysqlSystem.model_validate({"host": "127.0.0.1", "user": "root", "database": "test"})
            return MysqlBulk(my, Resources(allow_private=True, system="mariadb"), 600)
        if system.startswith("sqlite:"):
            from patchbay.connectors.sqlite import SqliteSystem
            from patchbay.connectors.sqlite_bulk import SqliteBulk

            lite = SqliteSystem.model_validate({"path": system[len("sqlite:") :]})
            return SqliteBulk(lite, Resources(allow_private=True, system="sqlite"), 600)
        return side(DST)

    src, dst = side(SRC), dest(spec["to"]["system"])
    try:
        report = await BatchRun(flow, steps, BatchSpec.model_validate(spec), src, dst).run()
    finally:
        await src.close()
        await dst.close()
    out = report.as_dict()
    out.pop("samples")
    return out


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    print(json.dumps(asyncio.run(_sync(spec, args.flow))))


def patchbay(spec: dict[str, Any], flow: str) -> tuple[float, float, dict[str, Any]]:
    wall, rss, out = timed_child(
        [sys.executable, __file__, "child", "--flow", flow, "--spec", json.dumps(spec)]
    )
    report = json.loads(out.strip().splitlines()[-1])
    if report["status"] != "ok":
        raise SystemExit(f"patchbay run failed: {report['error']}")
    return wall, rss, report


# ---------------------------------------------------------------- PostgreSQL -> DuckDB (flag --duckdb)
async def _sync_duckdb(
    spec: dict[str, Any], flow: str, path: str, mariadb: str | None = None
) -> dict[str, Any]:
    """One run from the bench table into the DuckDB file `path`; or, with `mariadb`, into MariaDB's test
    database ("to", with the steps) or from its pb_full into PostgreSQL's dst database ("from", no steps)."""
    from patchbay.config.batch import BatchSpec
    from patchbay.config.project import StepSpec
    from patchbay.connectors.base import Resources
    from patchbay.connectors.duckdb_bulk import DuckdbBulk, DuckdbSystem
    from patchbay.connectors.postgres import PostgresSystem
    from patchbay.connectors.postgres_bulk import PostgresBulk
    from patchbay.engine.batch import BatchRun
    from patchbay.registry import STEPS as REGISTRY
    from patchbay.registry import discover

    discover()
    steps = []  # the same map + validate as the PostgreSQL -> PostgreSQL load
    for i, s in enumerate(STEPS):
        ((kind, raw),) = s.items()
        config = REGISTRY[kind].config.model_validate(raw)
        steps.append(
            StepSpec(kind=kind, name=f"{kind}#{i + 1}", config=config, step=REGISTRY[kind].cls(config))
        )
    system = PostgresSystem.model_validate({**PG, "database": SRC, "password": {"env": "PGPASSWORD"}})
    src: Any = PostgresBulk(
        system, Resources(allow_private=True, secret=lambda ref: PASSWORD, system=SRC), 600
    )
    dst: Any = None
    if path:
        dst = DuckdbBulk(
            DuckdbSystem.model_validate(
                {
                    "path": path,
                    **(
                        {"memory_limit_mb": int(os.environ["PB_DUCK_MB"])}
                        if os.environ.get("PB_DUCK_MB")
                        else {}
                    ),
                }
            ),
            Resources(allow_private=True, system="duck"),
        )
    if mariadb is not None:
        from patchbay.connectors.mysql import MysqlSystem
        from patchbay.connectors.mysql_bulk import MysqlBulk

        my = MysqlBulk(
            MysqlSystem.model_validate(
                {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}
            ),
            Resources(allow_private=True, system="mariadb"),
            600,
        )
        if mariadb == "to":
            dst = my
        else:
            dst = PostgresBulk(
                PostgresSystem.model_validate({**PG, "database": DST, "password": {"env": "PGPASSWORD"}}),
                Resources(allow_private=True, secret=lambda ref: PASSWORD, system=DST),
                600,
            )
            src, steps = my, []
    try:
        report = await BatchRun(flow, steps, BatchSpec.model_validate(spec), src, dst).run()
    finally:
        await src.close()
        await dst.close()
    out = report.as_dict()
    out.pop("samples")
    return out


def duckdb_load_routes(n: int = 300_000) -> list[tuple[str, float, float, float | None, str]]:
    """DuckDB's bulk routes on the same COPY-text rows: the batch file read by DuckDB's CSV reader (what
    duckdb_bulk does, no pyarrow) against Arrow text columns (the route before; only when pyarrow is
    installed), each cast in one INSERT ... SELECT, in batches of 2,000 rows."""
    import importlib.util

    import duckdb

    from patchbay.batch.frame import NULL
    from patchbay.connectors.duckdb_bulk import _DuckLoad

    rows = [
        [str(i).encode(), f"u{i}@x.io".encode(), b"Ana" if i % 7 else NULL, b"DE",
         f"2024-01-01 00:00:{i % 60:02d}+00".encode(), b'{"tier": "pro"}']
        for i in range(n)
    ]  # fmt: skip
    types = ["BIGINT", "VARCHAR", "VARCHAR", "VARCHAR", "TIMESTAMPTZ", "JSON"]
    casts = ", ".join(f"CAST(c{j} AS {t})" for j, t in enumerate(types))
    cols = "{" + ", ".join(f"'c{j}': 'VARCHAR'" for j in range(6)) + "}"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "patchbay-bench-routes.duckdb"
    batch_file = str(path) + ".tsv"
    path.unlink(missing_ok=True)
    routes = ["batch file"] + (["arrow"] if importlib.util.find_spec("pyarrow") else [])
    out = []
    with duckdb.connect(str(path), config={"threads": 1, "memory_limit": "32MB"}) as c:
        c.execute("SET TimeZone = 'UTC'")
        for route in routes:
            c.execute("DROP TABLE IF EXISTS t")
            c.execute(
                "CREATE TABLE t (id BIGINT, email VARCHAR, fn VARCHAR, cc VARCHAR, ts TIMESTAMPTZ, j JSON)"
            )
            t0 = time.perf_counter()
            for s in range(0, n, 2_000):
                chunk = rows[s : s + 2_000]
                if route == "arrow":
                    import pyarrow as pa

                    _pb_batch = pa.Table.from_arrays(  # found by name (replacement scan)
                        [pa.array([r[j] for r in chunk], type=pa.string()) for j in range(6)],
                        names=[f"c{j}" for j in range(6)],
                    )
                    nulls = ", ".join(f"NULLIF(c{j}, '\\N')" for j in range(6))
                    c.execute(
                        f"INSERT INTO t SELECT {casts} FROM (SELECT {nulls} FROM _pb_batch) AS b(c0, c1, c2, c3, c4, c5)"
                    )
                else:
                    _DuckLoad._to_file(chunk, batch_file)
                    c.execute(
                        f"INSERT INTO t SELECT {casts} FROM read_csv(?, delim = '\\t', quote = '', escape = '',"
                        f" nullstr = '\\N', header = false, auto_detect = false, new_line = '\\n', columns = {cols})",
                        [batch_file],
                    )
            wall = time.perf_counter() - t0
            out.append((f"DuckDB load route: {route} ({n:,} rows, in-process)", wall, n / wall, None, ""))
    path.unlink(missing_ok=True)
    Path(batch_file).unlink(missing_ok=True)
    return out


def duckdb_scenario(full: dict[str, Any], limit: float) -> list[tuple[str, float, float, float | None, str]]:
    """PostgreSQL -> DuckDB full load of the bench table with the same steps (the routes are compared last).
    PB_DUCK_MB sets the DuckDB system's memory_limit_mb (default 32)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "patchbay-bench-batch.duckdb"
    path.unlink(missing_ok=True)
    spec = {**full, "to": {"system": "duck", "table": "pb_full"}}
    wall, rss, out = timed_child(
        [
            sys.executable,
            __file__,
            "child",
            "--flow",
            "bench-duckdb",
            "--spec",
            json.dumps(spec),
            "--duckdb",
            str(path),
        ]
    )
    rep = json.loads(out.strip().splitlines()[-1])
    if rep["status"] != "ok":
        raise SystemExit(f"patchbay run failed: {rep['error']}")
    path.unlink(missing_ok=True)
    rows = [
        (
            "patchbay full load -> DuckDB file, map + validate",
            wall,
            rep["read"] / wall,
            rss,
            f"{limit / wall:.2f}",
        )
    ]
    return rows


def mariadb_scenario(full: dict[str, Any], limit: float) -> list[tuple[str, float, float, float | None, str]]:
    """PostgreSQL -> MariaDB with the steps (MysqlBulk's LOAD DATA LOCAL), then that table read back in bulk
    (one consistent snapshot, a server-side cursor) into PostgreSQL without steps."""
    out = []
    subprocess.run(
        ["mysql", "-uroot", "-h127.0.0.1", "test", "-e", "DROP TABLE IF EXISTS pb_mariadb_full"], check=True
    )
    psql(DST, "DROP TABLE IF EXISTS pb_from_mariadb")
    for direction, spec, label in (
        (
            "to",
            {**full, "to": {"system": "mariadb", "table": "pb_mariadb_full"}},
            "patchbay full load -> MariaDB (LOAD DATA LOCAL), map + validate",
        ),
        (
            "from",
            {
                "from": {"system": "mariadb", "table": "pb_mariadb_full"},
                "to": {"system": "dst", "table": "pb_from_mariadb"},
                "mode": "full",
            },
            "patchbay MariaDB (snapshot, server-side cursor) -> PostgreSQL, no steps",
        ),
    ):
        wall, rss, text = timed_child(
            [
                sys.executable,
                __file__,
                "child",
                "--flow",
                f"bench-mariadb-{direction}",
                "--spec",
                json.dumps(spec),
                "--mariadb",
                direction,
            ]
        )
        rep = json.loads(text.strip().splitlines()[-1])
        if rep["status"] != "ok":
            raise SystemExit(f"patchbay run failed: {rep['error']}")
        out.append((label, wall, rep["read"] / wall, rss, f"{limit / wall:.2f}"))
    subprocess.run(
        ["mysql", "-uroot", "-h127.0.0.1", "test", "-e", "DROP TABLE IF EXISTS pb_mariadb_full"], check=True
    )
    psql(DST, "DROP TABLE IF EXISTS pb_from_mariadb")
    return out


class Table:
    """Samples per scenario over the repetitions; medians [min-max] and ratios of medians."""

    def __init__(self) -> None:
        self.walls: dict[str, list[float]] = {}
        self.runs: dict[str, list[float]] = {}
        self.rows: dict[str, int] = {}
        self.rss: dict[str, list[float]] = {}
        self.loads: list[float] = []

    def add(
        self, name: str, wall: float, rows: int, run_s: float | None = None, rss: float | None = None
    ) -> None:
        self.walls.setdefault(name, []).append(wall)
        self.rows[name] = rows
        if run_s is not None:
            self.runs.setdefault(name, []).append(run_s)
        if rss is not None:
            self.rss.setdefault(name, []).append(rss)
        self.loads.append(os.getloadavg()[0])

    def median(self, name: str, run: bool = False) -> float:
        return statistics.median((self.runs if run else self.walls)[name])

    def cell(self, values: list[float], fmt: str = "{:.2f}") -> str:
        if len(values) == 1:
            return fmt.format(values[0])
        return (
            f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"
        )

    def print(self, ratios: dict[str, tuple[str, bool]]) -> None:
        print()
        print("| scenario | wall s | run s | rows/s (run) | client peak RSS MiB | ratio |")
        print("|---|---|---|---|---|---|")
        for name, walls in self.walls.items():
            runs = self.runs.get(name)
            rate = self.rows[name] / statistics.median(runs or walls)
            rss = self.rss.get(name)
            ratio = ""
            if name in ratios:
                ref, inverse = ratios[name]
                this = statistics.median(runs or walls)
                ratio = f"{self.median(ref) / this:.2f}" if inverse else f"{this / self.median(ref):.2f}x"
                ratio += (
                    f" (wall: {self.median(ref) / statistics.median(walls):.2f})" if inverse and runs else ""
                )
                ratio += (
                    f" (wall: {statistics.median(walls) / self.median(ref):.2f}x)"
                    if not inverse and runs
                    else ""
                )
            print(
                f"| {name} | {self.cell(walls)} | {self.cell(runs) if runs else ''} | {rate:,.0f} |"
                f" {self.cell(rss, '{:.0f}') if rss else ''} | {ratio} |"
            )
        print(
            f"\nload average (1 min) during the run: {min(self.loads):.1f}–{max(self.loads):.1f} on {os.cpu_count()} CPUs"
        )


LIMIT = "limit: psql COPY -> COPY"
FULL = "patchbay full load, map + validate"
REF = "reference: COPY changed -> stage -> DELETE+INSERT"
MERGE = "patchbay merge of the changed rows"


def main() -> None:
    global SRC
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--flow", required=True)
    c.add_argument("--spec", required=True)
    c.add_argument("--duckdb", help="write into this DuckDB file (the --duckdb scenario)")
    c.add_argument("--mariadb", choices=["to", "from"], help="the --mariadb scenario's two directions")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each scenario (medians reported)")
    ap.add_argument("--src-db", default=SRC, help="source database (e.g. src5m for 5M rows)")
    ap.add_argument("--pushdown", choices=("auto", "off"), default="auto")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--skip-others", action="store_true", help="only PostgreSQL -> PostgreSQL")
    ap.add_argument(
        "--duckdb", action="store_true", help="also PostgreSQL -> DuckDB (needs patchbay[duckdb])"
    )
    ap.add_argument(
        "--mariadb",
        action="store_true",
        help="also PostgreSQL -> MariaDB (LOAD DATA LOCAL) and back (MariaDB's bulk read), into database test",
    )
    args = ap.parse_args()
    if args.cmd == "child" and (args.duckdb or args.mariadb):
        print(
            json.dumps(asyncio.run(_sync_duckdb(json.loads(args.spec), args.flow, args.duckdb, args.mariadb)))
        )
        return
    if args.cmd == "child":
        child(args)
        return
    SRC = os.environ["SRC_DB"] = args.src_db  # the children read it too
    n = int(psql(SRC, "SELECT count(*) FROM public.customers"))
    print(
        f"source: public.customers in {SRC}, {n:,} rows; destination database {DST}; pushdown {args.pushdown}"
    )
    if psql(DST, "SELECT to_regclass('_patchbay_sync_state') IS NOT NULL") == "t":
        psql(DST, "DELETE FROM _patchbay_sync_state WHERE flow LIKE 'bench-%'")
    full = {
        "from": {"system": "src", "table": "public.customers"},
        "to": {"system": "dst", "table": "pb_full"},
        "mode": "full",
        "pushdown": args.pushdown,
    }
    merge = {
        **full,
        "to": {"system": "dst", "table": "pb_merge"},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "updated_at"},
    }
    table = Table()
    ratios: dict[str, tuple[str, bool]] = {FULL: (LIMIT, True)}
    if not args.skip_merge:
        # The dlt bench's merge scenario: 1M at the destination, 10 % of the source changed since.
        # Rows sharing the newest timestamp (an earlier run's change) would all be re-read at the cursor's
        # boundary: spread them by microseconds once.
        psql(
            SRC,
            "UPDATE public.customers SET updated_at = updated_at + id * interval '1 microsecond'"
            " WHERE updated_at = (SELECT max(updated_at) FROM public.customers)",
        )
        psql(DST, "DROP TABLE IF EXISTS pb_merge")
        patchbay(merge, "bench-merge")  # first run: everything
        psql(
            DST,
            f"DROP TABLE IF EXISTS pb_ref_merge; CREATE TABLE pb_ref_merge AS SELECT {COLS} FROM pb_merge;"
            " ALTER TABLE pb_ref_merge ADD PRIMARY KEY (id)",
        )
        ratios[MERGE] = (REF, False)
    for rep in range(args.repeat):
        print(f"repetition {rep + 1}/{args.repeat} (load {os.getloadavg()[0]:.1f})", flush=True)
        table.add(LIMIT, copy_limit(), n)
        psql(DST, "DROP TABLE IF EXISTS pb_full")
        wall, rss, rep_full = patchbay(full, "bench-full")
        assert rep_full["written"] == n, rep_full
        table.add(FULL, wall, n, rep_full["duration_s"], rss)
        if not args.skip_merge:
            k = (int(time.time()) + rep) % 10
            since = psql(SRC, "SELECT now()::text")
            # Distinct timestamps: the cursor's boundary holds one row, not the whole last change.
            changed = int(
                psql(
                    SRC,
                    "UPDATE public.customers SET first_name = first_name || '+',"
                    f" updated_at = clock_timestamp() + id * interval '1 microsecond' WHERE id % 10 = {k};"
                    f" SELECT count(*) FROM public.customers WHERE updated_at >= '{since}'",
                )
            )
            table.add(REF, merge_reference(since), changed)
            wall, rss, rep_merge = patchbay(merge, "bench-merge")
            assert rep_merge["updated"] == changed, rep_merge
            table.add(MERGE, wall, changed, rep_merge["duration_s"], rss)
    if not args.skip_merge:
        psql(DST, "DROP TABLE pb_ref_merge")

    if not args.skip_others:
        # The same load into MariaDB (LOAD DATA LOCAL) and into a SQLite file, once each.
        subprocess.run(["mysql", "-uroot", "test", "-e", "DROP TABLE IF EXISTS pb_full"], check=True)
        my = {**full, "to": {"system": "mariadb", "table": "pb_full"}}
        wall, rss, rep_my = patchbay(my, "bench-mariadb")
        name = "patchbay full load -> MariaDB (LOAD DATA LOCAL)"
        table.add(name, wall, n, rep_my["duration_s"], rss)
        ratios[name] = (LIMIT, True)
        lite = Path(os.environ.get("TMPDIR", "/tmp")) / "patchbay-bench-batch.db"
        lite.unlink(missing_ok=True)
        import sqlite3

        sqlite3.connect(lite).close()
        wall, rss, rep_lite = patchbay(
            {**full, "to": {"system": f"sqlite:{lite}", "table": "pb_full"}}, "bench-sqlite"
        )
        name = "patchbay full load -> SQLite file"
        table.add(name, wall, n, rep_lite["duration_s"], rss)
        ratios[name] = (LIMIT, True)
        lite.unlink()

    table.print(ratios)
    extra: list[tuple[str, float, float, float | None, str]] = []
    limit = table.median(LIMIT)
    if args.duckdb:
        extra.extend(duckdb_scenario(full, limit))
    if args.mariadb:
        extra.extend(mariadb_scenario(full, limit))
    if args.duckdb:  # in this process, so last: a child forked from a big parent reports the parent's RSS
        extra.extend(duckdb_load_routes())
    if extra:
        print("\nonce each (the limit: the median above)")
        print("| scenario | wall s | rows/s | client peak RSS MiB | limit time / this |")
        print("|---|---|---|---|---|")
        for name, wall, rate, rss, ratio in extra:
            print(f"| {name} | {wall:.2f} | {rate:,.0f} | {'' if rss is None else f'{rss:.0f}'} | {ratio} |")
    share = table.median(LIMIT) / table.median(FULL, run=True)
    share_wall = table.median(LIMIT) / table.median(FULL)
    print(
        f"\nfull load: {share:.0%} of the COPY -> COPY limit by the run's duration, {share_wall:.0%} by the"
        " child's wall time (floor: 40%)"
    )
    if not args.skip_merge:
        print(
            f"merge: {table.median(MERGE, run=True) / table.median(REF):.2f}x the reference by the run's duration,"
            f" {table.median(MERGE) / table.median(REF):.2f}x by the child's wall time (floor: 1.5x)"
        )
    print(f"pushdown: {'; '.join(rep_full.get('pushdown') or [])}")
    if os.path.exists(DLT_README):
        print(f"dlt figures measured on this kind of machine: {DLT_README} (dlt defaults 7,194 rows/s)")


if __name__ == "__main__":
    main()
