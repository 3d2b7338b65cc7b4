"""Batch flows in `patchbay test`: a case gives rows of the source table and expects the rows written,
the quarantined ones with their reasons and the filtered count; they run through the transform a real
run uses. The nightly-orders-export template: its tests, its real run, and its drift stop."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.config.project import load_or_raise
from patchbay.scaffold import create_project
from patchbay.testing.harness import simulate_batch
from tests.conftest import write_project

FLOW = """
purpose: Orders into the reporting table.
owner: data
trigger: {manual: true}
steps:
  - map:
      order_id: id
      total: "divide(total_cents, `100`)"
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [order_id]
"""
SYSTEMS = """
shop: {kind: sqlite, owner: ops, path: shop.db}
report: {kind: sqlite, owner: data, path: report.db}
"""


def test_a_computed_column_of_whole_and_fractional_numbers_is_written_as_float(tmp_path):
    # divide() gives 42 for 4200 cents and 19.99 for 1999: the column is a float column, not an int
    # one that refuses the second row.
    write_project(tmp_path, {"systems.yaml": SYSTEMS, "flows/orders.yaml": FLOW})
    flow = load_or_raise(tmp_path).flows["orders"]
    run = simulate_batch(flow, [{"id": 1, "total_cents": 4200}, {"id": 2, "total_cents": 1999}])
    assert run.rows == [{"order_id": 1, "total": 42.0}, {"order_id": 2, "total": 19.99}]
    assert isinstance(run.rows[0]["total"], float)
