#!/usr/bin/env python3
"""Identity map and two-way sync benchmark: a PostgreSQL "crm" table and a MariaDB "marketing" table.

  .venv/bin/python bench/identity.py                      # 10,000 customers, 2,000 on both sides
  .venv/bin/python bench/identity.py --n 100000 --overlap 20000

What it measures, on the local servers (PostgreSQL 127.0.0.1:5432 user postgres, MariaDB 127.0.0.1:3306
root), nothing off loopback:
  1. identity lookups/s: the store's `identity_lookup` by link and by normalised email, 100 per call;
  2. the first run: hub start to both tables holding every customer once (records present on both
     sides under other ids, with case and whitespace differences in the email, are linked, not copied);
     identities, duplicates on each side (must be 0), deliveries;
  3. sync records/s each way: one UPDATE changes the phone of K rows on one side; the time until the
     other side holds them all, and the deliveries it took (writes per real change must be 1);
  4. the store's size and the process's peak RSS (the hub runs in this process): before the first run,
     right after it (the first run reads each system page by page: its memory does not grow with them),
     and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG = {"host": "127.0.0.1", "port": 5432, "database": "test", "user": "postgres"}
MY = {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}


async def lookups(n: int) -> tuple[float, float]:
    """(lookups/s by link, lookups/s by key) on a store holding `n` identities."""
    from patchbay.store.base import Identity, IdentityChanges
    from patchbay.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(Path(d) / "store.db")
        try:
            for start in range(0, n, 5000):
                idents = [
                    Identity(
                        f"idn_{i:08d}",
                        "customer",
                        1.0,
                        1.0,
                        golden={"email": {"value": f"u{i}@example.com", "system": "crm", "at": 1.0}},
                        systems={
                            "crm": {"id": str(i), "seen": {}, "written": {}},
                            "mk": {"id": f"m{i}", "seen": {}, "written": {}},
                        },
                        keys=[("email", f"u{i}@example.com")],
                    )
                    for i in range(start, min(n, start + 5000))
                ]
                await store.accept_synced([], IdentityChanges("customer", idents))
            rates = []
            for by_link in (True, False):
                calls, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 2.0:
                    ids = random.sample(range(n), 100)
                    if by_link:
                        found = await store.identity_lookup("customer", [("crm", str(i)) for i in ids], [])
                    else:
                        found = await store.identity_lookup(
                            "customer", [], [("email", f"u{i}@example.com") for i in ids]
                        )
                    assert len(found.identities) == 100
                    calls += 1
                rates.append(calls * 100 / (time.perf_counter() - t0))
            return rates[0], rates[1]
        finally:
            await store.close()


class Sides:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.crm, self.mk = f"bench_crm_{tag}", f"bench_mk_{tag}"

    async def open(self) -> Sides:
        import aiomysql  # type: ignore[import-untyped,unused-ignore]
        import psycopg

        self.pg = await psycopg.AsyncConnection.connect(
            host=PG["host"], dbname="test", user="postgres", autocommit=True
        )
        await self.pg.execute(
            f'CREATE TABLE "{self.crm}" (id serial PRIMARY KEY, email text, name text, plan text, phone text,'
            " updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await self.pg.execute(f'CREATE INDEX ON "{self.crm}" (updated_at, id)')
        await self.pg.execute(
            f"CREATE FUNCTION {self.crm}_stamp() RETURNS trigger AS $$ BEGIN "
            "NEW.updated_at := clock_timestamp(); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        await self.pg.execute(
            f'CREATE TRIGGER {self.crm}_t BEFORE UPDATE ON "{self.crm}" FOR EACH ROW EXECUTE FUNCTION {self.crm}_stamp()'
        )
        self.my = await aiomysql.connect(
            host=MY["host"], user="root", password="", db="test", autocommit=True
        )
        await self.my_exec(
            f"CREATE TABLE `{self.mk}` (id INT AUTO_INCREMENT PRIMARY KEY, email_address VARCHAR(200),"
            " full_name VARCHAR(200), plan VARCHAR(50), phone VARCHAR(50),"
            " updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),"
            " KEY (updated_at, id))"
        )
        return self

    async def my_exec(self, sql: str, params: Any = None) -> list[Any]:
        async with self.my.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall())

    async def fill(self, n: int, overlap: int) -> None:
        """crm holds customers [0, a + overlap), marketing [a, n), a = (n - overlap) / 2: `overlap` on both."""
        a = (n - overlap) // 2
        crm = [(f"user{i}@example.com", f"User {i}", f"{i}") for i in range(0, a + overlap)]
        async with self.pg.cursor() as cur:
            await cur.executemany(f'INSERT INTO "{self.crm}" (email, name, phone) VALUES (%s, %s, %s)', crm)

        def mk_email(i: int) -> str:  # the shared ones written differently: case and spaces
            return f"  User{i}@Example.COM " if i < a + overlap else f"user{i}@example.com"

        rows = [(mk_email(i), f"User {i}", f"{i}", "free") for i in range(a, n)]
        async with self.my.cursor() as cur:
            for start in range(0, len(rows), 5000):
                await cur.executemany(
                    f"INSERT INTO `{self.mk}` (email_address, full_name, phone, plan) VALUES (%s, %s, %s, %s)",
                    rows[start : start + 5000],
                )

    async def counts(self) -> tuple[int, int, int, int]:
        """(crm rows, crm distinct emails, marketing rows, marketing distinct emails)."""
        cur = await self.pg.execute(f'SELECT COUNT(*), COUNT(DISTINCT lower(trim(email))) FROM "{self.crm}"')
        c = await cur.fetchone()
        [m] = await self.my_exec(
            f"SELECT COUNT(*), COUNT(DISTINCT lower(trim(email_address))) FROM `{self.mk}`"
        )
        assert c is not None
        return int(c[0]), int(c[1]), int(m[0]), int(m[1])

    async def close(self) -> None:
        await self.pg.execute(f'DROP TABLE IF EXISTS "{self.crm}"')
        await self.pg.execute(f"DROP FUNCTION IF EXISTS {self.crm}_stamp()")
        await self.pg.close()
        await self.my_exec(f"DROP TABLE IF EXISTS `{self.mk}`")
        self.my.close()


def project(root: Path, s: Sides, concurrency: int) -> Path:
    import yaml

    from tests.conftest import write_project
    from tests.identity.helpers import ENTITY

    crm_cols = {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}
    mk_cols = {"email": "email_address", "name": "full_name", "plan": "plan", "phone": "phone"}

    owned = {"crm": {"email", "name"}, "marketing": {"plan"}}

    def dests(system: str, table: str, cols: dict[str, str]) -> list[dict[str, Any]]:
        every = {c: f"record.{c}" for c in cols.values()}
        mine = {c: f"record.{c}" for f, c in cols.items() if f not in owned[system]}

        def update(name: str, when: str, columns: dict[str, str]) -> dict[str, Any]:
            return {
                "name": f"{system}_{name}",
                "system": system,
                "when": when,
                "table": table,
                "write_mode": "update",
                "key": ["id"],
                "columns": {"id": "id", **columns},
                "expect": {c: f"expected.{c}" for c in columns},  # compare-and-set per column
            }

        return [
            {
                "name": f"{system}_create",
                "system": system,
                "when": "op == 'create'",
                "table": table,
                "write_mode": "insert",
                "columns": every,
            },
            update("update", "op == 'update' && !owned", mine),  # never the columns the table owns
            update("correct", "op == 'update' && owned", every),  # a person's decision may
        ]

    all_dests = dests("crm", s.crm, crm_cols) + dests("marketing", s.mk, mk_cols)
    systems = {
        "crm": {
            "kind": "postgres",
            "owner": "sales",
            "allow_private_network": True,
            "pool_size": concurrency,
            **PG,
        },
        "marketing": {
            "kind": "mysql",
            "owner": "growth",
            "allow_private_network": True,
            "pool_size": concurrency,
            **MY,
        },
    }

    def flow(system: str, table: str) -> dict[str, Any]:
        return {
            "purpose": f"{system} changes reach the other side",
            "owner": "ops",
            "sync": "customer",
            "trigger": {
                "schedule": {"every": "1s"},
                "source": {
                    "system": system,
                    "table": table,
                    "cursor_column": "updated_at",
                    "batch_size": 2000,
                    # Rows are stamped when written and committed later by concurrent writers (the hub's own
                    # deliveries): read again 30 s behind the newest row, or a row committed late is skipped.
                    "lookback": "30s",
                },
            },
            "delivery": {"max_concurrency": concurrency},
            "destinations": all_dests,
        }

    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems),
            "entities/customer.yaml": yaml.safe_dump(ENTITY),
            "flows/crm_sync.yaml": yaml.safe_dump(flow("crm", s.crm)),
            "flows/marketing_sync.yaml": yaml.safe_dump(flow("marketing", s.mk)),
        },
    )


async def deliveries(hub: Any) -> dict[str, int]:
    rows = await hub.store.read(
        lambda c: c.execute("SELECT destination, COUNT(*) FROM deliveries GROUP BY destination").fetchall()
    )
    return {r[0]: r[1] for r in rows}


async def until(check: Any, timeout: float) -> float:
    t0 = time.perf_counter()
    while not await check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the sides did not converge in time")
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0


class Figures(dict[str, Any]):
    """The results, each printed as soon as it is measured (a run that fails later keeps them)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {value}", flush=True)

    def __ior__(self, other: Any) -> Figures:  # type: ignore[override,misc]
        for k, v in dict(other).items():
            self[k] = v
        return self


async def scenario(n: int, overlap: int, k: int, concurrency: int) -> dict[str, Any]:
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub
    from patchbay.security.secrets import SecretResolver

    out = Figures()
    s = await Sides().open()
    try:
        await s.fill(n, overlap)
        with tempfile.TemporaryDirectory() as d:
            root = project(Path(d), s, concurrency)
            hub = Hub(load_or_raise(root), resolver=SecretResolver(None, dict(os.environ)))
            out["rss_before_first_run_mb"] = rss_mb()
            t0 = time.perf_counter()
            await hub.start(lock=False)
            out["first_run_s"] = round(time.perf_counter() - t0, 2)
            out["peak_rss_after_first_run_mb"] = peak_rss_mb()

            async def converged() -> bool:
                c = await s.counts()
                return c[0] == n and c[2] == n

            out["converged_s"] = round(out["first_run_s"] + await until(converged, 900), 2)
            assert hub.store is not None
            store = hub.store

            async def linked() -> bool:  # every created record read back and linked to its identity
                stats = await store.identity_stats("customer")
                return bool(stats["linked"].get("crm") == n and stats["linked"].get("marketing") == n)

            try:
                out["linked_s"] = round(out["converged_s"] + await until(linked, 120), 2)
            except TimeoutError:  # a create not read back: `pending` below says how many wait for their id
                out["linked_s"] = "not all within 120 s"

            await asyncio.sleep(3)  # the polls read back every write: none may cause another
            c = await s.counts()
            assert hub.store is not None
            stats = await hub.store.identity_stats("customer")
            out |= {
                "identities": stats["identities"],
                "linked": stats["linked"],
                "pending": stats["pending"],
                "duplicates_crm": c[0] - c[1],
                "duplicates_marketing": c[2] - c[3],
                "deliveries_first_run": await deliveries(hub),
            }
            for side, other in (("crm", "marketing"), ("marketing", "crm")):
                before = sum((await deliveries(hub)).values())
                tag = f"p{side[:2]}{random.randint(1000, 9999)}"
                t0 = time.perf_counter()
                if side == "crm":
                    await s.pg.execute(f'UPDATE "{s.crm}" SET phone = %s || id WHERE id <= %s', [tag, k])
                else:
                    await s.my_exec(f"UPDATE `{s.mk}` SET phone = CONCAT(%s, id) WHERE id <= %s", [tag, k])

                async def arrived(tag: str = tag, other: str = other) -> bool:
                    if other == "marketing":
                        [r] = await s.my_exec(
                            f"SELECT COUNT(*) FROM `{s.mk}` WHERE phone LIKE %s", [tag + "%"]
                        )
                        return int(r[0]) >= k
                    cur = await s.pg.execute(
                        f'SELECT COUNT(*) FROM "{s.crm}" WHERE phone LIKE %s', [tag + "%"]
                    )
                    r = await cur.fetchone()
                    return r is not None and int(r[0]) >= k

                took = await until(arrived, 600)
                await asyncio.sleep(3)
                writes = sum((await deliveries(hub)).values()) - before
                out[f"{side}_to_{other}"] = {
                    "records": k,
                    "s": round(took, 2),
                    "records_per_s": round(k / took),
                    "writes": writes,
                    "writes_per_change": round(writes / k, 3),
                }
            await hub.stop()
            size = sum(p.stat().st_size for p in (root / ".patchbay").glob("patchbay.db*") if p.is_file())
            out["store_mb"] = round(size / 1e6, 1)
    finally:
        await s.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def rss_mb() -> float:
    """This process's resident memory now, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="customers in all")
    ap.add_argument("--overlap", type=int, default=2_000, help="customers on both sides before the first run")
    ap.add_argument(
        "--changes", type=int, default=2_000, help="rows changed on one side for records/s each way"
    )
    ap.add_argument("--concurrency", type=int, default=8, help="deliveries in flight per destination")
    args = ap.parse_args()
    by_link, by_key = await lookups(args.n)
    print(
        f"identity lookups/s over {args.n} identities: by link {by_link:,.0f}, by normalised email {by_key:,.0f}"
    )
    await scenario(args.n, args.overlap, min(args.changes, args.n), args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
