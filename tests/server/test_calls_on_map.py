"""Call and lookup steps are shown where destinations are: the API's flows, destinations and map, and the
console's map and flow page. A call paused by a 401 colours the map, shows its backlog and is resumed from
the console like a destination (a real hub, a real HTTP fake on 127.0.0.1, a real headless Chromium)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from patchbay.security.tokens import create_token
from patchbay.store.base import Actor
from tests.conftest import eventually, lead_project
from tests.server.test_console_browser import ARTIFACTS, browser  # noqa: F401  (the fixture)

FAST = {"timeout_s": 1, "retry": {"schedule": ["100ms"] * 2, "jitter": 0}}
STEPS = """
- name: normalise
  map:
    email: "lower(email)"
- name: find_person
  call:
    system: people
    method: GET
    path: "/search?email={{ email }}"
    as: person
    on_404: continue
"""


def project(root: Path, url: str) -> Path:
    lead_project(
        root, url, steps=STEPS, delivery=FAST, hub={"delivery": FAST}, dest={"body": {"email": "email"}}
    )
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["people"] = {
        "kind": "http",
        "owner": "data",
        "purpose": "The people directory the flow asks.",
        "url": url,
        "allow_private_network": True,
    }
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    return root


def fake(refuse: dict[str, bool]) -> Any:
    """The directory refuses its credential (401) while `refuse["on"]`; then finds everyone (200 {id})."""

    def answer(request: Any, rec: Any) -> Any:
        if rec.path.startswith("/search"):
            if refuse["on"]:
                return 401
            return 200, {"Content-Type": "application/json"}, orjson.dumps({"id": "p-1"}).decode()
        return 201

    return answer


async def paused_call(hub: Any) -> str:
    status, body = await hub.post("/hooks/lead-capture", {"email": "Ada@example.com"})
    assert status == 202, body

    async def paused() -> bool:
        states = await hub.store.destination_states()
        return states.get(("lead-capture", "call:find_person"), ("active",))[0] == "paused"

    await eventually(paused, what="the call paused on 401")
    return str(body["event_id"])


async def test_a_paused_call_is_in_the_flows_destinations_and_colours_the_map(tmp_path, sink, start_hub):
    refuse = {"on": True}
    sink.default = fake(refuse)
    hub = await start_hub(project(tmp_path, sink.url))
    eid = await paused_call(hub)
    token, _ = await create_token(hub.store, "t", ["admin"], None, Actor("test"))
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as s:

        async def get(path: str) -> Any:
            async with s.get(f"{hub.url}/api/v1/{path}") as r:
                assert r.status == 200, await r.text()
                return await r.json()

        [flow] = (await get("flows"))["flows"]
        calls = [d for d in flow["destinations"] if d["call"]]
        assert [(d["name"], d["call"], d["system"], d["state"], d["health"]) for d in calls] == [
            ("call:find_person", "find_person", "people", "paused", "paused")
        ]
        assert flow["health"] == "paused"
        assert [d["name"] for d in (await get("flows/lead-capture"))["destinations"]] == [
            "crm",
            "call:find_person",
        ]
        [call] = [d for d in (await get("destinations"))["destinations"] if d["call"]]
        assert (call["name"], call["state"], call["pending"]) == ("call:find_person", "paused", 1)
        assert "401" in call["reason"]
        m = await get("map")
        edge = next(e for e in m["edges"] if e["id"] == "lead-capture/call:find_person")
        assert (edge["source"], edge["target"], edge["state"], edge["health"], edge["call"]) == (
            "website",
            "people",
            "paused",
            "paused",
            "find_person",
        )
        assert next(n for n in m["nodes"] if n["id"] == "people")["health"] == "paused"
        systems = {x["name"]: x for x in (await get("systems"))["systems"]}
        assert systems["people"]["used_by"] == ["lead-capture"]

        refuse["on"] = False  # the credential is fixed; resume the call through the API
        async with s.post(f"{hub.url}/api/v1/flows/lead-capture/destinations/call:find_person/resume") as r:
            assert r.status == 200, await r.text()

        async def delivered() -> bool:
            return (await hub.run(eid))["status"] == "delivered"

        await eventually(delivered, what="the run resumed after the call")
        [flow] = (await get("flows"))["flows"]
        assert {d["name"]: d["health"] for d in flow["destinations"]} == {
            "crm": "ok",
            "call:find_person": "ok",
        }


async def test_the_console_shows_the_paused_call_and_resumes_it(tmp_path, sink, start_hub, browser):  # noqa: F811
    refuse = {"on": True}
    sink.default = fake(refuse)
    hub = await start_hub(project(tmp_path, sink.url))
    eid = await paused_call(hub)
    token, _ = await create_token(hub.store, "console-test", ["admin"], None, Actor("test"))
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        await page.goto(hub.url + "/console/")
        await page.get_by_label("API token").fill(token)
        await page.get_by_role("button", name="Sign in").click()
        edge = page.locator('a.edge-label[data-edge="lead-capture/call:find_person"]')
        await edge.wait_for()
        assert "h-paused" in (await edge.get_attribute("class") or "")
        label = await edge.locator("text").text_content() or ""
        assert "asks find_person" in label and "paused" in label
        assert "call step find_person" in (await edge.locator("title").text_content() or "")
        node = page.locator('svg.map a.node[data-node="people"]')
        assert "h-paused" in (await node.get_attribute("class") or "")

        await edge.click()
        await page.get_by_role("heading", level=1, name="lead-capture").wait_for()
        row = page.locator('tr[data-destination="call:find_person"]')
        await row.locator(".pill", has_text="paused").first.wait_for()
        text = await row.inner_text()
        assert "call step find_person" in text and "people" in text and "1 / 0 / 0" in text
        assert "find_person (people)" in await page.locator("dl.facts").first.inner_text()  # "Asks"

        refuse["on"] = False
        await row.get_by_role("button", name="Resume call:find_person").click()
        await row.get_by_role("button", name="Pause call:find_person").wait_for(timeout=15_000)

        async def delivered() -> bool:
            return (await hub.run(eid))["status"] == "delivered"

        await eventually(delivered, what="the run resumed after the call")
        await page.get_by_role("link", name="Map").click()
        await page.locator('a.edge-label[data-edge="lead-capture/call:find_person"].h-ok').wait_for(
            timeout=15_000
        )
        assert not problems, problems
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "console-calls-failure.png"), full_page=True)
        raise
    finally:
        await context.close()
