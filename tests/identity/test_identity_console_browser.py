"""The console's Identities page in a real headless Chromium: where is ada@example.com and what does each
system say; a conflict decided with one click is written to the owner; a duplicate dismissed."""

from __future__ import annotations

from typing import Any

from patchbay.security.tokens import create_token
from patchbay.store.base import Actor
from tests.conftest import eventually
from tests.identity.helpers import Tables, polls, sync_project
from tests.server.test_console_browser import ARTIFACTS


async def test_one_entity_across_systems_and_its_queues_in_the_console(
    tmp_path, tables: Tables, start_hub, browser: Any
):
    running = await start_hub(sync_project(tmp_path, tables))
    token, _ = await create_token(running.store, "console", ["admin"], None, Actor("test"))
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', ["ada@example.com", "Ada"]
    )

    async def linked() -> bool:
        return (await running.store.identity_stats("customer"))["linked"] == {"crm": 1, "marketing": 1}

    await eventually(linked, timeout=20, what="ada on both sides")
    [mk] = await tables.mk_rows()
    await tables.my_exec(f"UPDATE `{tables.mk}` SET full_name = 'Ada Lovelace' WHERE id = %s", [mk[0]])
    await tables.my_exec(
        f"INSERT INTO `{tables.mk}` (email_address, full_name) VALUES ('ADA@example.com', 'Dup')"
    )

    async def queued() -> bool:
        return bool(await running.store.conflicts("customer")) and bool(
            await running.store.reviews("customer")
        )

    await eventually(queued, timeout=20, what="a conflict and a review")
    await polls(running.hub, 2)

    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.set_default_timeout(10_000)
    try:
        await page.goto(running.url + "/console/")
        await page.get_by_label("API token").fill(token)
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("link", name="Identities").click()
        await page.get_by_role("heading", level=1, name="Identities").wait_for()
        await page.get_by_role("searchbox", name="Find").fill(" Ada@Example.com")
        await page.get_by_role("button", name="Find", exact=True).click()
        card = page.locator("section.identity")
        await card.wait_for()
        assert await card.locator('[data-record="crm"]').inner_text() == str((await tables.crm_rows())[0][0])
        assert await card.locator('[data-record="marketing"]').inner_text() == str(mk[0])
        name = card.locator('tr[data-field="name"]')
        assert "owner crm" in await name.inner_text()
        assert (await name.locator('td[data-system="crm"]').inner_text()).startswith('"Ada" ')
        # marketing's rename was put back (the CRM owns the name): both now say Ada; the conflict keeps both
        assert (await name.locator('td[data-system="marketing"]').inner_text()).startswith('"Ada" ')
        await page.screenshot(path=str(ARTIFACTS / "console-identities.png"), full_page=True)

        # The conflict: marketing renamed her; a person keeps marketing's name, which the CRM then gets.
        row = page.locator("tr[data-conflict]").first
        assert "name" in await row.inner_text() and "marketing" in await row.inner_text()
        await row.get_by_role("button", name="Keep marketing").click()
        await page.get_by_text("done; 1 run(s) write it").wait_for()

        async def crm_renamed() -> bool:
            return (await tables.crm_rows())[0][2] == "Ada Lovelace"

        await eventually(crm_renamed, timeout=20, what="the decision written to the CRM")
        await page.locator("tr[data-conflict]", has_text="resolved").wait_for()

        # The duplicate inside marketing: dismissed, it leaves the queue and is never copied.
        review = page.locator("tr[data-review]").first
        assert "duplicate inside marketing" in await review.inner_text()
        await review.get_by_role("button", name="Dismiss").click()
        await page.get_by_text("Nothing waits for a person.").wait_for()
        assert len(await tables.crm_rows()) == 1
        assert problems == []
    finally:
        await context.close()
