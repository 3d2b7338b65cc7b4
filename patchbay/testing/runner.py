"""Run flow tests: each case's event through the flow (harness.simulate), checked against its expectations."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchbay.config.project import Project
from patchbay.errors import ConfigError, Problem
from patchbay.testing.cases import RESERVED, Case, FlowTestFile, find_test_files, load_test_file
from patchbay.testing.compare import compare, missing, unified
from patchbay.testing.harness import BatchCaseRun, FlowRun, simulate, simulate_batch


@dataclass
class CaseResult:
    case: Case
    flow: str
    failures: list[str] = field(default_factory=list)  # readable lines: what differs, then diffs
    seconds: float = 0.0
    error: str | None = None  # the flow itself failed (a bug), not an expectation

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # bad test files: exit 2
    untested: list[str] = field(default_factory=list)  # flows without a test file
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 1 if self.failed else 0


def run_project(project: Project, flows: Iterable[str] = (), display: Any = str) -> Report:
    """Every test file under flows/ (or only those of `flows`), every case."""
    t0 = time.perf_counter()
    report = Report()
    wanted = set(flows)
    files: list[FlowTestFile] = []
    broken: set[str] = set()  # flows whose test file has problems: reported, not "untested"
    for path in find_test_files(project.root):
        try:
            tf = load_test_file(path, project, display(path))
        except ConfigError as exc:
            report.problems += exc.problems
            broken.add(path.name.removesuffix(".yml").removesuffix(".yaml").removesuffix(".test"))
            continue
        if not wanted or tf.flow in wanted:
            files.append(tf)
    tested = {tf.flow for tf in files} | broken
    for name in sorted(wanted - set(project.flows)):
        known = ", ".join(sorted(project.flows))
        report.problems.append(Problem(display(project.root), 0, f"no flow {name!r} (flows: {known})"))
    report.untested = sorted(
        n for n in (wanted or set(project.flows)) if n in project.flows and n not in tested
    )
    for tf in files:
        for case in tf.cases:
            report.results.append(run_case(project, tf.flow, case))
    report.seconds = time.perf_counter() - t0
    return report


def run_case(project: Project, flow_name: str, case: Case) -> CaseResult:
    t0 = time.perf_counter()
    result = CaseResult(case, flow_name)
    if case.rows is not None:
        return _run_batch_case(project, flow_name, case, result, t0)
    try:
        run = simulate(project.flows[flow_name], project, case.event, case.responses, calls=case.calls)
    except Exception as exc:  # a step or connector that raises instead of refusing the record
        result.error = f"the flow raised {type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - t0
        return result
    result.failures = check(case, run)
    result.seconds = time.perf_counter() - t0
    return result


def _run_batch_case(
    project: Project, flow_name: str, case: Case, result: CaseResult, t0: float
) -> CaseResult:
    try:
        run = simulate_batch(project.flows[flow_name], case.rows or [], case.columns)
    except Exception as exc:  # e.g. a map target a table cannot take, a soft-delete column not given
        result.error = f"the batch steps raised {type(exc).__name__}: {exc}"
    else:
        result.failures = check_batch(case, run)
    result.seconds = time.perf_counter() - t0
    return result


def check_batch(case: Case, run: BatchCaseRun) -> list[str]:
    """What differs between a batch test's expectations and what the steps made of its rows."""
    e = case.expect
    out: list[str] = []
    want_rows = e.rows or []
    found = compare(want_rows, run.rows, "rows", subset=False)
    if found:
        out += [str(m) for m in found]
        out += ["  " + line for line in unified(want_rows, run.rows, "rows")]
    if isinstance(e.filtered, int) and not isinstance(e.filtered, bool) and e.filtered != run.filtered:
        out.append(f"filtered: expected {e.filtered} rows dropped by the steps, got {run.filtered}")
    want_bad = e.quarantined if isinstance(e.quarantined, list) else []
    got = [f"  {reason}  (row {_short(row)})" for row, reason in run.quarantined]
    if len(want_bad) != len(run.quarantined):
        out.append(f"quarantined: expected {len(want_bad)} rows, got {len(run.quarantined)}")
        out += got
        return out
    for n, (want, (row, reason)) in enumerate(zip(want_bad, run.quarantined, strict=True)):
        text = want if isinstance(want, str) else want.reason
        if text not in reason:
            out.append(f"quarantined[{n}]: the reason does not contain {text!r}:")
            out.append(f"  reason: {reason}")
        if not isinstance(want, str) and want.row_includes is not None:
            out += [str(m) for m in compare(want.row_includes, row, f"quarantined[{n}].row", subset=True)]
    return out


def _short(row: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in row.items())
    return text if len(text) <= 120 else text[:117] + "..."


def check(case: Case, run: FlowRun) -> list[str]:
    """What differs between the case's expectations and the run, as readable lines (empty: passed)."""
    e = case.expect
    got = f"it was {run.status}" + (f": {run.reason}" if run.reason else "")
    if e.quarantined not in (None, False):
        if run.status != "quarantined":
            return [f"expected the event to be quarantined, but {got}"]
        text = e.quarantined if isinstance(e.quarantined, str) else ""
        if text and text not in (run.reason or ""):
            return [f"quarantined, but the reason does not contain {text!r}:", f"  reason: {run.reason}"]
        return []
    if e.filtered not in (None, False):
        if run.status != "filtered":
            return [f"expected the event to be filtered, but {got}"]
        text = e.filtered if isinstance(e.filtered, str) else ""
        if text and text not in (run.reason or ""):
            return [f"filtered, but the reason does not contain {text!r}:", f"  reason: {run.reason}"]
        return []
    if e.aggregated not in (None, False):
        if run.status != "aggregated":
            return [f"expected the event to be counted into a window, but {got}"]
        label = window_label(run.trace)
        text = e.aggregated if isinstance(e.aggregated, str) else ""
        if text and text not in label:
            return [f"counted into window {label}, which does not contain {text!r}"]
        return []
    if run.status in ("quarantined", "filtered", "aggregated"):
        if run.status == "aggregated":
            got = f"it was counted into window {window_label(run.trace)}"
        return [f"expected deliveries, but {got}"]
    out: list[str] = []
    if e.record_includes is not None:
        out += [str(m) for m in compare(e.record_includes, run.record, "record", subset=True)]
    expected = e.deliveries or {}
    captured = run.deliveries
    if run.status in ("dead", "paused") and (run.reason or "").startswith("call "):
        if expected:  # the run stopped at a call: say so before the destinations it never reached
            out.append(f"the run stopped at a call ({run.status}): {run.reason}")
    for name in expected:
        if name not in captured:
            out.append(f"{name}: expected a delivery, but this destination's route did not match")
    for name in captured:
        if name not in expected:
            out.append(f"{name}: got a delivery that the test does not expect")
    for name, want in expected.items():
        c = captured.get(name)
        if c is None or want is None:
            continue
        if want.attempts is not None and want.attempts != len(c.attempts):
            path = ", ".join(a.describe() for a in c.attempts)
            out.append(f"{name}: expected {want.attempts} attempts, got {len(c.attempts)}: {path}")
        if want.outcome is not None and want.outcome != c.outcome:
            path = ", ".join(a.describe() for a in c.attempts)
            out.append(f"{name}: expected the delivery to end {want.outcome}, it ended {c.outcome}: {path}")
        out += _check_request(name, want.fields(), c.view)
    for c in captured.values():
        if c.drift:  # the test's answer and the pinned contract disagree: one of them is out of date
            out.append(f"{c.destination}: the simulated answer differs from the flow's response contract:")
            out += [f"  {d}" for d in c.drift]
    return out


def _check_request(name: str, want: dict[str, Any], view: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, expected in want.items():
        if key in RESERVED:
            continue
        subset = key.endswith("_includes") or key == "headers"
        field_name = key.removesuffix("_includes")
        if field_name not in view:
            have = ", ".join(sorted(view))
            out.append(f"{name}: the request has no field {field_name!r} (it has: {have})")
            continue
        actual = view[field_name]
        if field_name == "headers" and isinstance(expected, dict) and isinstance(actual, dict):
            lower = {str(k).lower(): v for k, v in actual.items()}  # header names ignore case
            actual = {k: lower.get(str(k).lower(), missing()) for k in expected}
        found = compare(expected, actual, f"{name}.{field_name}", subset=subset)
        if found:
            out += [str(m) for m in found]
            if not subset and isinstance(expected, dict | list):
                out += ["  " + line for line in unified(expected, actual, f"{name}.{field_name}")]
    return out


def junit_xml(report: Report) -> bytes:
    """The report as JUnit XML: one testsuite per flow, one testcase per test."""
    suites = ET.Element("testsuites", tests=str(len(report.results)), failures=str(len(report.failed)))
    by_flow: dict[str, list[CaseResult]] = {}
    for r in report.results:
        by_flow.setdefault(r.flow, []).append(r)
    for flow, results in by_flow.items():
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"flow {flow}",
            tests=str(len(results)),
            failures=str(sum(1 for r in results if r.failures)),
            errors=str(sum(1 for r in results if r.error)),
            time=f"{sum(r.seconds for r in results):.4f}",
        )
        for r in results:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"flows.{flow}",
                name=r.case.name,
                file=r.case.file,
                line=str(r.case.line),
                time=f"{r.seconds:.4f}",
            )
            if r.error:
                ET.SubElement(tc, "error", message=r.error).text = r.error
            elif r.failures:
                el = ET.SubElement(tc, "failure", message=r.failures[0])
                el.text = "\n".join(r.failures)
    if report.problems:
        suite = ET.SubElement(suites, "testsuite", name="test files", tests="1", errors="1")
        tc = ET.SubElement(suite, "testcase", classname="flows", name="test files load")
        text = "\n".join(str(p) for p in report.problems)
        ET.SubElement(tc, "error", message=str(report.problems[0])).text = text
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def flow_test_path(root: Path, flow: str) -> Path:
    """Where a flow's tests live: beside the flow, `flows/<flow>.test.yaml`."""
    return root / "flows" / f"{flow}.test.yaml"


def window_label(trace: list[dict[str, Any]]) -> str:
    """The window an aggregated run was counted into, from its trace."""
    return next(
        (str(s["window"]) for s in reversed(trace) if s.get("kind") == "aggregate" and "window" in s), ""
    )
