"""Flow test files (`flows/<flow>.test.yaml`): parsed and checked against the flow, problems with file:line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patchbay.batch.frame import TYPES as FRAME_TYPES
from patchbay.config.models import Spec
from patchbay.config.problems import pydantic_problems
from patchbay.config.project import Project
from patchbay.config.source import Located, load_yaml
from patchbay.errors import ConfigError, Problem
from patchbay.testing.harness import OUTCOME_NAMES, Response

TEST_SUFFIXES = (".test.yaml", ".test.yml")
RESERVED = ("attempts", "outcome")  # keys of a destination's expectation that are not request fields


def is_test_file(path: Path) -> bool:
    return path.name.endswith(TEST_SUFFIXES)


def find_test_files(root: Path) -> list[Path]:
    folder = root / "flows"
    return sorted(p for p in folder.glob("*.y*ml") if is_test_file(p)) if folder.is_dir() else []


class ResponseDoc(Spec):
    status: int | None = Field(None, ge=100, le=599, description="HTTP status of the simulated answer.")
    outcome: str | None = Field(
        None, description="Or the outcome: ok, transient, timeout, terminal, auth, gone."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Answer headers, e.g. Retry-After.")
    body: Any = Field(None, description="Answer body (JSON).")

    @model_validator(mode="after")
    def _one(self) -> ResponseDoc:
        if (self.status is None) == (self.outcome is None):
            raise ValueError("give exactly one of `status` (e.g. 503) or `outcome` (e.g. transient)")
        if self.outcome is not None and self.outcome not in OUTCOME_NAMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; use one of {', '.join(OUTCOME_NAMES)}")
        return self


class DestinationExpect(BaseModel):
    """Fields of the captured request (exact; `headers` and `<field>_includes` as a subset or
    substring), plus `attempts` and `outcome` of the simulated delivery."""

    model_config = ConfigDict(extra="allow")

    attempts: int | None = Field(None, ge=1, description="How many attempts the delivery takes.")
    outcome: str | None = Field(None, description="delivered, dead, paused or disabled.")

    @field_validator("outcome")
    @classmethod
    def _outcome(cls, v: str | None) -> str | None:
        if v is not None and v not in ("delivered", "dead", "paused", "disabled"):
            raise ValueError(f"unknown outcome {v!r}; use delivered, dead, paused or disabled")
        return v

    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class QuarantinedRow(Spec):
    reason: str = Field(description="Text that must appear in the row's quarantine reason.")
    row_includes: dict[str, Any] | None = Field(
        None, description="Source values the quarantined row has (a subset), e.g. {id: 3}."
    )


class ExpectDoc(Spec):
    deliveries: dict[str, DestinationExpect | None] | None = Field(
        None, description="Destination name -> what it receives; exactly these destinations receive one."
    )
    quarantined: str | bool | list[str | QuarantinedRow] | None = Field(
        None,
        description="The event is quarantined; a string must appear in the reason. A batch flow's test: "
        "the quarantined rows in order, each a reason text or {reason, row_includes}.",
    )
    filtered: str | bool | int | None = Field(
        None,
        description="The event is filtered out (a step dropped it, or no destination matched). A batch "
        "flow's test: how many rows the steps drop.",
    )
    aggregated: str | bool | None = Field(
        None,
        description="The event is counted into an aggregate window; a string must appear in the window's"
        " label (e.g. its date).",
    )
    record_includes: dict[str, Any] | None = Field(
        None, description="Fields the record has after the steps (a subset)."
    )
    rows: list[dict[str, Any]] | None = Field(
        None,
        description="A batch flow's test: the rows written to its table, in the order given (every column).",
    )

    @model_validator(mode="after")
    def _one(self) -> ExpectDoc:
        if self.rows is not None:  # a batch flow's rows: any of rows, quarantined, filtered
            if self.deliveries is not None or self.record_includes is not None:
                raise ValueError(
                    "a batch test expects `rows` (and `quarantined`, `filtered`), not deliveries"
                )
            if self.quarantined is not None and not isinstance(self.quarantined, list):
                raise ValueError("with `rows`, `quarantined` lists the quarantined rows (a reason each)")
            if self.filtered is not None and (isinstance(self.filtered, str | bool)):
                raise ValueError("with `rows`, `filtered` is how many rows the steps drop (a number)")
            return self
        if isinstance(self.quarantined, list) or (
            isinstance(self.filtered, int) and not isinstance(self.filtered, bool)
        ):
            raise ValueError(
                "a list of quarantined rows or a count of filtered ones is for a batch flow's test: "
                "expect `rows:` too (the rows written; [] for none)"
            )
        kinds = ("deliveries", "quarantined", "filtered", "aggregated")
        given = [k for k in kinds if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("expect exactly one of `deliveries`, `quarantined`, `filtered` or `aggregated`")
        return self


class CaseDoc(Spec):
    name: str = Field(description="What this test shows, in a few words.")
    event: Any = Field(None, description="The input event, inline.")
    event_file: str | None = Field(None, description="Or a JSON file with it, relative to the test file.")
    rows: list[dict[str, Any]] | None = Field(
        None,
        description="A batch flow's test: rows of its source table, inline (column: value); they run "
        "through the same batch transform a real run uses, with no database.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Source column types where the values do not say (int, float, numeric, bool, json, "
        "text, timestamptz, date...); default: from the first value that is not null.",
    )
    responses: dict[str, list[int | str | ResponseDoc]] = Field(
        default_factory=dict,
        description="Destination -> simulated answers in turn (an HTTP status, an outcome name or a "
        "mapping); the last one repeats. Default: success.",
    )
    calls: dict[str, list[int | str | ResponseDoc]] = Field(
        default_factory=dict,
        description="Call step name -> its recorded answers in turn (like `responses`; after a split each "
        "element's call takes the next one, the last repeats), e.g. `{find_contact: [{status: 200, body: "
        "{id: c-1}}]}`. A call the test does not answer stops the run (dead).",
    )
    expect: ExpectDoc

    @field_validator("responses", "calls")
    @classmethod
    def _answers(
        cls, v: dict[str, list[int | str | ResponseDoc]]
    ) -> dict[str, list[int | str | ResponseDoc]]:
        for answers in v.values():
            if not answers:
                raise ValueError("a destination's `responses` list is empty; remove it or add an answer")
            for r in answers:
                if isinstance(r, int) and not 100 <= r <= 599:
                    raise ValueError(f"{r} is not an HTTP status; write e.g. 503 or 201")
                if isinstance(r, str) and r not in OUTCOME_NAMES:
                    raise ValueError(
                        f"unknown outcome {r!r}; use an HTTP status or one of {', '.join(OUTCOME_NAMES)}"
                    )
        return v

    @model_validator(mode="after")
    def _input(self) -> CaseDoc:
        if self.rows is not None:
            if self.event is not None or self.event_file is not None or self.responses:
                raise ValueError("a batch test gives `rows` (the source table's), not an event or responses")
            if self.expect.rows is None:
                raise ValueError("a batch test (`rows:`) expects `rows:` (the rows written; [] for none)")
            return self
        if self.expect.rows is not None:
            raise ValueError("`expect.rows` is for a batch flow's test: give the source `rows:`")
        if (self.event is None) == (self.event_file is None):
            raise ValueError("give exactly one of `event` (inline) or `event_file`")
        return self


class FlowTestDoc(Spec):
    flow: str | None = Field(None, description="The flow tested; default the file name before .test.yaml.")
    tests: list[CaseDoc] = Field(min_length=1, description="The tests, in order.")


@dataclass
class Case:
    name: str
    file: str
    line: int
    event: Any
    responses: dict[str, list[Response]]
    expect: ExpectDoc
    rows: list[dict[str, Any]] | None = None  # a batch flow's source rows
    columns: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[Response]] = field(default_factory=dict)  # recorded answers of call steps


@dataclass
class FlowTestFile:
    path: Path
    file: str  # as shown
    flow: str
    cases: list[Case] = field(default_factory=list)


def load_test_file(path: Path, project: Project, display: str | None = None) -> FlowTestFile:
    """Parse and check a test file against the project; ConfigError with every problem otherwise."""
    src = load_yaml(path, display or str(path))
    problems: list[Problem] = []
    try:
        doc = FlowTestDoc.model_validate(src.data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(src, exc, (), FlowTestDoc)) from exc
    flow_name = doc.flow or path.name.removesuffix(".yml").removesuffix(".yaml").removesuffix(".test")
    flow = project.flows.get(flow_name)
    if flow is None:
        known = ", ".join(sorted(project.flows)) or "none"
        where = ("flow",) if doc.flow else ()
        raise ConfigError([src.problem(where, f"no flow {flow_name!r} in this project (flows: {known})")])
    names = [d.name for d in flow.destinations]
    out = FlowTestFile(path, src.file, flow.name)
    for i, c in enumerate(doc.tests):
        loc = ("tests", i)
        if (flow.batch is not None) != (c.rows is not None):
            what = (
                "a batch flow: give the source table's `rows:` and expect `rows:`"
                if flow.batch is not None
                else "an event flow: give an `event:` (rows are for batch flows)"
            )
            problems.append(src.problem(loc, f"flow {flow.name!r} is {what}"))
            continue
        bad = {k: t for k, t in c.columns.items() if t not in FRAME_TYPES}
        for k, t in bad.items():
            problems.append(
                src.problem(
                    (*loc, "columns", k),
                    f"{k}: unknown column type {t!r}; use one of {', '.join(FRAME_TYPES)}",
                )
            )
        for key in c.responses:
            if key not in names:
                problems.append(_unknown(src, (*loc, "responses", key), key, flow.name, names))
        for key in c.expect.deliveries or {}:
            if key.split("[", 1)[0] not in names:  # `crm[1]`: element 1's delivery after a split
                problems.append(_unknown(src, (*loc, "expect", "deliveries", key), key, flow.name, names))
        event = c.event
        if c.event_file is not None:
            event = _read_event(path.parent / c.event_file, src, (*loc, "event_file"), problems)
        called = [s.name for s in flow.steps if getattr(s.step, "calls", False)]
        for key in c.calls:
            if key not in called:
                problems.append(
                    src.problem(
                        (*loc, "calls", key),
                        f"flow {flow.name!r} has no call step {key!r} (it has: {', '.join(called) or 'none'})",
                    )
                )
        responses = {k: [_response(r) for r in v] for k, v in c.responses.items()}
        calls = {k: [_response(r) for r in v] for k, v in c.calls.items()}
        out.cases.append(
            Case(c.name, src.file, src.line(loc), event, responses, c.expect, c.rows, dict(c.columns), calls)
        )
    if problems:
        raise ConfigError(problems)
    return out


def _unknown(src: Located, loc: tuple[Any, ...], key: str, flow: str, names: list[str]) -> Problem:
    return src.problem(loc, f"flow {flow!r} has no destination {key!r} (it has: {', '.join(names)})")


def _read_event(p: Path, src: Located, loc: tuple[Any, ...], problems: list[Problem]) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(src.problem(loc, f"cannot read the event file {p}: {exc.strerror}"))
        return None
    if p.suffix in (".yaml", ".yml"):
        return load_yaml(p).data
    try:
        return json.loads(text)
    except ValueError as exc:
        problems.append(src.problem(loc, f"the event file {p} is not JSON: {exc}"))
        return None


def _response(r: int | str | ResponseDoc) -> Response:
    if isinstance(r, ResponseDoc):
        return Response(r.status, r.outcome, r.headers, r.body)
    if isinstance(r, int):
        return Response(status=r)
    return Response(outcome=r)
