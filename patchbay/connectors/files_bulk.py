"""files (bulk): CSV, JSON Lines and Parquet files as batch sources and destinations.

Source: the files of the system's folder that match `files` (a name or a glob; hidden and temporary
names are never read), oldest first, streamed in batches (memory stays bounded whatever their size).
The cursor is the set of files read, each with its size and modification time: a run reads the files
that are new or changed since, and the cursor moves only when the destination commits. CSV cells are
text (an empty cell is NULL); JSON Lines and Parquet keep their types. A line that cannot be parsed
(not JSON, the wrong number of cells, a field no column has) is quarantined with its file, line and
reason, and the rest go on.

Destination: each run writes one new file under a temporary (hidden) name, fsyncs it, records the
flow's sync state naming it (the commit point), then renames it into place: full replaces
`<table>.<ext>`, append adds `<table>-<time>-<run>.<ext>`. A crash before the state is written leaves
no file; after, the rename is completed when the state is next read. The state lives in the folder's
`.patchbay-sync/` (hidden from the sources).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import fnmatch
import importlib.util
import io
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from patchbay.batch.frame import DECODE, NULL, Column, Frame, encode, escape, infer_type, unescape
from patchbay.batch.transform import Invalid
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.connectors.base import Resources, import_driver
from patchbay.connectors.bulk_client import Applied, SyncState, Window
from patchbay.connectors.files import FilesSystem, _folder
from patchbay.errors import ConfigError
from patchbay.registry import connector, install_hint

_EXT = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_EXT_OF = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}
_IN_PROGRESS = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")
_STATE_DIR = ".patchbay-sync"
_SCAN_LINES = 10_000  # JSON Lines: lines of the first file read to learn the columns and their types


@dataclass
class FileFrame(Frame):
    """A frame and the rows of it a reader could not parse (quarantined by the run with their reasons)."""

    rejected: list[Invalid] = field(default_factory=list)


def _format(frm_format: str | None, name: str) -> str:
    if frm_format is not None:
        return frm_format
    fmt = _EXT.get(Path(name).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{name}: cannot tell the format from the name; set `format: csv|jsonl|parquet`")
    return fmt


def _pq() -> Any:
    return import_driver("pyarrow.parquet", package="pyarrow", extra="parquet", kind="files (parquet)")


def _sig(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _arrow_type(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytes"
    if pa.types.is_nested(t):
        return "json"
    return "text"


def _py_field(c: Column) -> Callable[[Any], bytes]:
    """A Python value read from JSON or Parquet as a COPY field of column `c`."""
    if c.type in ("timestamptz", "timestamp"):

        def ts(v: Any) -> bytes:
            if v is None:
                return NULL
            if isinstance(v, dt.datetime):
                text = v.isoformat(sep=" ")
                return (text[:-6] + "+00").encode() if text.endswith("+00:00") else text.encode()
            return encode(v)

        return ts
    if c.type == "bytes":
        return lambda v: NULL if v is None else escape("\\x" + bytes(v).hex())
    return encode


def _fits(v: Any, type_: str) -> bool:
    """Does a JSON value belong in a column of this (inferred) type."""
    if v is None:
        return True
    if type_ == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if type_ == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if type_ == "bool":
        return isinstance(v, bool)
    if type_ == "json":
        return isinstance(v, dict | list)
    return not isinstance(v, dict | list)


@connector("files", roles=("bulk",), config=BatchTo, system_config=FilesSystem)
class FilesBulk:
    """CSV, JSON Lines and Parquet files in a folder as batch sources (new files each run) and destinations."""

    keeps_cursor = True  # the engine hands back the last committed cursor (the files read) as Window.start

    def __init__(self, system: FilesSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self.snapshot_max: str | None = None
        self._format = "csv"

    def for_batch(self, spec: Any) -> None:
        """The batch block's settings for this side: the format of the files written."""
        self._format = spec.to.format or "csv"

    @classmethod
    def check_batch(cls, system: Any, side: str, batch: Any) -> list[str]:
        """`check`'s problems for a batch flow that reads or writes this files system."""
        out: list[str] = []
        if side == "from":
            frm = batch.from_
            if frm.files is None:
                out.append(
                    "a files system is read with `files:` (a name or glob in its folder), not table/query"
                )
            else:
                try:
                    fmt = _format(frm.format, frm.files)
                except ConfigError as exc:
                    out.append(str(exc.problems[0].message))
                    fmt = None
                if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
                    out.append(f"reading Parquet needs pyarrow: {install_hint('parquet')}")
            if batch.deletes.detect == "keys":
                out.append("deletes.detect: keys needs a database source; files are read as they come")
        else:
            if batch.mode == "merge":
                out.append("a files destination takes mode full or append (files are written, not updated)")
            if batch.deletes.detect != "none":
                out.append("a files destination cannot delete rows: drop `deletes`")
            if batch.to.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
                out.append(f"writing Parquet needs pyarrow: {install_hint('parquet')}")
        return out

    def folder(self) -> Path:
        return _folder(self.system, self.resources)

    async def close(self) -> None:
        return None

    # ---------------------------------------------------------------- reading
    def _matching(self, frm: BatchFrom) -> list[tuple[Path, os.stat_result]]:
        folder = self.folder()
        if not folder.is_dir():
            raise FileNotFoundError(f"the folder {folder} does not exist (system {self.resources.system})")
        pattern = frm.files or ""
        out = []
        for entry in os.scandir(folder):
            name = entry.name
            if (
                name.startswith((".", "~"))
                or name.endswith(_IN_PROGRESS)
                or not entry.is_file(follow_symlinks=False)
            ):
                continue
            if fnmatch.fnmatchcase(name, pattern):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False)))
        out.sort(key=lambda p: (p[1].st_mtime_ns, p[0].name))
        return out

    def _pending(
        self, frm: BatchFrom, window: Window
    ) -> tuple[list[tuple[Path, os.stat_result]], dict[str, str]]:
        seen: dict[str, str] = orjson.loads(window.start) if window.start else {}
        files = self._matching(frm)
        return [(p, st) for p, st in files if seen.get(p.name) != _sig(st)], seen

    async def columns(self, frm: BatchFrom) -> list[Column]:
        return await asyncio.to_thread(self._columns, frm)

    def _columns(self, frm: BatchFrom) -> list[Column]:
        files = self._matching(frm)
        if not files:
            raise FileNotFoundError(f"no file in {self.folder()} matches {frm.files}")
        # The columns of the newest file: what this run and the next ones are compared with.
        path = files[-1][0]
        fmt = _format(frm.format, path.name)
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), None)
            if not header:
                raise ValueError(f"{path.name}: no header line")
            return [Column(h, "text", "csv") for h in header]
        if fmt == "parquet":
            schema = _pq().read_schema(path)
            return [Column(f.name, _arrow_type(f.type), str(f.type)) for f in schema]
        names: dict[str, list[Any]] = {}
        with open(path, "rb") as fh:
            for i, line in enumerate(fh):
                if i >= _SCAN_LINES:
                    break
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    for k, v in obj.items():
                        seen = names.setdefault(k, [])
                        if v is not None and len(seen) < 1:
                            seen.append(v)
        if not names:
            raise ValueError(f"{path.name}: no JSON object in its first {_SCAN_LINES} lines")
        return [Column(k, infer_type(v), "json") for k, v in names.items()]

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        return self.snapshot_max

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        return None  # unknown until read (no ETA); files are not scanned twice

    async def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        pending, seen = await asyncio.to_thread(self._pending, frm, window)
        names = {p.name for p, _ in await asyncio.to_thread(self._matching, frm)}
        done = {n: s for n, s in seen.items() if n in names}  # files gone from the folder are forgotten
        for path, st in pending:
            it = self._file_frames(path, _format(frm.format, path.name), columns, batch_rows)
            while True:
                frame = await asyncio.to_thread(next, it, None)
                if frame is None:
                    break
                yield frame
            now = path.stat()
            if _sig(now) != _sig(st):
                raise RuntimeError(f"{path.name} changed while it was read; the next run reads it again")
            done[path.name] = _sig(st)
        self.snapshot_max = orjson.dumps(done, option=orjson.OPT_SORT_KEYS).decode()

    def _file_frames(
        self, path: Path, fmt: str, columns: list[Column], batch_rows: int
    ) -> Iterator[FileFrame]:
        rows: list[list[bytes]] = []
        rejected: list[Invalid] = []
        source = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[fmt]
        for row in source(path, columns, batch_rows):
            if isinstance(row, Invalid):
                rejected.append(row)
            else:
                rows.append(row)
            if len(rows) + len(rejected) >= batch_rows:
                yield FileFrame(columns, rows, rejected)
                rows, rejected = [], []
        if rows or rejected:
            yield FileFrame(columns, rows, rejected)

    def _csv_rows(
        self, path: Path, columns: list[Column], batch_rows: int
    ) -> Iterator[list[bytes] | Invalid]:
        want = [c.name for c in columns]
        with open(path, newline="", encoding="utf-8-sig", errors="strict") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader, None) or []
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"{path.name}: the header cannot be read: {exc}") from exc
            if header != want:
                raise ValueError(
                    f"{path.name}: its columns ({', '.join(header)}) are not the source's ({', '.join(want)});"
                    " files read in one run must share one header"
                )
            n = len(want)
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    yield Invalid(
                        {"_file": path.name, "_line": reader.line_num},
                        f"{path.name}:{reader.line_num}: {exc}",
                    )
                    continue
                if len(cells) != n:
                    if not cells:
                        continue  # a blank line
                    yield Invalid(
                        {"_file": path.name, "_line": reader.line_num, "cells": cells[:50]},
                        f"{path.name}:{reader.line_num}: {len(cells)} cells, the header has {n}",
                    )
                    continue
                yield [escape(v) if v != "" else NULL for v in cells]

    def _jsonl_rows(
        self, path: Path, columns: list[Column], batch_rows: int
    ) -> Iterator[list[bytes] | Invalid]:
        enc = [_py_field(c) for c in columns]
        known = {c.name for c in columns}
        with open(path, "rb") as fh:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = {"_file": path.name, "_line": no}
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield Invalid(
                        {**where, "text": line[:500].decode("utf-8", "replace")},
                        f"{path.name}:{no}: not JSON: {exc}",
                    )
                    continue
                if not isinstance(obj, dict):
                    yield Invalid({**where, "value": obj}, f"{path.name}:{no}: not a JSON object")
                    continue
                extra = [k for k in obj if k not in known]
                if extra:
                    yield Invalid(
                        obj, f"{path.name}:{no}: field(s) {', '.join(extra[:5])} not among the columns"
                    )
                    continue
                bad = [c for c in columns if not _fits(obj.get(c.name), c.type)]
                if bad:
                    yield Invalid(
                        obj, f"{path.name}:{no}: " + "; ".join(f"{c.name} is not {c.type}" for c in bad[:5])
                    )
                    continue
                yield [e(obj.get(c.name)) for e, c in zip(enc, columns, strict=True)]

    def _parquet_rows(
        self, path: Path, columns: list[Column], batch_rows: int
    ) -> Iterator[list[bytes] | Invalid]:
        pf = _pq().ParquetFile(path)
        have = [f.name for f in pf.schema_arrow]
        want = [c.name for c in columns]
        if have != want:
            raise ValueError(
                f"{path.name}: its columns ({', '.join(have)}) are not the source's ({', '.join(want)})"
            )
        enc = [_py_field(c) for c in columns]
        for batch in pf.iter_batches(batch_size=batch_rows):
            cols = [[e(v) for v in batch.column(j).to_pylist()] for j, e in enumerate(enc)]
            yield from (list(r) for r in zip(*cols, strict=True))

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        raise ConfigError("deletes.detect: keys needs a database on both sides; files are read as they come")

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        raise ConfigError("deletes.detect: keys needs a database on both sides; files are read as they come")

    # ---------------------------------------------------------------- writing
    async def table_columns(self, table: str) -> list[Column] | None:
        return None  # every run writes a new file with the run's columns

    async def row_count(self, table: str) -> int:
        return 0

    def _state_path(self, flow: str) -> Path:
        return self.folder() / _STATE_DIR / f"{flow}.json"

    async def state(self, flow: str) -> SyncState | None:
        return await asyncio.to_thread(self._state, flow)

    def _state(self, flow: str) -> SyncState | None:
        path = self._state_path(flow)
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        pending = data.get("pending")
        if pending:  # committed, but the rename into place did not happen: finish it
            tmp, final = self.folder() / pending["temp"], self.folder() / pending["file"]
            if tmp.exists():
                os.replace(tmp, final)
                _fsync_dir(self.folder())
        return SyncState(data.get("cursor"), list(data.get("columns") or []), int(data.get("runs") or 0))

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> _FileLoad:
        if mode == "merge":
            raise ConfigError(
                "a files destination takes mode full or append (files are written, not updated)"
            )
        folder = self.folder()
        if not folder.is_dir():
            await asyncio.to_thread(folder.mkdir)
        for stale in [*folder.glob(f".{table}.*.tmp"), *folder.glob(f".{table}-*.tmp")]:
            stale.unlink(missing_ok=True)  # a run killed before its commit point (runs never overlap)
        return await asyncio.to_thread(_FileLoad, self, flow, table, columns, mode, self._format)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileLoad:
    """One run's file, written under a hidden temporary name until commit()."""

    def __init__(
        self, owner: FilesBulk, flow: str, table: str, columns: list[Column], mode: str, fmt: str
    ) -> None:
        self.owner, self.flow, self.columns, self.fmt, self.mode = owner, flow, columns, fmt, mode
        folder = owner.folder()
        ext = _EXT_OF[fmt]
        if mode == "full":
            self.final = f"{table}.{ext}"
        else:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self.final = f"{table}-{stamp}-{uuid.uuid4().hex[:8]}.{ext}"
        self.temp = f".{self.final}.{uuid.uuid4().hex[:6]}.tmp"
        self.path = folder / self.temp
        self.copied = 0
        self._writer: Any = None
        self._fh: Any = open(self.path, "xb")
        if fmt == "csv":
            self._text = io.TextIOWrapper(self._fh, encoding="utf-8", newline="")
            self._csv = csv.writer(self._text)
            self._csv.writerow([c.name for c in columns])

    async def write(self, rows: list[list[bytes]]) -> None:
        if rows:
            await asyncio.to_thread(self._write, rows)
            self.copied += len(rows)

    def _write(self, rows: list[list[bytes]]) -> None:
        if self.fmt == "csv":
            self._csv.writerows([["" if f == NULL else unescape(f) for f in r] for r in rows])
        elif self.fmt == "jsonl":
            names = [c.name for c in self.columns]
            decs = [DECODE[c.type] for c in self.columns]
            out = []
            for r in rows:
                obj = {}
                for n, d, f in zip(names, decs, r, strict=True):
                    text = None if f == NULL else (f.decode() if b"\\" not in f else unescape(f))
                    obj[n] = None if text is None else d(text)
                out.append(orjson.dumps(obj))
            self._fh.write(b"\n".join(out) + b"\n")
        else:
            table = _arrow_table(self.columns, rows)
            if self._writer is None:
                self._writer = _pq().ParquetWriter(self._fh, table.schema)
            self._writer.write_table(table)

    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None:
        if keys:
            raise ConfigError("a files destination cannot delete rows: drop `deletes`")

    async def commit(self, state: SyncState) -> Applied:
        await asyncio.to_thread(self._commit, state)
        return Applied(inserted=self.copied)

    def _commit(self, state: SyncState) -> None:
        folder = self.owner.folder()
        if self.fmt == "csv":
            self._text.flush()
        elif self.fmt == "parquet":
            if self._writer is None:
                self._writer = _pq().ParquetWriter(self._fh, _arrow_table(self.columns, []).schema)
            self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        empty = self.mode == "append" and self.copied == 0  # nothing new: no empty file, only the state
        if empty:
            self.path.unlink()
        # The state names the file before it is in place: that write is the commit point.
        state_dir = folder / _STATE_DIR
        state_dir.mkdir(exist_ok=True)
        body = {
            "cursor": state.cursor,
            "columns": state.columns,
            "runs": state.runs,
            "pending": None if empty else {"temp": self.temp, "file": self.final},
        }
        tmp = state_dir / f".{self.flow}.json.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(body))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state_dir / f"{self.flow}.json")
        _fsync_dir(state_dir)
        if not empty:
            os.replace(self.path, folder / self.final)
            _fsync_dir(folder)

    async def abort(self) -> None:
        def drop() -> None:
            try:
                if not self._fh.closed:
                    self._fh.close()
            finally:
                self.path.unlink(missing_ok=True)

        await asyncio.to_thread(drop)


def _arrow_table(columns: list[Column], rows: list[list[bytes]]) -> Any:
    import pyarrow as pa

    types = {
        "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "timestamptz": pa.timestamp("us", tz="UTC"),
        "timestamp": pa.timestamp("us"), "date": pa.date32(), "bytes": pa.binary(),
    }  # fmt: skip
    arrays = []
    for j, c in enumerate(columns):
        texts = [
            None if (f := r[j]) == NULL else (f.decode() if b"\\" not in f else unescape(f)) for r in rows
        ]
        t = types.get(c.type, pa.string())
        if c.type in ("timestamptz", "timestamp"):
            values: list[Any] = [None if v is None else dt.datetime.fromisoformat(v) for v in texts]
        elif c.type == "date":
            values = [None if v is None else dt.date.fromisoformat(v) for v in texts]
        elif c.type == "bytes":
            values = [
                None if v is None else bytes.fromhex(v[2:]) if v.startswith("\\x") else v.encode()
                for v in texts
            ]
        elif c.type in types:
            conv = DECODE[c.type]
            values = [None if v is None else conv(v) for v in texts]
        else:
            values = texts
        arrays.append(pa.array(values, type=t))
    return pa.Table.from_arrays(arrays, names=[c.name for c in columns])
