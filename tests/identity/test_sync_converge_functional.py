"""Random edits on both sides for a while (owned fields edited by their owner and by the other side,
a shared field on both, new customers on both): both sides converge to what the rules say, with no
duplicate, no write into a field its owner holds, and no echo loop once the edits stop."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.conftest import eventually
from tests.identity.helpers import Tables, deliveries, polls, sync_project

pytestmark = pytest.mark.slow
N, SECONDS = 30, 12


async def test_random_edits_on_both_sides_converge_to_the_rules(tmp_path, tables: Tables, start_hub):
    emails = [f"p{i}@example.com" for i in range(N)]
    await tables.pg.cursor().executemany(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        [(e, f"Name {i}", "0") for i, e in enumerate(emails)],
    )
    running = await start_hub(sync_project(tmp_path, tables))

    async def both(n: int) -> bool:
        return len(await tables.crm_rows()) == n and len(await tables.mk_rows()) == n

    await eventually(lambda: both(N), timeout=30, what="the first run's creates")
    rnd = random.Random(9)
    name = {e: f"Name {i}" for i, e in enumerate(emails)}  # the CRM owns it: its last edit
    plan: dict[str, str | None] = dict.fromkeys(emails)  # marketing owns it: its last edit
    created: list[str] = []
    log: list[tuple[str, str, str, str]] = []
    t_end = time.monotonic() + SECONDS
    k = 0
    while time.monotonic() < t_end:
        k += 1
        e = rnd.choice(emails)
        what = rnd.choice(["crm_name", "mk_name", "mk_plan", "crm_plan", "crm_phone", "mk_phone", "create"])
        v = f"{what}-{k}"
        if what == "crm_name":
            await tables.pg_exec(f'UPDATE "{tables.crm}" SET name = %s WHERE email = %s', [v, e])
            name[e] = v
        elif what == "mk_name":  # not the owner: will be put back
            await tables.my_exec(f"UPDATE `{tables.mk}` SET full_name = %s WHERE email_address = %s", [v, e])
        elif what == "mk_plan":
            await tables.my_exec(f"UPDATE `{tables.mk}` SET plan = %s WHERE email_address = %s", [v, e])
            plan[e] = v
        elif what == "crm_plan":  # not the owner: will be put back
            await tables.pg_exec(f'UPDATE "{tables.crm}" SET plan = %s WHERE email = %s', [v, e])
        elif what == "crm_phone":
            await tables.pg_exec(f'UPDATE "{tables.crm}" SET phone = %s WHERE email = %s', [v, e])
        elif what == "mk_phone":
            await tables.my_exec(f"UPDATE `{tables.mk}` SET phone = %s WHERE email_address = %s", [v, e])
        else:
            new = f"new{k}@example.com"
            if k % 2:
                await tables.pg_exec(f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', [new, v])
            else:
                await tables.my_exec(
                    f"INSERT INTO `{tables.mk}` (email_address, full_name, plan) VALUES (%s, %s, 'free')",
                    [new, v],
                )
            created.append(new)
        log.append((what, e, v, time.strftime("%X")))
        await asyncio.sleep(rnd.uniform(0.02, 0.12))
    total = N + len(created)
    await eventually(lambda: both(total), timeout=30, what="every new customer on both sides")

    async def settled() -> bool:  # no delivery pending, and both sides agree
        rows = await running.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM deliveries WHERE status != 'delivered'").fetchone()
        )
        crm = {r[1]: r[2:] for r in await tables.crm_rows()}
        mk = {r[1]: r[2:] for r in await tables.mk_rows()}
        return rows[0] == 0 and crm == mk

    await eventually(settled, timeout=60, what="both sides holding the same values")
    before = await deliveries(running)
    await polls(running.hub, 3)
    assert await deliveries(running) == before, "writes went on after the edits stopped: an echo loop"
    crm = {r[1]: r[2:] for r in await tables.crm_rows()}
    mk = {r[1]: r[2:] for r in await tables.mk_rows()}
    assert len(crm) == len(mk) == total  # unique emails: no duplicate on either side
    for e in emails:  # field by field, against the script's own log of edits
        assert crm[e][0] == mk[e][0] == name[e], (e, crm[e], mk[e], [x for x in log if x[1] == e])
        assert crm[e][1] == mk[e][1] == plan[e], (e, crm[e], mk[e], [x for x in log if x[1] == e])
        assert crm[e][2] == mk[e][2]  # the shared phone: one value, whichever the rule kept
    # Never a write into what a system owns (no person decided anything): no `*_correct` deliveries.
    assert not {d for d in before if d.endswith("_correct")}
    conflicts = await running.store.conflicts("customer", limit=10_000)
    non_owner_edits = sum(1 for x in log if x[0] in ("mk_name", "crm_plan"))
    owned = [c for c in conflicts if c["kind"] == "owned"]
    assert non_owner_edits == 0 or owned, "non-owner edits made no conflict"
    assert all(len(c["values"]) == 2 and c["winner"] in ("crm", "marketing") for c in owned)
