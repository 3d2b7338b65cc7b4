"""Alert rules on a running hub: one alert and one recovery per outage, sent through real destinations."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.engine.alerts import AlertManager
from patchbay.store.sqlite import q_schedule, tx_schedule
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, eventually, lead_project, write_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["200ms"] * 40, "jitter": 0}}


def lead(n: int) -> dict[str, str]:
    return {"email": f"lead-{n}@example.com", "first_name": f"L{n}"}


def alert_project(
    root: Path,
    sink_url: str,
    *,
    rules: list[dict[str, Any]] | None = None,
    flow_rules: list[dict[str, Any]] | None = None,
    delivery: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """The lead-capture project plus two systems to notify: a Slack-style chat webhook, an HTTP endpoint."""
    lead_project(root, sink_url, delivery=delivery or FAST, hub={"alerts": rules or []})
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["ops-chat"] = {
        "kind": "chat",
        "owner": "ops",
        "style": "slack",
        "url": f"{sink_url}/chat",
        "allow_private_network": True,
    }
    systems["ops-hook"] = {
        "kind": "http",
        "owner": "ops",
        "url": f"{sink_url}/alerts",
        "allow_private_network": True,
    }
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    if flow_rules:
        flow_file = root / "flows" / "lead-capture.yaml"
        flow = yaml.safe_load(flow_file.read_text())
        flow["alerts"] = flow_rules
        flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    if extra:
        write_project(root, extra)
    return root


def chat_messages(sink: Any) -> list[tuple[str, str]]:
    """(title, text) of each Slack message the chat destination posted."""
    out = []
    for r in sink.received:
        if r.path == "/chat":
            header = next((b["text"]["text"] for b in r.body["blocks"] if b["type"] == "header"), "")
            out.append((header, r.body["text"]))
    return out


def hook_messages(sink: Any) -> list[dict[str, Any]]:
    return [r.body for r in sink.received if r.path == "/alerts"]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    return CliRunner()


@pytest.fixture
def manual_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub evaluates once at start, then only when the test calls evaluate(now=...)."""
    monkeypatch.setattr(AlertManager, "interval_s", 3600.0)


async def _failed_attempts(hub: Any) -> int:
    return int(
        await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM attempts WHERE outcome!='success'").fetchone()[0]
        )
    )


async def _lead_statuses(hub: Any) -> set[str]:
    rows = await hub.store.read(
        lambda c: c.execute("SELECT status FROM events WHERE flow='lead-capture'").fetchall()
    )
    return {r[0] for r in rows}


async def _settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)  # time for a message that should not exist to arrive anyway


async def test_a_five_minute_outage_gives_one_alert_and_one_recovery(tmp_path, sink, start_hub, manual_clock):
    outage = True
    sink.default = lambda request, rec: (503 if outage else 201) if rec.path == "/contacts" else 200
    rules = [{"when": "failures", "count": 3, "window": "10m", "notify": ["ops-chat"]}]
    hub = await start_hub(alert_project(tmp_path, sink.url, rules=rules))
    alerts = hub.hub.alert_manager
    for n in range(2):
        await hub.post("/hooks/lead-capture", lead(n))

    async def three_failures() -> bool:
        return await _failed_attempts(hub) >= 3

    await eventually(three_failures, what="three failed attempts")
    t0 = time.time()
    # The outage lasts five minutes of the simulated clock; the sink keeps answering 503.
    for minute in range(6):
        await alerts.evaluate(now=t0 + 60 * minute)
        await asyncio.sleep(0.05)
    await eventually(lambda: _n(chat_messages(sink), 1), what="the alert message")

    async def six_failures() -> bool:
        return await _failed_attempts(hub) >= 6

    await eventually(six_failures, what="the outage going on")
    await alerts.evaluate(now=t0 + 299)
    await _settle()
    assert len(chat_messages(sink)) == 1  # the outage went on; the alert stayed quiet

    outage = False

    async def delivered() -> bool:
        return await _lead_statuses(hub) == {"delivered"}

    await eventually(delivered, what="both leads delivered after the outage")
    for minute in range(6, 9):
        await alerts.evaluate(now=t0 + 60 * minute)
    await eventually(lambda: _n(chat_messages(sink), 2), what="the recovery message")
    await alerts.evaluate(now=t0 + 600)
    await _settle()

    (alert_title, alert_text), (ok_title, ok_text) = chat_messages(sink)
    assert alert_title == "ALERT lead-capture/crm: deliveries failing"
    assert (
        "flow lead-capture to crm" in alert_text
        and "HTTP 503" in alert_text
        and "failing since" in alert_text
    )
    assert "patchbay runs --flow lead-capture --status pending" in alert_text
    assert ok_title == "RESOLVED lead-capture/crm: deliveries succeed again"
    assert "succeed again" in ok_text and "had been failing since" in ok_text
    # The alert is an event of the internal flow, with a run trace like any other.
    runs = await hub.store.read(
        lambda c: c.execute("SELECT status, record_key FROM events WHERE flow='_alerts'").fetchall()
    )
    assert [tuple(r) for r in runs] == [("delivered", "lead-capture/crm")] * 2


async def _n(messages: list[Any], n: int) -> bool:
    assert len(messages) <= n, messages
    return len(messages) == n


async def test_pause_alerts_and_resume_recovers(tmp_path, sink, start_hub, cli_env, monkeypatch):
    monkeypatch.setattr(AlertManager, "interval_s", 0.1)
    refused = True
    sink.default = lambda request, rec: (401 if refused else 201) if rec.path == "/contacts" else 200
    flow_rules = [{"when": "destination_paused", "notify": ["ops-chat"]}]
    root = alert_project(tmp_path, sink.url, flow_rules=flow_rules)
    hub = await start_hub(root)
    for n in range(3):
        await hub.post("/hooks/lead-capture", lead(n))
    await eventually(lambda: _n(chat_messages(sink), 1), what="the pause alert")
    await _settle(0.5)
    [(title, text)] = chat_messages(sink)
    assert title == "ALERT lead-capture/crm: destination paused"
    assert "HTTP 401" in text and "deliveries wait; none is lost" in text
    assert "run `patchbay resume lead-capture crm`" in text

    refused = False
    res = cli_env.invoke(main, ["resume", "lead-capture", "crm", "-p", str(root)])
    assert res.exit_code == 0, res.output
    await eventually(lambda: _n(chat_messages(sink), 2), what="the recovery message")

    async def delivered() -> bool:
        return await _lead_statuses(hub) == {"delivered"}

    await eventually(delivered, what="the waiting leads delivered")
    await _settle(0.5)
    _, (ok_title, ok_text) = chat_messages(sink)
    assert ok_title == "RESOLVED lead-capture/crm: destination active again"
    assert "was paused since" in ok_text


NIGHTLY = """
purpose: a nightly tick reaches the CRM
owner: ops
trigger:
  schedule: {every: 1h, late_after: 5m}
destinations:
  - {name: crm, system: crm, path: /ticks}
alerts:
  - {when: schedule_late, notify: [ops-hook]}
"""


async def test_a_late_schedule_alerts_then_recovers(tmp_path, sink, start_hub, manual_clock):
    sink.default = 200
    hub = await start_hub(alert_project(tmp_path, sink.url, extra={"flows/nightly.yaml": NIGHTLY}))
    alerts = hub.hub.alert_manager

    async def ran() -> bool:
        row = await hub.store.read(q_schedule, "nightly")
        return bool(row and row["runs"])

    await eventually(ran, what="the first scheduled run")
    due = (await hub.store.read(q_schedule, "nightly"))["next_due_at"]
    await alerts.evaluate(now=due + 60)  # a minute late: within the 5m tolerance
    await alerts.evaluate(now=due + 600)  # ten minutes late: the hub was stopped or stuck
    await alerts.evaluate(now=due + 660)
    await eventually(lambda: _n(hook_messages(sink), 1), what="the late alert")
    # The scheduler catches up (what ScheduleRunner writes when the run starts); the clock moves on.
    await hub.store.write(
        lambda c: tx_schedule(c, "nightly", last_started_at=due + 700, next_due_at=due + 4300)
    )
    await alerts.evaluate(now=due + 720)
    await eventually(lambda: _n(hook_messages(sink), 2), what="the recovery")
    await _settle()

    alert, ok = hook_messages(sink)
    assert alert["alert"] == "schedule_late" and alert["status"] == "firing" and alert["flow"] == "nightly"
    assert alert["title"] == "ALERT nightly: schedule late"
    assert (
        "is 10m 00s late (tolerance 5m 00s)" in alert["text"] and "`patchbay state nightly`" in alert["text"]
    )
    assert alert["since"] == time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(due))
    assert ok["status"] == "resolved" and "runs on schedule again" in ok["text"]


async def test_dead_letters_above_a_threshold(tmp_path, sink, start_hub, manual_clock, cli_env):
    broken = True
    sink.default = lambda request, rec: (400 if broken else 201) if rec.path == "/contacts" else 200
    root = alert_project(
        tmp_path, sink.url, rules=[{"when": "dead_letters", "above": 2, "notify": ["ops-hook"]}]
    )
    hub = await start_hub(root)
    alerts = hub.hub.alert_manager
    for n in range(2):
        await hub.post("/hooks/lead-capture", lead(n))

    async def dead(n: int) -> bool:
        rows = await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM deliveries WHERE status='dead'").fetchone()
        )
        return bool(rows[0] == n)

    await eventually(lambda: dead(2), what="two dead letters")
    await alerts.evaluate()
    await _settle()
    assert hook_messages(sink) == []  # 2 is not above 2
    status, _ = await hub.post("/hooks/lead-capture", {"first_name": "no email"})  # quarantined: the third
    assert status == 202
    await alerts.evaluate()
    await alerts.evaluate()
    await eventually(lambda: _n(hook_messages(sink), 1), what="the dead-letter alert")

    broken = False
    res = cli_env.invoke(main, ["replay", "--all", "--flow", "lead-capture", "-p", str(root)])
    assert "2 requeued" in res.output, res.output
    await eventually(lambda: dead(0), what="the replayed leads delivered")
    await alerts.evaluate()
    await eventually(lambda: _n(hook_messages(sink), 2), what="the recovery")
    await alerts.evaluate()
    await _settle()

    alert, ok = hook_messages(sink)
    assert alert["title"] == "ALERT lead-capture: 3 dead letters"
    assert "(2 dead deliveries, 1 quarantined), above the threshold of 2" in alert["text"]
    assert "`patchbay dead --flow lead-capture`" in alert["text"]
    assert ok["status"] == "resolved" and ok["title"] == "RESOLVED lead-capture: dead letters back to 1"


async def test_a_restart_during_an_outage_does_not_alert_again(tmp_path, sink, start_hub, manual_clock):
    outage = True
    sink.default = lambda request, rec: (503 if outage else 201) if rec.path == "/contacts" else 200
    root = alert_project(tmp_path, sink.url, rules=[{"when": "failures", "count": 3, "notify": ["ops-chat"]}])
    hub = await start_hub(root)
    await hub.post("/hooks/lead-capture", lead(1))

    async def three_failures(h: Any) -> bool:
        return await _failed_attempts(h) >= 3

    await eventually(lambda: three_failures(hub), what="three failed attempts")
    await hub.hub.alert_manager.evaluate()
    await eventually(lambda: _n(chat_messages(sink), 1), what="the alert")

    await hub.runner.cleanup()
    await hub.hub.stop()
    before = await _failed_attempts_of(root)
    hub2 = await start_hub(root)  # evaluates at start: the outage goes on, the state says it was told
    alerts = hub2.hub.alert_manager

    async def more_failures() -> bool:
        return await _failed_attempts(hub2) > before

    await eventually(more_failures, what="failures after the restart")
    for _ in range(3):
        await alerts.evaluate()
    await _settle()
    assert len(chat_messages(sink)) == 1

    outage = False

    async def delivered() -> bool:
        return await _lead_statuses(hub2) == {"delivered"}

    await eventually(delivered, what="the lead delivered")
    await alerts.evaluate(now=time.time() + 61)  # a quiet minute later
    await eventually(lambda: _n(chat_messages(sink), 2), what="the recovery")
    await alerts.evaluate(now=time.time() + 62)
    await _settle()
    assert [t for t, _ in chat_messages(sink)] == [
        "ALERT lead-capture/crm: deliveries failing",
        "RESOLVED lead-capture/crm: deliveries succeed again",
    ]


async def _failed_attempts_of(root: Path) -> int:
    from patchbay.store.sqlite import SyncStore

    store = SyncStore(root / ".patchbay" / "patchbay.db")
    try:
        return int(
            store.read(
                lambda c: c.execute("SELECT COUNT(*) FROM attempts WHERE outcome!='success'").fetchone()[0]
            )
        )
    finally:
        store.close()


# ---------------------------------------------------------------- patchbay check
def check(root: Path) -> tuple[int, str]:
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8, "PATCHBAY_SECRET_CRM_TOKEN": "y" * 8}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    return res.exit_code, res.output


def test_check_reports_notify_systems_that_cannot_take_alerts(tmp_path):
    root = alert_project(
        tmp_path,
        "http://127.0.0.1:9",
        flow_rules=[{"when": "schedule_late", "notify": [{"system": "ops-hook", "method": "PUT"}]}],
    )
    (root / "patchbay.yaml").write_text(
        "port: 0\n"
        "alerts:\n"
        "  - when: failures\n"
        "    notify:\n"
        "      - ops-chat\n"
        "      - ops-chta\n"
        "  - when: destination_paused\n"
        "    notify: [website]\n"
    )
    code, out = check(root)
    assert code != 0
    hub, flow = root / "patchbay.yaml", root / "flows" / "lead-capture.yaml"
    flow_line = next(i for i, line in enumerate(flow.read_text().splitlines(), 1) if "schedule_late" in line)
    assert f"{hub}:6: unknown system 'ops-chta' to notify; did you mean 'ops-chat'?" in out
    assert f"{hub}:8: system 'website' has no `kind`, so it cannot be a destination" in out
    assert f"{flow}:{flow_line}: flow 'lead-capture' has no schedule, so it is never late" in out
    assert "3 problems" in out

    (root / "patchbay.yaml").write_text(
        "port: 0\nalerts:\n  - {when: dead_letters, count: 2, notify: [ops-hook]}\n"
    )
    code, out = check(root)
    assert f"{hub}:3: alerts.0: `count` applies to `when: failures` only" in out


def test_check_reports_missing_destination_settings_for_a_notify_system(tmp_path):
    root = alert_project(tmp_path, "http://127.0.0.1:9")
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["oncall-mail"] = {
        "kind": "smtp",
        "owner": "ops",
        "host": "127.0.0.1",
        "from_address": "hub@example.com",
    }
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    (root / "patchbay.yaml").write_text("port: 0\nalerts:\n  - when: failures\n    notify: [oncall-mail]\n")
    code, out = check(root)
    assert code != 0
    assert f"{root / 'patchbay.yaml'}:4: notify oncall-mail: missing required setting 'to'; add it" in out

    (root / "patchbay.yaml").write_text(
        "port: 0\nalerts:\n  - when: failures\n    notify: [{system: oncall-mail, to: [ops@example.com]}]\n"
    )
    code, out = check(root)
    assert code == 0, out
