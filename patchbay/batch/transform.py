"""A flow's steps over a whole batch: decode only what the steps read, pass every other column through.

The steps are the flow's own step objects, so a batch sync maps, validates and filters exactly as a
webhook flow does (same functions, same messages). What makes it fast is what it does not do: a
field that a `map` copies as it is (`first_name: first_name`) is never decoded or re-encoded, and a
record holds only the columns some expression, rule or condition names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from patchbay.batch.frame import Column, Frame, decode, decode_column, encode, infer_type
from patchbay.errors import ConfigError, RecordInvalid
from patchbay.expressions import compile_expr, is_truthy
from patchbay.processors.base import Dropped


@dataclass
class Invalid:
    """A row that did not pass the steps: its source values (decoded) and why."""

    row: dict[str, Any]
    reason: str


@dataclass
class Result:
    rows: list[list[bytes]]  # in output column order
    invalid: list[Invalid] = field(default_factory=list)
    filtered: int = 0
    deleted_keys: list[tuple[Any, ...]] = field(default_factory=list)  # soft-deleted rows' keys
    raw: bytes | None = None  # rows as one COPY-text block (a pushed-down read's fast rows)
    raw_rows: int = 0

    @property
    def written(self) -> int:
        return len(self.rows) + self.raw_rows


def _names(ast: Any) -> Iterator[str]:
    """Every identifier an expression names (a superset of the columns it reads)."""
    if isinstance(ast, dict):
        if ast.get("type") == "field":
            yield str(ast.get("value"))
        for child in ast.get("children", ()):
            yield from _names(child)


def step_reads(spec: Any) -> set[str] | None:
    """The top-level fields a step reads, or None when it may read any (map with keep: true)."""
    names: set[str] = set()
    if spec.when is not None:
        names |= set(_names(spec.when.ast))
    config = spec.config
    if spec.kind == "map":
        if config.keep:
            return None
        names |= _map_reads(config)
    elif spec.kind == "validate":
        names |= {path.split(".")[0] for path in config.rules}
    elif spec.kind == "filter":
        names |= set(_names(compile_expr(config.when).ast))
    else:
        return None
    return names


def _map_reads(config: Any) -> set[str]:
    names: set[str] = set()
    for f in config.fields.values():
        if f.expr is not None:
            names |= set(_names(compile_expr(f.expr, tables=config.tables or None).ast))
    return names


def _is_copy(f: Any, columns: set[str]) -> str | None:
    """The source column a map field copies unchanged (`first_name: first_name`), else None."""
    if f.expr is None or f.default is not None or f.type is not None:
        return None
    text = f.expr.strip()
    return text if text in columns else None


class FrameTransform:
    """Built once per run from the flow's steps and the source's columns; `apply` runs per batch."""

    def __init__(
        self,
        steps: list[Any],
        source: list[Column],
        *,
        key: list[str] = (),  # type: ignore[assignment]
        soft_delete: str | None = None,
    ) -> None:
        self.source = source
        index = {c.name: i for i, c in enumerate(source)}
        self._index = index
        self.steps = list(steps)
        first = self.steps[0] if self.steps else None
        rest = self.steps[1:] if first is not None and first.kind == "map" else self.steps
        plain_map = (
            first is not None
            and first.kind == "map"
            and first.when is None
            and not (first.config.keep or first.config.flatten or first.config.omit_nulls)
        )
        only_checks = all(s.kind in ("validate", "filter") for s in rest)
        self._copy: dict[str, int] = {}  # output column -> source column index, bytes passed through
        if not self.steps or (only_checks and first is not None and first.kind != "map"):
            # No map: the output is the source's columns; steps only check.
            self.out_names = [c.name for c in source]
            self._copy = {c.name: i for i, c in enumerate(source)}
            self._map = None
            checks = self.steps
        elif plain_map and only_checks and first is not None:
            cfg = first.config
            for target in cfg.fields:
                if "." in target:
                    raise ConfigError(
                        f"map target {target!r} is nested; a table takes flat columns: name it without dots"
                    )
            self.out_names = list(cfg.fields)
            computed = {}
            for target, f in cfg.fields.items():
                src = _is_copy(f, set(index))
                if src is not None:
                    self._copy[target] = index[src]
                else:
                    computed[target] = f
            self._map = type(first.step)(cfg.model_copy(update={"fields": computed})) if computed else None
            checks = rest
        else:
            # Anything else (keep: true, several maps, unknown steps): every column decoded, every step run.
            self.out_names = []
            self._map = None
            checks = self.steps
        self._general = not self.out_names
        self._checks = checks
        map_reads = set(_map_reads(self._map.config)) if self._map is not None else set()
        check_reads: set[str] | None = set()
        for s in checks:
            got = step_reads(s)
            check_reads = None if got is None or check_reads is None else check_reads | got
        if self._general or check_reads is None:
            map_reads = check_reads = set(index)
        # What to decode from the source row: the columns the map reads (or, without a map, the checks
        # read); then the copied columns the checks after a map read, under their output names.
        reads = map_reads if self._map is not None else map_reads | check_reads
        self._decode_src = sorted(index[n] for n in reads if n in index)
        copied_names = {v: k for k, v in self._copy.items()}
        self._decode_copied = (
            [(copied_names[i], i) for i in self._copy.values() if copied_names[i] in check_reads]
            if self._map is not None
            else []
        )
        self.key = list(key)
        self._soft = index.get(soft_delete) if soft_delete else None
        if soft_delete and self._soft is None:
            raise ConfigError(f"deletes.column {soft_delete!r} is not a column of the source")
        self._key_src: list[int] = []
        if soft_delete:
            for k in self.key:
                i = self._copy.get(k, index.get(k) if self._general else None)
                if i is None:
                    raise ConfigError(
                        f"soft deletes need key column {k!r} copied from the source as it is (`{k}: {k}`)"
                    )
                self._key_src.append(i)
        self.out_types: dict[str, str] = {
            name: source[i].type for name, i in self._copy.items()
        }  # computed columns get theirs from the first batch

    @property
    def copies_everything(self) -> bool:
        return self._map is None and not self._checks and not self._general

    def _decoded(self, row: list[bytes]) -> dict[str, Any]:
        src = self.source
        return {src[i].name: decode(row[i], src[i].type) for i in range(len(src))}

    def apply(self, frame: Frame) -> Result:
        if self.copies_everything and self._soft is None:
            return Result([[r[self._copy[n]] for n in self.out_names] for r in frame.rows])
        if self._general:
            return self._apply_general(frame)
        src = self.source
        out = Result([])
        rows = frame.rows
        if self._soft is not None:
            kept = []
            soft, soft_type = self._soft, src[self._soft].type
            for row in rows:
                if _is_set(decode(row[soft], soft_type)):
                    out.deleted_keys.append(self._key_of(row))
                else:
                    kept.append(row)
            rows = kept
        # Column by column: decode what the steps read, then one small record per row.
        names = [src[i].name for i in self._decode_src]
        columns = [decode_column([r[i] for r in rows], src[i].type) for i in self._decode_src]
        copied = [(n, decode_column([r[i] for r in rows], src[i].type)) for n, i in self._decode_copied]
        records: list[Any] = [dict(zip(names, vals, strict=True)) for vals in zip(*columns, strict=True)]
        if not names:
            records = [{} for _ in rows]
        computed = [n for n in self.out_names if n not in self._copy]
        values: dict[str, list[Any]] = {n: [] for n in computed}
        kept_rows: list[list[bytes]] = []
        map_apply = self._map.flat_values if self._map is not None else None
        checks = self._checks
        for k, record in enumerate(records):
            try:
                if map_apply is not None:
                    record = map_apply(record)
                    for n, col in copied:
                        record[n] = col[k]
                for s in checks:
                    if s.when is not None and not is_truthy(s.when.search(record)):
                        continue
                    record = s.step.apply(record)
            except RecordInvalid as exc:
                where = "; ".join(str(v) for v in exc.violations)
                out.invalid.append(Invalid(self._decoded(rows[k]), f"{exc.step or 'step'}: {where}"))
                continue
            except Dropped:
                out.filtered += 1
                continue
            kept_rows.append(rows[k])
            for n in computed:
                values[n].append(record.get(n))
        encoded = {n: [encode(v) for v in values[n]] for n in computed}
        for n in computed:
            if n not in self.out_types and any(v is not None for v in values[n]):
                self.out_types[n] = infer_type(values[n])
        out_cols = [
            [r[j] for r in kept_rows] if (j := self._copy.get(n)) is not None else encoded[n]
            for n in self.out_names
        ]
        out.rows = [list(t) for t in zip(*out_cols, strict=True)] if out_cols else []
        return out

    def _apply_general(self, frame: Frame) -> Result:
        """Every column decoded, every step run, the output's columns taken from the first record."""
        out = Result([])
        computed_values: dict[str, list[Any]] = {}
        for row in frame.rows:
            record: Any = self._decoded(row)
            try:
                for s in self.steps:
                    if s.when is not None and not is_truthy(s.when.search(record)):
                        continue
                    record = s.step.apply(record)
            except RecordInvalid as exc:
                where = "; ".join(str(v) for v in exc.violations)
                out.invalid.append(Invalid(self._decoded(row), f"{exc.step or 'step'}: {where}"))
                continue
            except Dropped:
                out.filtered += 1
                continue
            if not self.out_names:
                self.out_names = list(record)
            out.rows.append([encode(record.get(n)) for n in self.out_names])
            for n in self.out_names:
                computed_values.setdefault(n, []).append(record.get(n))
        for n, values in computed_values.items():
            if n not in self.out_types and any(v is not None for v in values):
                self.out_types[n] = infer_type(values)
        return out

    def output_columns(self) -> list[Column]:
        return [Column(n, self.out_types.get(n, "text")) for n in self.out_names]

    def _key_of(self, row: list[bytes]) -> tuple[Any, ...]:
        src = self.source
        return tuple(decode(row[i], src[i].type) for i in self._key_src)


def _is_set(value: Any) -> bool:
    """A soft-delete marker: true, or any non-null value that is not false (deleted_at)."""
    return value is not None and value is not False


class PushedTransform:
    """The steps over a pushed-down read (batch/pushdown.py): the fast rows through what is left of the
    steps (nothing at all for a raw read), the other rows through every step, as FrameTransform would."""

    def __init__(
        self,
        plan: Any,
        steps: list[Any],
        source: list[Column],
        *,
        key: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        self.plan = plan
        self.python = FrameTransform(steps, source, key=key)
        self.fast = None if plan.read.raw else FrameTransform(plan.steps, plan.read.columns, key=key)
        self._source_names = {c.name for c in source}
        self.out_names = self.python.out_names

    def apply(self, frame: Frame) -> Result:
        if frame.part == "python":
            return self.python.apply(frame)
        if frame.raw is not None:
            return Result([], raw=frame.raw, raw_rows=frame.raw_rows)
        assert self.fast is not None
        out = self.fast.apply(frame)
        for bad in out.invalid:  # the row as the source has it, without the pushed columns
            bad.row = {k: v for k, v in bad.row.items() if k in self._source_names}
        return out

    def output_columns(self) -> list[Column]:
        """Pushed and copied columns take their type from the SELECT; columns computed in Python from the
        first batch's values, as FrameTransform does."""
        if self.fast is None:
            pushed = {c.name: c.type for c in self.plan.read.columns}
        else:
            pushed = dict(self.fast.out_types)
        names = self.python.out_names or (self.fast.out_names if self.fast is not None else [])
        return [Column(n, pushed.get(n) or self.python.out_types.get(n, "text")) for n in names]
