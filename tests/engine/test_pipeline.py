"""The pipeline's `when` on steps and destinations: one truthiness rule, the same as `filter`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from patchbay import registry
from patchbay.config.project import Project, load_or_raise
from patchbay.connectors.base import Resources
from patchbay.engine.pipeline import Pipeline
from patchbay.expressions import is_truthy
from patchbay.processors.base import Dropped
from patchbay.processors.filter import FilterConfig, FilterStep
from tests.conftest import lead_project

STEPS = """
- name: tag
  when: v
  map: {v: v, tagged: "`true`"}
"""

# Every kind of JSON value, with what the one rule (JMESPath's) says of it.
VALUES = [
    (0, True),
    (0.0, True),
    (-1, True),
    ("0", True),
    ("x", True),
    ([0], True),
    ({"a": None}, True),
    (True, True),
    ("", False),
    ([], False),
    ({}, False),
    (False, False),
    (None, False),
]


def pipeline(root: Path) -> Pipeline:
    project: Project = load_or_raise(
        lead_project(root, "http://127.0.0.1:9/", steps=STEPS, dest={"when": "v"})
    )
    flow = project.flows["lead-capture"]
    crm = project.systems["crm"]
    found = registry.connector_for("http", "destination")
    assert found is not None
    sink = found[0](crm.config, flow.destinations[0].config, flow.destinations[0].policy, Resources())
    return Pipeline(flow, {"crm": sink})


@pytest.mark.parametrize(("value", "truthy"), VALUES)
def test_when_on_a_step_and_a_destination_follows_the_filter_rule(tmp_path, value: Any, truthy: bool):
    out = pipeline(tmp_path).process({"v": value}, "evt_1")
    step = out.trace[0]
    assert step["step"] == "tag"
    assert step.get("skipped", False) is not truthy
    route = out.trace[-1]["routes"]
    assert route == [{"destination": "crm", "matched": truthy}]
    assert out.status == ("pending" if truthy else "filtered")

    passed = True
    try:
        FilterStep(FilterConfig.model_validate("v")).apply({"v": value})
    except Dropped:
        passed = False
    assert passed is truthy is is_truthy(value)


def test_zero_count_runs_the_step_and_routes(tmp_path):
    """`when: count` with count 0: the step runs and the record is delivered, as `filter: count` keeps it."""
    out = pipeline(tmp_path).process({"v": 0}, "evt_1")
    assert out.status == "pending"
    assert out.trace[0]["output"] == {"v": 0, "tagged": True}
    assert [d.destination for d in out.deliveries] == ["crm"]
