"""The pipeline's staging, as a pure function: where a run stops at a call, what an answer binds, and how
a split runs the later steps per element with the element's index in every key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchbay.config.project import load_or_raise
from patchbay.engine.pipeline import Pipeline
from patchbay.testing.harness import offline_sinks
from tests.conftest import lead_project

EID = "evt_1"


def pipeline(root: Path, steps: str, **kw: Any) -> Pipeline:
    project = load_or_raise(lead_project(root, "http://127.0.0.1:9/", steps=steps, **kw))
    flow = project.flows["lead-capture"]
    return Pipeline(flow, offline_sinks(flow, project))


CALLS = """
- name: find
  call: {system: crm, path: "/s?e={{ email }}", as: contact, on_404: continue, select: {id: body.id}}
- name: create
  when: "contact.id == null"
  call: {system: crm, method: POST, path: /c, body: {email: email}, as: created, select: {id: body.id}}
"""


def test_a_run_stops_at_each_unanswered_call_and_binds_each_answer(tmp_path):
    p = pipeline(tmp_path, CALLS, dest={"body": {"id": "contact.id || created.id"}})
    first = p.process({"email": "a@b.co"}, EID)
    assert first.status == "pending"
    [call] = first.deliveries
    assert (call.destination, call.idempotency_key) == ("call:find", f"{EID}.find")
    assert call.request["method"] == "GET" and call.request["url"].endswith("/s?e=a%40b.co")

    second = p.process({"email": "a@b.co"}, EID, answers={f"{EID}.find": {"status": 404, "body": None}})
    [call] = second.deliveries
    assert (call.destination, call.idempotency_key) == ("call:create", f"{EID}.create")

    answers = {
        f"{EID}.find": {"status": 404, "body": None},
        f"{EID}.create": {"status": 201, "body": {"id": 9}},
    }
    done = p.process({"email": "a@b.co"}, EID, answers=answers)
    [crm] = done.deliveries
    assert crm.idempotency_key == f"{EID}.crm" and crm.request["body"] == '{"id":9}'
    assert done.record["contact"] == {"status": 404, "body": None, "id": None}

    found = p.process({"email": "a@b.co"}, EID, answers={f"{EID}.find": {"status": 200, "body": {"id": 5}}})
    assert [d.idempotency_key for d in found.deliveries] == [f"{EID}.crm"]  # create skipped by its when
    assert {"step": "create", "kind": "call", "skipped": True} in found.trace


def test_on_empty_drop_and_quarantine(tmp_path):
    drop = pipeline(tmp_path / "d", CALLS.replace("on_404: continue", "on_404: continue, on_empty: drop"))
    out = drop.process({"email": "a@b.co"}, EID, answers={f"{EID}.find": {"status": 200, "body": {}}})
    assert out.status == "filtered" and out.reason == "contact: the answer was empty"
    quarantine = pipeline(
        tmp_path / "q", CALLS.replace("on_404: continue", "on_404: continue, on_empty: quarantine")
    )
    out = quarantine.process({"email": "a@b.co"}, EID, answers={f"{EID}.find": {"status": 404, "body": None}})
    assert out.status == "quarantined" and "the answer was empty (HTTP 404)" in (out.reason or "")


def test_split_runs_per_element_with_the_parent_and_index_keys(tmp_path):
    p = pipeline(tmp_path, "- split: lines\n- split: {path: parts, with: {line: sku}}\n")
    order = {"id": "o-1", "lines": [{"sku": "A", "parts": [1, 2]}, {"sku": "B", "parts": [3]}]}
    out = p.process(order, EID)
    assert out.status == "pending"
    assert [d.idempotency_key for d in out.deliveries] == [
        f"{EID}.0.0.crm",
        f"{EID}.0.1.crm",
        f"{EID}.1.0.crm",
    ]
    assert out.record == [{"value": 1, "line": "A"}, {"value": 2, "line": "A"}, {"value": 3, "line": "B"}]

    parent = pipeline(tmp_path / "p", "- split: lines\n")
    out = parent.process(order, EID)
    assert out.record[0] == {
        "sku": "A",
        "parts": [1, 2],
        "parent": {"id": "o-1"},
    }  # the parent without the array


def test_split_of_an_empty_missing_or_too_long_array(tmp_path):
    p = pipeline(tmp_path, "- split: {path: lines, max_elements: 2}\n")
    assert p.process({"lines": []}, EID).status == "filtered"
    missing = p.process({"id": 1}, EID)
    assert missing.status == "quarantined" and "split: the array is missing" in (missing.reason or "")
    long = p.process({"lines": [1, 2, 3]}, EID)
    assert long.status == "quarantined" and "3 elements, more than max_elements 2" in (long.reason or "")


def test_every_element_quarantined_is_a_quarantined_event(tmp_path):
    p = pipeline(tmp_path, "- split: lines\n- validate: {sku: {required: true}}\n")
    out = p.process({"lines": [{"x": 1}, {"x": 2}]}, EID)
    assert out.status == "quarantined" and out.deliveries == []
    assert out.reason is not None and "element 0:" in out.reason and "element 1:" in out.reason
