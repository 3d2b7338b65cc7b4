"""The `batch:` block of a flow: what a bulk sync reads, how it writes, and what it does on drift and deletes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from patchbay.config.durations import Duration
from patchbay.config.models import Spec

Mode = Literal["full", "append", "merge"]
FileFormat = Literal["csv", "jsonl", "parquet"]
DriftPolicy = Literal["evolve", "ignore", "stop"]


def _ident(value: str, what: str) -> str:
    parts = value.split(".")
    if len(parts) > 2 or not all(p and (p[0].isalpha() or p[0] == "_") for p in parts):
        raise ValueError(f"bad {what} {value!r}: write a name such as customers or public.customers")
    if not all(ch.isalnum() or ch == "_" for p in parts for ch in p):
        raise ValueError(f"bad {what} {value!r}: letters, digits and _ only")
    return value


class BatchFrom(Spec):
    """Where a batch sync reads: a table, or a SELECT, of a database system."""

    system: str = Field(description="The source system (a database the hub can read in bulk).")
    table: str | None = Field(None, description="Table to read, e.g. customers or public.customers.")
    query: str | None = Field(
        None,
        description="Or a SELECT; the cursor window is applied around it (`SELECT * FROM (query) q WHERE ...`).",
    )

    files: str | None = Field(
        None,
        description=(
            "Or, from a files system: a file name or a glob such as `orders-*.csv` inside its folder. Each run "
            "reads the files it has not read before (by name, size and modification time), oldest first."
        ),
    )
    format: FileFormat | None = Field(
        None,
        description="files: csv (a header line; an empty cell is NULL), jsonl (one object a line) or parquet; "
        "omitted = from the extension (.csv, .jsonl or .ndjson, .parquet).",
    )
    api: dict[str, Any] | None = Field(
        None,
        description=(
            "Or, from an http system: the API to read page by page, with the settings of an http source "
            "(path, params, items_path, pagination, max_pages, timeout_s); the flow's `cursor.column` is the "
            "record field sent back as `api_since_param` (e.g. updated_since)."
        ),
    )
    api_since_param: str | None = Field(
        None, description="api: the query parameter that carries the last cursor value (e.g. updated_since)."
    )

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else _ident(v, "table")

    @field_validator("files")
    @classmethod
    def _files(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.strip() or "/" in v or "\\" in v or v.startswith((".", "~")):
                raise ValueError(
                    f"bad files {v!r}: give a file name or a glob inside the system's folder, e.g. orders-*.csv"
                )
        return v

    @field_validator("query")
    @classmethod
    def _query(cls, v: str | None) -> str | None:
        if v is not None:
            text = v.strip().rstrip(";")
            if not text.lower().startswith(("select", "with")):
                raise ValueError("query must be one SELECT (or WITH ... SELECT) statement")
            if ";" in text:
                raise ValueError("query must be one statement: remove the `;` inside it")
            return text
        return v

    @model_validator(mode="after")
    def _one(self) -> BatchFrom:
        given = [n for n in ("table", "query", "files", "api") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `table` or `query` (or `files` for files, `api` for http)")
        if self.format is not None and self.files is None:
            raise ValueError("`format` goes with `files`")
        if self.api_since_param is not None and self.api is None:
            raise ValueError("`api_since_param` goes with `api`")
        return self


class BatchTo(Spec):
    """Where a batch sync writes: a table of a database system (created when missing)."""

    system: str = Field(description="The destination system (a database the hub can write in bulk).")
    table: str = Field(
        description="Table to write, e.g. reporting.customers; created when missing. For a files system: the "
        "name of the files written (customers -> customers.csv)."
    )
    format: FileFormat | None = Field(
        None,
        description="files: csv, jsonl or parquet (default csv). Each run writes one new file, complete or not "
        "at all: full replaces `<table>.<ext>`, append adds `<table>-<time>-<run>.<ext>`.",
    )

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        return _ident(v, "table")


class BatchCursor(Spec):
    """Incremental reads: only rows whose cursor column moved since the last run, with a lookback window."""

    column: str = Field(description="A column that grows when a row changes, e.g. updated_at or id.")
    lookback: Duration = Field(
        0.0,
        description=(
            "Read again this far behind the last cursor (e.g. 5m for a timestamp cursor) so rows committed "
            "late with an older value are not lost; rows read twice are not written twice."
        ),
    )

    @field_validator("column")
    @classmethod
    def _column(cls, v: str) -> str:
        return _ident(v, "cursor column")


class BatchDeletes(Spec):
    """How rows deleted at the source reach the destination."""

    detect: Literal["none", "soft", "keys"] = Field(
        "none",
        description=(
            "none: deletes are not followed; soft: rows whose `column` is true or set are deleted at the "
            "destination; keys: the key sets of both sides are compared by hashed ranges and keys missing "
            "at the source are deleted (no CDC needed)."
        ),
    )
    column: str | None = Field(None, description="soft: the column that marks a deleted row (deleted_at).")
    max_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="A run that would delete more than this share of the destination's rows stops with an alert.",
    )

    @model_validator(mode="after")
    def _soft_needs_column(self) -> BatchDeletes:
        if self.detect == "soft" and not self.column:
            raise ValueError("deletes.detect: soft needs `column` (the column that marks a deleted row)")
        return self


class BatchSpec(Spec):
    """A bulk sync: rows travel in bounded batches from a table or query to a table, in one transaction."""

    from_: BatchFrom = Field(alias="from", description="Source table or query.")
    to: BatchTo = Field(description="Destination table.")
    mode: Mode = Field(
        "merge",
        description=(
            "full: replace the destination's rows with the source's (swapped in at the end); append: insert "
            "new rows (rows whose key is already there are skipped); merge: insert or update by key."
        ),
    )
    key: list[str] = Field(
        default_factory=list, description="Primary key columns (after mapping); needed by append and merge."
    )
    cursor: BatchCursor | None = Field(
        None, description="Read incrementally by this column; omitted = every run reads every row."
    )
    deletes: BatchDeletes = Field(default_factory=BatchDeletes)
    on_drift: DriftPolicy = Field(
        "stop",
        description=(
            "When the source's columns change from what the last run saw: evolve (add new columns at the "
            "destination), ignore (write the known columns; a dropped one is left untouched, never NULLed), "
            "or stop (the run stops and alerts; `patchbay run FLOW --accept-schema` accepts the change)."
        ),
    )
    batch_rows: int = Field(
        10_000, ge=100, le=1_000_000, description="Rows per batch in memory (memory stays bounded)."
    )
    pushdown: Literal["auto", "off"] = Field(
        "auto",
        description=(
            "auto: the source database computes the steps it can compute exactly (copies, lower/upper/trim on "
            "ASCII text, concat, JSON string fields, casts; required, formats, patterns, lengths, ranges, "
            "accepted values) in its SELECT, and only rows outside that go through the steps in Python, with "
            "the same values and quarantine reasons (`patchbay run FLOW --explain` shows what was pushed); "
            "off: every step runs in Python."
        ),
    )
    quarantine_samples: int = Field(
        1000, ge=0, le=100_000, description="Invalid rows kept with their reasons per run (the rest counted)."
    )

    model_config = {"extra": "forbid", "populate_by_name": True}

    @field_validator("key")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return [_ident(k, "key column") for k in v]

    @model_validator(mode="after")
    def _coherent(self) -> BatchSpec:
        if self.mode in ("append", "merge") and not self.key:
            raise ValueError(f"mode {self.mode} needs `key`: the column(s) that identify a row")
        if self.deletes.detect == "keys" and not self.key:
            raise ValueError("deletes.detect: keys needs `key`")
        if self.deletes.detect != "none" and self.mode == "full":
            raise ValueError("a full refresh already removes deleted rows: drop `deletes` or use merge")
        return self
