"""The web console in a real headless Chromium, against a real hub: from a failing flow on the map to
the run that says why it failed, a fix, a replay and the run turning green.

Needs Debian's chromium (`scripts/install-browser`) and Playwright for Python; skipped without them,
failing under CI=true. Screenshots go to tests/artifacts/; with PATCHBAY_UPDATE_DOCS_IMG=1 also to docs/img/ (the README's).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from patchbay.security.tokens import create_token, revoke_token
from patchbay.store.base import Actor, RunFilter
from tests.conftest import IN_CI, eventually, lead_project, write_project

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_IMG = REPO / "docs" / "img"
BAD_REQUEST = '{"error": "invalid_contact", "message": "field phone is required"}'
FAST = {"timeout_s": 1, "retry": {"schedule": ["200ms", "200ms"], "jitter": 0}}


def require_browser() -> None:
    """Skip (or, under CI=true, fail) without /usr/bin/chromium and Playwright for Python."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (run scripts/install-browser)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (scripts/install-browser, or `pip install playwright`)")
    if missing:
        msg = "the console's browser tests need " + " and ".join(missing)
        if IN_CI:
            pytest.fail(msg + " — CI=true requires it")
        pytest.skip(msg)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def showcase_project(root: Path, sink_url: str) -> Path:
    """The seed's lead capture plus the other jobs around it: ten systems, seven flows, one two-way sync."""
    lead_project(
        root,
        sink_url,
        delivery=FAST,
        extra_dests=[
            {"name": "notify", "system": "chat", "text": "New lead {{ properties.email }}"},
            {"name": "event", "system": "analytics", "path": "/events", "delivery": FAST},
        ],
    )
    signed = {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]}
    http = {"kind": "http", "url": sink_url, "allow_private_network": True}
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["website"]["purpose"] = "Marketing site; its contact form posts every lead."
    systems["crm"].update(owner="sales-ops", purpose="The CRM: source of truth for contacts.", webhook=signed)
    systems.update(
        {
            "stripe": {"owner": "finance", "purpose": "Payments; owns payment status.", "webhook": signed},
            "helpdesk": {"owner": "support", "purpose": "Support tickets.", "webhook": signed},
            "chat": {
                "kind": "chat",
                "owner": "sales-ops",
                "purpose": "The #leads and #support channels.",
                "style": "slack",
                "url": f"{sink_url}/chat",
                "allow_private_network": True,
            },
            "analytics": {**http, "owner": "growth", "purpose": "Product analytics events."},
            "finance-db": {
                "kind": "sqlite",
                "owner": "finance",
                "purpose": "The finance database.",
                "path": str(root / "finance.db"),
            },
            "revenue-report": {**http, "owner": "finance", "purpose": "The revenue dashboard."},
            "marketing": {
                **http,
                "owner": "growth",
                "purpose": "Newsletter and campaigns.",
                "webhook": signed,
            },
            "warehouse": {**http, "owner": "data", "purpose": "The reporting warehouse."},
        }
    )
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    with sqlite3.connect(root / "finance.db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS payments(id TEXT PRIMARY KEY, amount INTEGER)")

    def flow(purpose: str, owner: str, trigger: dict[str, Any], *dests: dict[str, Any]) -> str:
        doc = {"purpose": purpose, "owner": owner, "trigger": trigger, "destinations": list(dests)}
        return yaml.safe_dump(doc, sort_keys=False)

    def hook(system: str) -> dict[str, Any]:
        return {"webhook": {"system": system}}

    write_project(
        root,
        {
            "flows/payment-sync.yaml": flow(
                "Payments reach the finance database and the revenue report.",
                "finance",
                hook("stripe"),
                {
                    "name": "ledger",
                    "system": "finance-db",
                    "table": "payments",
                    "write_mode": "upsert",
                    "key": ["id"],
                },
                {"name": "report", "system": "revenue-report", "path": "/revenue"},
            ),
            "flows/payment-status.yaml": flow(
                "The CRM shows each customer's payment status.",
                "sales-ops",
                hook("stripe"),
                {"name": "crm", "system": "crm", "path": "/payments"},
            ),
            "flows/support-alerts.yaml": flow(
                "New tickets are posted to #support.",
                "support",
                hook("helpdesk"),
                {"name": "chat", "system": "chat", "text": "New ticket {{ subject }}"},
            ),
            "flows/contacts-to-marketing.yaml": flow(
                "CRM contacts are kept in the newsletter tool.",
                "growth",
                hook("crm"),
                {"name": "marketing", "system": "marketing", "path": "/contacts"},
            ),
            "flows/unsubscribes-to-crm.yaml": flow(
                "Unsubscribes in the newsletter tool reach the CRM.",
                "growth",
                hook("marketing"),
                {"name": "crm", "system": "crm", "path": "/unsubscribes"},
            ),
            "flows/nightly-orders.yaml": flow(
                "Orders are copied to the warehouse every night.",
                "data",
                {"schedule": {"cron": "0 2 * * *", "catch_up": "skip"}},
                {"name": "warehouse", "system": "warehouse", "path": "/orders"},
            ),
        },
    )
    return root


async def test_from_a_failing_flow_on_the_map_to_a_green_run(tmp_path, sink, start_hub, browser):
    def answer(request, rec):  # the CRM refuses contacts until it is "fixed"
        return (400, {"Content-Type": "application/json"}, BAD_REQUEST) if rec.path == "/contacts" else 201

    sink.default = answer
    hub = await start_hub(showcase_project(tmp_path, sink.url))
    token, _ = await create_token(hub.store, "console-test", ["admin"], None, Actor("test"))
    emails = ["ada@example.com", "grace@example.com", "linus@example.com"]
    ids = []
    for email in emails:
        status, body = await hub.post("/hooks/lead-capture", {"email": email, "first_name": email[:3]})
        assert status == 202, body
        ids.append(body["event_id"])
    status, _ = await hub.post("/hooks/payment-sync", {"id": "pi_1", "amount": 4200})
    assert status == 202

    async def all_dead() -> bool:
        return all([(await hub.run(e))["status"] == "dead" for e in ids])

    await eventually(all_dead, timeout=15, what="the leads to be dead letters (CRM answers 400)")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "console-failure.png").unlink(missing_ok=True)
    context = await browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.set_default_timeout(10_000)
    try:
        # Sign in: / leads to the console, which asks for a token.
        await page.goto(hub.url + "/")
        assert page.url == hub.url + "/console/"
        await page.get_by_label("API token").fill(token)
        await page.get_by_role("button", name="Sign in").click()
        await page.locator("#who-name").filter(has_text="console-test").wait_for()
        assert await page.locator("#who-scopes").inner_text() == "admin"

        # The map: every system, and lead-capture's arrow to the CRM in the failing colour, said in words.
        edge = page.locator('a.edge-label[data-edge="lead-capture/crm"]')
        await edge.wait_for()
        assert "h-failing" in (await edge.get_attribute("class") or "")
        assert "failing" in (await edge.locator("text").text_content() or "")
        nodes = await page.locator("svg.map a.node").evaluate_all("els => els.map(e => e.dataset.node)")
        assert {"website", "crm", "stripe", "chat", "warehouse", "hub"} <= set(nodes)
        assert await page.locator('a.edge-label[data-edge="payment-sync/report"].h-ok').count() == 1
        assert "Owner: sales" in await edge.locator("title").text_content()
        await _no_overlaps(page)
        await page.screenshot(path=str(ARTIFACTS / "console-map.png"), full_page=True)

        # The failing flow: its CRM destination is failing.
        await edge.click()
        await page.get_by_role("heading", level=1, name="lead-capture").wait_for()
        crm_row = page.locator('tr[data-destination="crm"]')
        await crm_row.locator(".pill", has_text="failing").wait_for()
        assert "leads reach the CRM" in await page.locator(".lede").first.inner_text()

        # Find Ada's run by her email and read why it failed.
        await page.get_by_role("link", name="Runs", exact=True).click()
        await page.get_by_label("Record key").fill("ada@example.com")
        await page.get_by_label("Record key").press("Enter")
        row = page.locator(f'tr[data-run="{ids[0]}"]')
        await row.wait_for()
        from playwright.async_api import expect

        await expect(page.locator("table.runs tbody tr")).to_have_count(
            1
        )  # the filtered list, not the old one
        assert await row.get_attribute("data-status") == "dead"
        await row.get_by_role("link", name=ids[0][:8], exact=False).click()
        outcome = page.locator("section.outcome")
        await outcome.filter(has_text="failed permanently").wait_for()
        text = await outcome.inner_text()
        assert "HTTP 400" in text and "field phone is required" in text
        stopped = page.locator('li.stop[data-delivery="crm"]')
        await stopped.get_by_text("Stopped here").wait_for()
        assert "field phone is required" in await stopped.locator("tr.stop").inner_text()
        await page.screenshot(path=str(ARTIFACTS / "console-run.png"), full_page=True)

        # Fix the CRM, replay from the console, watch the run turn green without a reload.
        sink.default = 201
        await page.get_by_role("button", name="Replay").click()
        green = page.locator("section.outcome.good").filter(has_text="Delivered to all 3 destinations")
        await green.wait_for(timeout=15_000)
        await page.locator("h1 + .pill", has_text="delivered").wait_for()
        crm = page.locator('li[data-delivery="crm"]')
        assert "stop" not in (await crm.get_attribute("class") or "")
        codes = await crm.locator("tr[data-attempt] td:nth-child(3)").all_inner_texts()
        assert codes == ["400", "201"]
        assert any(
            r.headers.get("Idempotency-Key") == f"{ids[0]}.crm" and r.path == "/contacts"
            for r in sink.received[-3:]
        )
        assert (await hub.run(ids[0]))["status"] == "delivered"

        # Failures: discard one dead letter, replay everything else that matches; the map's arrow is
        # healthy again, and both changes are in the audit log.
        await page.get_by_role("link", name="Failures").click()
        await page.locator(f'tr[data-run="{ids[2]}"] input[type=checkbox]').check()
        await page.get_by_role("button", name="Discard selected (1)").click()
        await page.get_by_role("dialog").get_by_role("button", name="Discard").click()
        await page.get_by_text("Discarded 1.").wait_for()
        await page.locator(f'tr[data-run="{ids[2]}"]').wait_for(state="detached")
        await page.get_by_role("button", name="Replay all matching (1)").click()
        await page.get_by_role("dialog").get_by_role("button", name="Replay all").click()
        await page.get_by_text("Requeued 1 of 1").wait_for()
        await page.get_by_text("Nothing has failed.").first.wait_for(timeout=15_000)
        await page.get_by_role("link", name="Map").click()
        await page.locator('a.edge-label[data-edge="lead-capture/crm"].h-ok').wait_for(timeout=15_000)
        await page.locator("#counts").filter(has_text="0 dead letters").wait_for()
        discarded = await hub.run(ids[2])
        assert {d["destination"]: d["status"] for d in discarded["deliveries"]}["crm"] == "discarded"
        rows = await hub.store.read(lambda c: c.execute("SELECT action, target FROM audit").fetchall())
        audit = {(r[0], r[1]) for r in rows}
        assert ("discard", ids[2]) in audit and ("replay", ids[1]) in audit and ("replay", ids[0]) in audit

        assert not problems, problems  # no CSP violation, script error or failed request so far

        # A revoked token sends the console back to the sign-in page, saying why.
        await revoke_token(hub.store, token)
        alert = page.locator(".login [role=alert]")
        await alert.filter(has_text="revoked").wait_for(timeout=10_000)
        assert await page.evaluate("sessionStorage.getItem('patchbay.token')") is None
        assert all("401" in p for p in problems), problems  # the browser logs the refused calls
    except BaseException:
        await page.screenshot(path=str(ARTIFACTS / "console-failure.png"), full_page=True)
        raise
    finally:
        await context.close()

    if os.environ.get("PATCHBAY_UPDATE_DOCS_IMG") == "1":  # refresh the README's screenshots on request only
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for name in ("console-map.png", "console-run.png"):
            shutil.copyfile(ARTIFACTS / name, DOCS_IMG / name)


async def _no_overlaps(page: Any) -> None:
    """No two system boxes or arrow labels on the map overlap, and every label is inside the picture."""
    boxes = await page.evaluate("""() => {
        const svg = document.querySelector('svg.map').getBoundingClientRect();
        const rects = [...document.querySelectorAll('svg.map .node-box, svg.map .edge-label rect')]
            .map(r => { const b = r.getBoundingClientRect(); return {x: b.x, y: b.y, w: b.width, h: b.height,
                         id: r.closest('a').dataset.node || r.closest('a').dataset.edge}; });
        return {svg: {x: svg.x, y: svg.y, w: svg.width, h: svg.height}, rects};
    }""")
    rects, svg = boxes["rects"], boxes["svg"]
    for i, a in enumerate(rects):
        assert svg["x"] - 1 <= a["x"] and a["x"] + a["w"] <= svg["x"] + svg["w"] + 1, a
        for b in rects[i + 1 :]:
            ox = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            oy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            assert ox <= 0.5 or oy <= 0.5, f"{a['id']} overlaps {b['id']}"


async def test_a_read_only_token_can_look_but_not_change_and_hidden_tabs_stop_polling(
    tmp_path, sink, start_hub, browser
):
    sink.default = 400
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    token, _ = await create_token(hub.store, "viewer", ["flows:read", "runs:read"], None, Actor("test"))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="a dead letter")
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    calls: list[str] = []
    page.on("request", lambda r: "/api/v1/" in r.url and calls.append(r.url))
    try:
        await page.goto(hub.url + "/console/")
        await page.get_by_label("API token").fill(token)
        await page.get_by_label("API token").press("Enter")
        await page.locator("#who-scopes").filter(has_text="flows:read, runs:read").wait_for()

        await page.goto(hub.url + "/console/#/failures")
        replay = page.locator(f'tr[data-run="{body["event_id"]}"] button[data-action="replay"]')
        await replay.wait_for()
        assert await replay.is_disabled()
        assert await replay.get_attribute("title") == "needs a token with scope runs:replay"
        await page.goto(hub.url + "/console/#/flows/lead-capture")
        pause = page.locator('tr[data-destination="crm"] button[data-action="pause"]')
        await pause.wait_for()
        assert await pause.is_disabled()

        # A hidden tab stops polling; showing it again resumes at once.
        await page.evaluate("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
        await page.locator("#live").filter(has_text="paused while this tab is hidden").wait_for()
        before = len(calls)
        await page.wait_for_timeout(4500)
        assert len(calls) == before, calls[before:]
        await page.evaluate("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
        await page.locator("#live").filter(has_text="Live").wait_for()
        assert len(calls) > before

        await page.get_by_role("button", name="Sign out").click()
        await page.get_by_label("API token").wait_for()
        assert await page.evaluate("sessionStorage.getItem('patchbay.token')") is None
    finally:
        await context.close()


BATCH_FLOW = """
purpose: Orders copied into reporting, merged by id.
owner: data
trigger: {schedule: {cron: "0 2 * * *"}, manual: true}
steps:
  - map: {id: id, email: lower(trim(email)), updated_at: updated_at}
  - validate: {email: {required: true, format: email}}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
  cursor: {column: updated_at}
  batch_rows: 1000
"""


async def test_run_a_batch_flow_from_its_page_and_read_the_report(tmp_path, sink, start_hub, browser):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["shop"] = {"kind": "sqlite", "owner": "ops", "path": "shop.db"}
    systems["report"] = {"kind": "sqlite", "owner": "data", "path": "report.db"}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    write_project(root, {"flows/orders.yaml": BATCH_FLOW})
    lead_flow = yaml.safe_load((root / "flows" / "lead-capture.yaml").read_text())
    lead_flow["trigger"]["manual"] = True
    (root / "flows" / "lead-capture.yaml").write_text(yaml.safe_dump(lead_flow, sort_keys=False))
    with sqlite3.connect(root / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, updated_at TEXT)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, '2024-01-01')", [(i, f" U{i}@Shop.io") for i in range(1, 80001)]
        )
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    sqlite3.connect(root / "report.db").close()
    hub = await start_hub(root)
    token, _ = await create_token(
        hub.store, "operator", ["flows:read", "runs:read", "runs:start"], None, Actor("t")
    )
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.set_default_timeout(15_000)
    try:
        await page.goto(hub.url + "/console/")
        await page.get_by_label("API token").fill(token)
        await page.get_by_label("API token").press("Enter")
        await page.locator("#who-name").filter(has_text="operator").wait_for()
        await page.goto(hub.url + "/console/#/flows/orders")
        panel = page.get_by_role("region", name="Run", exact=True)
        await panel.get_by_text("No run yet.").wait_for()
        assert "shop table orders" in await panel.inner_text()
        await panel.get_by_role("button", name="Run now").click()
        # While it runs: a progress bar with rows and rows/s (or, on a fast machine, already the report).
        progress_or_report = page.locator(".run-progress progress, .batch-report")
        await progress_or_report.first.wait_for()
        report = page.locator('.batch-report[data-status="ok"]')
        await report.wait_for(timeout=60_000)
        cells = await report.locator("tbody td").all_inner_texts()
        assert cells[:6] == ["80,000", "79,999", "0", "0", "0", "1"], cells
        await page.screenshot(path=str(ARTIFACTS / "console-batch-run.png"), full_page=True)
        # The run's page shows the same report; the flow is healthy.
        await panel.get_by_role("link").first.click()
        await page.locator("section.outcome.good").filter(has_text="Batch run ok: read 80,000").wait_for()
        assert (await hub.store.list_runs(RunFilter(flow="orders", status="delivered")))[0]["id"]
        run = await hub.store.get_run(
            (await hub.store.list_runs(RunFilter(flow="orders", status="delivered")))[0]["id"]
        )
        assert run["meta"]["trigger"] == "console"
        assert await page.locator('.batch-report[data-status="ok"] tbody td').first.inner_text() == "80,000"
        with sqlite3.connect(root / "report.db") as c:
            assert c.execute("SELECT count(*) FROM orders").fetchone() == (79999,)
        # A manual event flow: its Run panel takes one event as JSON; it is stored and delivered.
        await page.goto(hub.url + "/console/#/flows/lead-capture")
        panel = page.get_by_role("region", name="Run", exact=True)
        await panel.get_by_label("Event (JSON)").fill('{"email": "Ada@Example.com"}')
        await panel.get_by_role("button", name="Run", exact=True).click()
        await panel.get_by_text("Stored:").wait_for()
        await sink.wait_for(1)
        assert sink.received[-1].body["properties"]["email"] == "ada@example.com"

        # The map: the batch flow is an arrow from the table it reads to the one it writes, healthy.
        await page.get_by_role("link", name="Map").click()
        await page.locator('a.edge-label[data-edge="orders/batch"].h-ok').wait_for()
        assert not problems, problems
    except BaseException:
        await page.screenshot(path=str(ARTIFACTS / "console-failure.png"), full_page=True)
        raise
    finally:
        await context.close()


async def test_the_cluster_page_lists_the_hubs_nodes(tmp_path, sink, start_hub, browser):
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    token, _ = await create_token(hub.store, "viewer", ["flows:read", "runs:read"], None, Actor("test"))
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    try:
        await page.goto(hub.url + "/console/")
        await page.get_by_label("API token").fill(token)
        await page.get_by_label("API token").press("Enter")
        await page.get_by_role("link", name="Cluster").click()
        row = page.locator(f'table.cluster-nodes tr[data-node="{hub.hub.node.id}"]')
        await row.wait_for()
        assert await row.get_attribute("data-status") == "up"
        assert "web, worker, scheduler" in await row.inner_text()
        assert await page.title() == "Cluster · Patchbay"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "console-cluster.png"), full_page=True)
    finally:
        await context.close()
