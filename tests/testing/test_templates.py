"""`patchbay init --template NAME`: each template loads, its tests pass from a fresh init, and it runs."""

from __future__ import annotations

import os
import sqlite3

import orjson
import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.scaffold import TEMPLATES
from tests.conftest import eventually


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_fresh_template_checks_and_its_tests_pass(tmp_path, name, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PATCHBAY_")]:
        monkeypatch.delenv(k)
    root = tmp_path / name
    res = CliRunner().invoke(main, ["init", str(root), "--template", name])
    assert res.exit_code == 0, res.output
    assert f"patchbay test {root}" in res.output
    res = CliRunner().invoke(main, ["check", str(root)])  # every secret it references is in its vault
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 0, res.output
    assert " 0 failed" in res.output and "no tests for" not in res.output


def test_list_and_unknown_template(tmp_path):
    res = CliRunner().invoke(main, ["init", "--list"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()] == list(TEMPLATES)
    res = CliRunner().invoke(main, ["init", str(tmp_path / "x"), "--template", "nope"])
    assert res.exit_code == 2 and "no template 'nope'" in res.output
    assert not (tmp_path / "x").exists()


async def test_the_payment_template_writes_its_reporting_table(tmp_path):
    root = tmp_path / "pay"
    res = CliRunner().invoke(main, ["init", str(root), "--template", "payment-reporting"])
    assert res.exit_code == 0, res.output
    hub = Hub(load_or_raise(root))
    await hub.start()
    try:
        event = {
            "id": "evt_1",
            "type": "charge.succeeded",
            "created": 1767225600,
            "data": {"object": {"id": "ch_1", "amount": 990, "currency": "usd", "customer": "cus_1"}},
        }
        accepted, status = await hub.ingest("payment-to-reporting", orjson.dumps(event), event)
        assert status == "pending"

        def rows() -> list[tuple[object, ...]]:
            with sqlite3.connect(root / "data" / "reporting.db") as conn:
                return conn.execute("SELECT payment_id, status, amount, currency FROM payments").fetchall()

        async def written() -> bool:
            return bool(rows())

        await eventually(written, what="the row in data/reporting.db")
        assert rows() == [("ch_1", "paid", 9.9, "USD")]
    finally:
        await hub.stop()
