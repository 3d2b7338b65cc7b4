"""http (bulk): a paginated JSON API read page by page into a batch sync, into any bulk destination.

The pages come from the http source's own reader (`http_poll`: pagination, auth, TLS, the address
guard), with one addition for a bulk read: a 429 or 5xx answer is waited out (its Retry-After, or a
growing pause) and the same page asked again, a few times, so one busy moment does not fail the run.
Each page becomes a frame. The columns are the fields of the first page's records (nested objects and
arrays are JSON columns); a later record with a field no column has is quarantined with its reason.
The flow's `cursor.column` is a record field: its largest value is the next run's `api_since_param`
(less the lookback, for an ISO timestamp or a number), and the destination keeps it with the rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from patchbay.batch.frame import Column, Frame, infer_type
from patchbay.batch.transform import Invalid
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import SyncState, Window
from patchbay.connectors.files_bulk import FileFrame, _fits, _py_field
from patchbay.connectors.http import HttpSystem
from patchbay.connectors.http_poll import HttpPollConfig, HttpPollSource, IncrementalCursor, _gt
from patchbay.errors import ConfigError, TransientError
from patchbay.registry import connector

_TRIES = 5


class _PatientPoll(HttpPollSource):
    """The http source's pages, each asked again after a 429/5xx (Retry-After, else 1, 2, 4 ... s)."""

    async def _get(self, url: str, params: dict[str, Any]) -> tuple[Any, Any]:
        for attempt in range(_TRIES):
            try:
                return await super()._get(url, params)
            except TransientError as exc:
                if attempt == _TRIES - 1:
                    raise
                wait = exc.retry_after_s if exc.retry_after_s is not None else 2.0**attempt
                await asyncio.sleep(min(wait, 60.0))
        raise AssertionError("unreachable")


def _api_config(frm: BatchFrom, cursor_field: str | None) -> HttpPollConfig:
    raw = dict(frm.api or {})
    if cursor_field is not None and frm.api_since_param is not None:
        raw["cursor"] = IncrementalCursor(field=cursor_field, param=frm.api_since_param)
    raw.setdefault("id_field", None)
    try:
        cfg = HttpPollConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"batch.from.api.{where}: {first['msg'].removeprefix('Value error, ')}") from exc
    return cfg


def _minus(value: str, seconds: float) -> str:
    """A cursor value moved back by the lookback: ISO timestamps and numbers; anything else as it is."""
    if not seconds:
        return value
    try:
        return str(float(value) - seconds) if "." in value else str(int(value) - int(seconds))
    except ValueError:
        pass
    try:
        stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    out = (stamp - dt.timedelta(seconds=seconds)).isoformat()
    return out.replace("+00:00", "Z") if value.endswith("Z") else out


@connector("http", roles=("bulk",), config=BatchTo, system_config=HttpSystem)
class HttpBulk:
    """A paginated JSON API as the source of a batch sync (read only)."""

    def __init__(self, system: HttpSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self._owns_sessions = resources.http is None
        self.snapshot_max: str | None = None
        self._cursor_field: str | None = None
        self._lookback_s = 0.0
        self._before: list[dict[str, str]] = []
        self._since: str | None = None

    def for_batch(self, spec: Any) -> None:
        self._cursor_field = spec.cursor.column if spec.cursor is not None else None
        self._lookback_s = spec.cursor.lookback if spec.cursor is not None else 0.0

    @classmethod
    def check_batch(cls, system: Any, side: str, batch: Any) -> list[str]:
        if side == "to":
            return ["an http system is a batch source only (a paginated API); write to a database or files"]
        frm = batch.from_
        if frm.api is None:
            return ["an http system is read with `api:` (path, items_path, pagination ...), not table/query"]
        out = []
        try:
            _api_config(frm, None)
        except ConfigError as exc:
            out.append(exc.problems[0].message)
        if batch.cursor is not None and frm.api_since_param is None:
            out.append("a cursor on an API needs `api_since_param`: the parameter that sends the last value")
        if batch.deletes.detect == "keys":
            out.append("deletes.detect: keys needs a database source; an API is read page by page")
        return out

    def remember(self, state: SyncState) -> None:
        self._before = state.columns
        if self._cursor_field is not None and state.cursor is not None:
            self._since = _minus(state.cursor, self._lookback_s)

    async def close(self) -> None:
        if self._owns_sessions and self.resources.http is not None:
            await self.resources.http.close()

    def _source(self, frm: BatchFrom) -> _PatientPoll:
        return _PatientPoll(self.system, _api_config(frm, self._cursor_field), self.resources)

    async def columns(self, frm: BatchFrom) -> list[Column]:
        # The first page of what this run reads (the same since value): the records' fields are the columns.
        cfg = _api_config(frm, self._cursor_field)
        one = _PatientPoll(self.system, cfg.model_copy(update={"max_pages": 1}), self.resources)
        names: dict[str, Any] = {}
        async for page in one.poll(self._since):
            for rec in page.records:
                if isinstance(rec.data, dict):
                    for k, v in rec.data.items():
                        if names.get(k) is None:
                            names[k] = v
        if not names:
            if self._before:  # nothing there now: the columns the last run saw
                return [Column(c["name"], c["type"], "json") for c in self._before]
            raise ConfigError(
                "the API's first page has no records: there is nothing to learn the columns from"
            )
        return [Column(k, infer_type([v]), "json") for k, v in names.items()]

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        return self.snapshot_max

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        return None

    async def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        enc = [_py_field(c) for c in columns]
        known = {c.name for c in columns}
        best: Any = None
        since = _minus(str(window.start), window.lookback_s) if window.start is not None else None
        field = window.column
        page_no = 0
        async for page in self._source(frm).poll(since):
            page_no += 1
            rows: list[list[bytes]] = []
            rejected: list[Invalid] = []
            for i, rec in enumerate(page.records, 1):
                item = rec.data
                where = f"page {page_no}, record {i}"
                if not isinstance(item, dict):
                    rejected.append(Invalid({"value": item}, f"{where}: not a JSON object"))
                    continue
                extra = [k for k in item if k not in known]
                if extra:
                    rejected.append(
                        Invalid(item, f"{where}: field(s) {', '.join(extra[:5])} not among the columns")
                    )
                    continue
                bad = [c for c in columns if not _fits(item.get(c.name), c.type)]
                if bad:
                    rejected.append(
                        Invalid(item, f"{where}: " + "; ".join(f"{c.name} is not {c.type}" for c in bad[:5]))
                    )
                    continue
                if (
                    field is not None
                    and (v := item.get(field)) is not None
                    and (best is None or _gt(v, best))
                ):
                    best = v
                rows.append([e(item.get(c.name)) for e, c in zip(enc, columns, strict=True)])
            yield FileFrame(columns, rows, rejected)
        self.snapshot_max = None if best is None else str(best)
        if self.snapshot_max is None and window.start is not None:
            self.snapshot_max = str(window.start)

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        raise ConfigError("deletes.detect: keys needs a database source; an API is read page by page")

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        raise ConfigError("deletes.detect: keys needs a database source; an API is read page by page")

    async def table_columns(self, table: str) -> list[Column] | None:
        raise ConfigError("an http system is a batch source only (a paginated API)")

    async def row_count(self, table: str) -> int:
        raise ConfigError("an http system is a batch source only (a paginated API)")

    async def state(self, flow: str) -> SyncState | None:
        raise ConfigError("an http system is a batch source only (a paginated API)")

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> Any:
        raise ConfigError("an http system is a batch source only (a paginated API)")
