"""Two-way sync of a PostgreSQL "crm" table and a MariaDB "marketing" table through a real hub.

Both tables stamp their own updated_at on every write, so every write the hub makes is read back by the
other side's poll: the echo must be recognised by value, not by time.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import eventually
from tests.identity.helpers import ENTITY, Tables, cli, deliveries, polls, sync_project


async def test_two_way_sync_writes_once_each_way_and_never_echoes(tmp_path, tables: Tables, start_hub):
    hub = await start_hub(sync_project(tmp_path, tables))
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        [" Ada@Example.com", "Ada", "111"],
    )

    async def in_marketing() -> bool:
        return len(await tables.mk_rows()) == 1

    await eventually(in_marketing, timeout=20, what="the CRM's customer created in marketing")
    await polls(hub, 3)  # marketing reads its new row (the echo); the CRM reads nothing new
    [mk] = await tables.mk_rows()
    assert mk[1:] == (" Ada@Example.com", "Ada", None, "111")
    assert await deliveries(hub) == {"marketing_create": 1}
    assert len(await tables.crm_rows()) == 1

    # A shared field changed in marketing reaches the CRM once, and its echo stops there.
    await tables.my_exec(f"UPDATE `{tables.mk}` SET phone = '222', plan = 'pro' WHERE id = %s", [mk[0]])

    async def crm_has_it() -> bool:
        [row] = await tables.crm_rows()
        return row[3:] == ("pro", "222")

    await eventually(crm_has_it, timeout=20, what="marketing's phone and plan in the CRM")
    await polls(hub, 3)
    assert await deliveries(hub) == {"marketing_create": 1, "crm_update": 1}

    # Marketing edits the name, which the CRM owns: recorded as a conflict, the CRM's value written back
    # to marketing, nothing written to the CRM.
    await tables.my_exec(f"UPDATE `{tables.mk}` SET full_name = 'Ada L.' WHERE id = %s", [mk[0]])

    async def restored() -> bool:
        [row] = await tables.mk_rows()
        return row[2] == "Ada" and len(await hub.store.conflicts("customer")) == 1

    await eventually(restored, timeout=20, what="the owner's name written back to marketing")
    await polls(hub, 3)
    assert await deliveries(hub) == {"marketing_create": 1, "crm_update": 1, "marketing_update": 1}
    [conflict] = await hub.store.conflicts("customer")
    assert conflict["field"] == "name" and conflict["kind"] == "owned" and conflict["winner"] == "crm"
    assert [v["value"] for v in conflict["values"]] == ["Ada", "Ada L."]
    [crm] = await tables.crm_rows()
    assert crm[1:] == (" Ada@Example.com", "Ada", "pro", "222")

    stats = await hub.store.identity_stats("customer")
    assert stats["identities"] == 1 and stats["linked"] == {"crm": 1, "marketing": 1}
    await asyncio.sleep(0)


async def test_a_whole_row_update_never_overwrites_a_field_changed_there_since_the_hub_read_it(
    tmp_path, tables: Tables, start_hub
):
    hub = await start_hub(sync_project(tmp_path, tables))
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        ["ada@example.com", "Ada", "111"],
    )

    async def in_marketing() -> bool:
        return len(await tables.mk_rows()) == 1

    await eventually(in_marketing, timeout=20, what="the customer created in marketing")
    await polls(hub, 2)
    [mk] = await tables.mk_rows()
    # A marketing user changes the shared phone, and the hub has not read it yet (updated_at kept, so no
    # poll sees it before the hub's next write: the window between a read and a write, made wide).
    await tables.my_exec(
        f"UPDATE `{tables.mk}` SET phone = '999', updated_at = updated_at WHERE id = %s", [mk[0]]
    )
    # The CRM renames the customer: the hub writes marketing's row, whole (every column it may set).
    await tables.pg_exec(f'UPDATE "{tables.crm}" SET name = %s', ["Ada B."])

    async def converged() -> bool:
        [crm], [m] = await tables.crm_rows(), await tables.mk_rows()
        return m[2] == "Ada B." and crm[4] == "999" and m[4] == "999"

    # The name moved; the phone marketing's user set was kept, read back, and went to the CRM.
    await eventually(converged, timeout=20, what="the rename in marketing and marketing's phone kept")
    await polls(hub, 3)
    [crm], [m] = await tables.crm_rows(), await tables.mk_rows()
    assert crm[1:] == ("ada@example.com", "Ada B.", None, "999") and m[1:] == crm[1:]


@pytest.mark.parametrize("lookback", ["5s", "0s"])
async def test_a_row_the_hub_created_that_commits_late_is_still_read_back_and_linked(
    tmp_path, tables: Tables, start_hub, lookback: str
):
    # The CRM stamps updated_at when a row is written, and this insert commits 3 s later (a slow trigger,
    # as a busy server or a long transaction would): a row stamped later and committed meanwhile moves
    # the cursor past it. Without a lookback the hub's own create is never read back and never linked:
    # then it is flagged overdue after the entity's read_back_within, never left waiting silently.
    await tables.pg_exec(
        f"CREATE FUNCTION {tables.crm}_slow() RETURNS trigger AS $$ BEGIN "
        "IF NEW.name = 'Slow Ada' THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
    )
    await tables.pg_exec(
        f'CREATE TRIGGER {tables.crm}_s BEFORE INSERT ON "{tables.crm}" '
        f"FOR EACH ROW EXECUTE FUNCTION {tables.crm}_slow()"
    )
    try:
        entity = {**ENTITY, "read_back_within": "8s"}
        hub = await start_hub(sync_project(tmp_path, tables, entity, lookback=lookback))
        await tables.my_exec(
            f"INSERT INTO `{tables.mk}` (email_address, full_name) VALUES (%s, %s)",
            ["ada@example.com", "Slow Ada"],
        )

        async def creating() -> bool:
            rows = await tables.pg_exec(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                [f'INSERT INTO "{tables.crm}"%'],
            )
            return rows[0][0] > 0

        await eventually(creating, timeout=20, what="the hub's insert into the CRM under way")
        # A row stamped after the hub's (2 s ahead: whenever the slow insert stamps its row, this one is
        # later), committed at once: the next poll reads it and the cursor passes the uncommitted row.
        await tables.pg_exec(
            f'INSERT INTO "{tables.crm}" (email, name, updated_at)'
            " VALUES (%s, %s, clock_timestamp() + interval '2 s')",
            ["bob@example.com", "Bob"],
        )

        async def linked() -> bool:
            stats = await hub.store.identity_stats("customer")
            return stats["linked"] == {"crm": 2, "marketing": 2}

        async def flagged() -> bool:
            stats = await hub.store.identity_stats("customer")
            return stats["pending"] == {"waiting": 1, "overdue": 1}

        if lookback == "0s":
            await eventually(flagged, timeout=20, what="the unlinked create flagged overdue")
            assert (await hub.store.identity_stats("customer"))["linked"] == {"crm": 1, "marketing": 2}
            return
        await eventually(linked, timeout=20, what="both customers linked on both sides")
        assert (await hub.store.identity_stats("customer"))["pending"] == {"waiting": 0, "overdue": 0}
        assert len(await tables.crm_rows()) == 2 and len(await tables.mk_rows()) == 2
    finally:
        await tables.pg_exec(f'DROP TRIGGER IF EXISTS {tables.crm}_s ON "{tables.crm}"')
        await tables.pg_exec(f"DROP FUNCTION IF EXISTS {tables.crm}_slow()")


async def test_first_run_links_records_present_on_both_sides_and_creates_the_rest(
    tmp_path, tables: Tables, start_hub
):
    crm = [(f"user{i}@example.com", f"User {i}", f"10{i}") for i in range(5)]
    await tables.pg.cursor().executemany(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)', crm
    )
    # Two of them already in marketing, under other ids, with case and whitespace differences; one only there.
    mk = [
        ("  USER1@Example.com ", "User 1", "101", "pro"),
        ("user3@EXAMPLE.COM", "User 3", "103", None),
        ("only@marketing.io", "Only M", None, "free"),
    ]
    for row in mk:
        await tables.my_exec(
            f"INSERT INTO `{tables.mk}` (email_address, full_name, phone, plan) VALUES (%s, %s, %s, %s)",
            list(row),
        )
    root = sync_project(tmp_path, tables)
    code, out = await asyncio.to_thread(cli, root, "sync", "preview", "customer")
    assert code == 0, out
    # Linked: user1 and user3. Created: 3 in marketing, 1 in the CRM. The CRM owns the email, so the two
    # emails written differently in marketing are conflicts settled by the owner and written back (2
    # updates), and the plan marketing owns goes to the CRM for user1 (1 update).
    assert "would link 2, create 4, update 3, conflicts 2, review 0 (6 identities from 8 records)" in out
    assert await tables.my_exec(f"SELECT COUNT(*) FROM `{tables.mk}`") == [(3,)]  # the preview wrote nothing

    hub = await start_hub(root)

    async def converged() -> bool:
        return len(await tables.crm_rows()) == 6 and len(await tables.mk_rows()) == 6

    await eventually(converged, timeout=20, what="both sides holding the 6 customers")
    await polls(hub, 3)
    crm_emails = sorted(r[1].strip().lower() for r in await tables.crm_rows())
    mk_emails = sorted(r[1].strip().lower() for r in await tables.mk_rows())
    assert crm_emails == mk_emails and len(set(crm_emails)) == 6  # no duplicates on either side
    stats = await hub.store.identity_stats("customer")
    assert stats["identities"] == 6 and stats["linked"] == {"crm": 6, "marketing": 6}
    assert await deliveries(hub) == {
        "marketing_create": 3,
        "crm_create": 1,
        "marketing_update": 2,
        "crm_update": 1,
    }
    assert {c["kind"] for c in await hub.store.conflicts("customer")} == {"owned"}
    # The plan marketing owns reached the CRM for the customer present on both sides.
    [user1] = [r for r in await tables.crm_rows() if r[1] == "user1@example.com"]
    assert user1[3] == "pro"

    code, out = await asyncio.to_thread(cli, root, "identities", "show", "customer", " User1@EXAMPLE.com")
    assert code == 0, out
    assert "crm: id " in out and "marketing: id " in out and "owner marketing" in out


async def test_a_delete_is_propagated_and_a_mass_delete_stops_the_source(tmp_path, tables: Tables, start_hub):
    entity = {
        **ENTITY,
        "systems": {
            **ENTITY["systems"],
            "crm": {**ENTITY["systems"]["crm"], "deleted": "deleted_at != null"},
        },
        "deletes": {"policy": "propagate", "max_share": 0.5, "min_identities": 5},
    }
    delete = {
        "name": "marketing_delete",
        "system": "marketing",
        "when": "op == 'delete'",
        "table": tables.mk,
        "write_mode": "delete",
        "key": ["id"],
        "columns": {"id": "id"},
    }
    rows = [(f"u{i}@example.com", f"U{i}") for i in range(10)]
    await tables.pg.cursor().executemany(f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', rows)
    hub = await start_hub(sync_project(tmp_path, tables, entity, [delete]))

    async def count_mk(n: int) -> bool:
        return len(await tables.mk_rows()) == n

    await eventually(lambda: count_mk(10), timeout=20, what="10 customers in marketing")
    await tables.pg_exec(f"UPDATE \"{tables.crm}\" SET deleted_at = now() WHERE email = 'u0@example.com'")
    await eventually(lambda: count_mk(9), timeout=20, what="the deleted customer gone from marketing")
    assert (await hub.store.identity_stats("customer"))["status"] == {"active": 9, "deleted": 1}

    # 6 of the 9 left deleted at once (67 %, over max_share 50 %): refused whole, the source stops.
    await tables.pg_exec(
        f'UPDATE "{tables.crm}" SET deleted_at = now() WHERE email IN '
        "('u1@example.com','u2@example.com','u3@example.com','u4@example.com','u5@example.com','u6@example.com')"
    )

    async def stopped() -> bool:
        state = (await hub.store.source_states()).get("crm_sync")
        return state is not None and state.state == "stopped"

    await eventually(stopped, timeout=20, what="the crm source stopped by the delete guard")
    state = (await hub.store.source_states())["crm_sync"]
    assert (
        "would delete 6 of 10 identities, with 1 deleted within the last 1h (70%, more than deletes.max_share 50%)"
        in (state.error or "")
    )
    await asyncio.sleep(1.5)
    assert len(await tables.mk_rows()) == 9  # nothing of that batch was applied
    assert (await hub.store.identity_stats("customer"))["status"] == {"active": 9, "deleted": 1}
    assert "crm_sync" in hub.hub.unhealthy_sources()  # what /readyz, the API and the alert rules read


async def test_a_mass_delete_read_in_small_batches_still_stops_at_the_share(
    tmp_path, tables: Tables, start_hub
):
    # The guard counts the deletes of the last `deletes.window` too: a delete of 60 % of the customers read
    # two rows at a time is stopped once the share passes max_share, not applied batch by batch.
    entity = {
        **ENTITY,
        "systems": {
            **ENTITY["systems"],
            "crm": {**ENTITY["systems"]["crm"], "deleted": "deleted_at != null"},
        },
        "deletes": {"policy": "propagate", "max_share": 0.3, "min_identities": 5},
    }
    delete = {
        "name": "marketing_delete",
        "system": "marketing",
        "when": "op == 'delete'",
        "table": tables.mk,
        "write_mode": "delete",
        "key": ["id"],
        "columns": {"id": "id"},
    }
    rows = [(f"u{i}@example.com", f"U{i}") for i in range(10)]
    await tables.pg.cursor().executemany(f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', rows)
    hub = await start_hub(sync_project(tmp_path, tables, entity, [delete], source={"batch_size": 2}))

    async def count_mk(n: int) -> bool:
        return len(await tables.mk_rows()) == n

    await eventually(lambda: count_mk(10), timeout=20, what="10 customers in marketing")
    await tables.pg_exec(f'UPDATE "{tables.crm}" SET deleted_at = now() WHERE id <= 6')

    async def stopped() -> bool:
        state = (await hub.store.source_states()).get("crm_sync")
        return state is not None and state.state == "stopped"

    await eventually(stopped, timeout=20, what="the crm source stopped by the delete guard")
    state = (await hub.store.source_states())["crm_sync"]
    assert "more than deletes.max_share 30%" in (state.error or "")
    assert "deleted within the last 1h" in (state.error or "")
    await asyncio.sleep(1.5)
    status = (await hub.store.identity_stats("customer"))["status"]
    assert status == {"active": 8, "deleted": 2}  # 2 + 2 more would be 40 %: that batch was refused
    assert len(await tables.mk_rows()) == 8
