"""kill -9 `patchbay serve` in the middle of a sync: after a restart, every customer once on each side."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.cluster.harness import free_port, start_serve
from tests.conftest import eventually
from tests.identity.helpers import Tables, sync_project

pytestmark = pytest.mark.slow
N = 1500


async def test_sigkill_during_a_sync_duplicates_nothing_and_loses_nothing(tmp_path, tables: Tables):
    await tables.pg_exec(f'CREATE UNIQUE INDEX ON "{tables.crm}" (email)')
    await tables.my_exec(f"CREATE UNIQUE INDEX mk_email ON `{tables.mk}` (email_address)")
    rows = [(f"c{i}@example.com", f"C {i}", str(i)) for i in range(N)]
    await tables.pg.cursor().executemany(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)', rows
    )
    port = free_port()
    root = sync_project(tmp_path, tables, upsert_creates=True, hub={"port": port})
    proc = await start_serve(root, port)
    try:

        async def some() -> bool:
            [r] = await tables.my_exec(f"SELECT COUNT(*) FROM `{tables.mk}`")
            return int(r[0]) >= 100

        await eventually(some, timeout=60, what="the first creates in marketing")
        # Meanwhile both sides change: a marketing-owned plan, and new customers on each side.
        await tables.my_exec(f"UPDATE `{tables.mk}` SET plan = 'pro' WHERE id <= 50")
        await tables.pg_exec(
            f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', ["late@crm.io", "Late"]
        )
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await tables.my_exec(
            f"INSERT INTO `{tables.mk}` (email_address, full_name) VALUES (%s, %s)",
            ["new@mk.io", "While down"],
        )
        proc = await start_serve(root, port)

        async def converged() -> bool:
            crm = await tables.crm_rows()
            mk = await tables.mk_rows()
            return len(crm) == N + 2 and len(mk) == N + 2

        await eventually(converged, timeout=120, what="both sides holding every customer")
        await asyncio.sleep(3)  # more polls: nothing may change any more
        crm, mk = await tables.crm_rows(), await tables.mk_rows()
        assert len(crm) == len(mk) == N + 2
        assert {r[1] for r in crm} == {r[1] for r in mk}  # the same customers, each once (unique emails)
        mk_plan = {r[1]: r[3] for r in mk}
        crm_plan = {r[1]: r[3] for r in crm}
        assert sum(1 for p in mk_plan.values() if p == "pro") == 50
        assert crm_plan == mk_plan  # the plan marketing owns reached the CRM for each of them
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
