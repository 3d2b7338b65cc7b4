"""files: append records as lines to files in a folder, or read the CSV / JSON Lines files dropped in one.

As a destination: each record is a line appended to a file (JSON Lines or CSV), with rotation.

Durability: every append is flushed and fsync'ed before the delivery counts as done, and the folder
is fsync'ed when a file is created or rotated. Delivery is at-least-once: a crash between the
write and the hub recording it makes the retry append the line again; `include_key: true` writes
the idempotency key with each line (`_key`) so a reader can drop such duplicates.

Lines are appended in the order attempts finish; set `delivery: {max_concurrency: 1}` on the
destination to keep them in arrival order.

Errors: a full disk or quota (ENOSPC, EDQUOT), I/O errors and a missing parent folder (an
unmounted share) are retried; permission denied, a read-only file system, a file over the size
limit or a folder that is not a folder pause the destination until someone fixes it and resumes
(nothing is lost meanwhile); a file name that cannot exist (too long, names a folder) sends that
record to the dead letter.

As a source (consumed continuously: the folder is scanned every `scan_every_s`, no schedule): each
file matching `pattern` that has not changed for `min_age_s` is read once, oldest first, and its
records are committed in batches of `batch_size`. Only after the last batch is committed is the file
moved (renamed) into `done_folder`. Every record's id is `<file name>:<sha256 of the file, 16 hex>:
<line>`, so a file read again after a crash mid-way adds only the lines not yet committed, and an
identical copy of a processed file dropped under the same name adds nothing; a file with the same
name but other content (or the same content under another name) is new.

The file is the unit: if any line cannot be parsed (not JSON, not an object, a CSV row with the
wrong number of cells, bytes that are not text in the encoding), nothing of it is committed and it
is moved into `failed_folder` beside `<name>.error.txt`, which lists each bad line; fix the file and
drop it again whole (its content changed, so every line is new then: no line twice, none lost).
Records that parse but break the flow's rules are the flow's business (validate quarantines them).

Names starting with `.` or `~` and temporary names (`.tmp`, `.part`, `.partial`, `.crdownload`,
`.filepart`) are never read, whatever the pattern: writers should write under such a name and rename
when done. Symbolic links and sub-folders are not read. A drop that cannot be read or moved
(permissions) is logged and tried again a minute later or once it changes; one that changes after
some of its records were committed is moved to `failed_folder`, with that explained.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import errno
import fnmatch
import hashlib
import io
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator, model_validator

from patchbay.config.durations import Duration
from patchbay.config.models import DeliveryPolicy, Spec
from patchbay.connectors.base import (
    BaseSink,
    Batch,
    Emit,
    Outcome,
    OutcomeClass,
    Resources,
    SourceRecord,
    Stopwatch,
    excerpt,
)
from patchbay.errors import RecordInvalid, TransientError, Violation
from patchbay.expressions import render_template, to_text
from patchbay.records import dig
from patchbay.registry import connector

# --- system ---------------------------------------------------------------------------------------


class FilesSystem(Spec):
    folder: str = Field(
        description="The folder files are written in (destination) or dropped in (source); a relative path "
        "is relative to the project folder. It is created if missing (its parent must exist).",
        examples=["exports"],
    )


def _folder(system: FilesSystem, resources: Resources) -> Path:
    folder = Path(system.folder).expanduser()
    if folder.is_absolute():
        return folder
    return Path(resources.extra.get("root") or Path.cwd()) / folder


# --- destination ----------------------------------------------------------------------------------

_UNSAFE_IN_NAME = re.compile(r"[/\\\0]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class FilesSinkConfig(Spec):
    file: str = Field(
        description="File name inside the folder; may hold {{ expressions }}, e.g. "
        "`leads-{{ properties.lead_source }}.jsonl`. `/` in a value becomes `_`.",
        examples=["leads.jsonl"],
    )
    format: Literal["jsonl", "csv"] = Field(
        "jsonl", description="jsonl: one JSON object per line; csv: one row per record."
    )
    columns: list[str] = Field(
        default_factory=list,
        description="csv: the columns, as dotted paths into the record (e.g. properties.email); "
        "the header row is written at the top of each new file.",
    )
    include_key: bool = Field(
        False,
        description="Write the delivery's idempotency key with each line (`_key` field, or last csv column), "
        "so a reader can drop the duplicate a retry after a crash may leave.",
    )
    rotate_bytes: int | None = Field(
        None,
        ge=1024,
        description="Before a write would make the file larger than this, rename it to `name.1.ext` "
        "(then `name.2.ext`, ...: the highest number is the newest) and start a new one.",
    )
    rotate_daily: bool = Field(
        False,
        description="On the first write of a new day (UTC), rename the file to `name.YYYY-MM-DD.ext`, "
        "the day it was last written.",
    )
    escape_formulas: bool = Field(
        True,
        description="csv: put a ' before text starting with = + - @ so spreadsheets do not run it as a "
        "formula (record values are untrusted). Turn off when a program, not a person, reads the file.",
    )

    @field_validator("file")
    @classmethod
    def _name(cls, v: str) -> str:
        static = re.sub(r"\{\{.*?\}\}", "x", v)
        if _UNSAFE_IN_NAME.search(static) or static.strip() in ("", ".", ".."):
            raise ValueError(f"bad file name {v!r}: give a name inside the system's folder, without / or \\")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> FilesSinkConfig:
        if self.format == "csv" and not self.columns:
            raise ValueError(
                "format csv needs `columns`, e.g. columns: [properties.email, properties.firstname]"
            )
        if self.format == "jsonl" and self.columns:
            raise ValueError("`columns` is for format csv; for jsonl shape the record with a map step")
        return self


@connector("files", roles=("destination",), config=FilesSinkConfig, system_config=FilesSystem)
class FilesSink(BaseSink[FilesSystem, FilesSinkConfig]):
    """Append each record as a line to a file."""

    def __init__(
        self, system: FilesSystem, config: FilesSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        super().__init__(system, config, policy, resources)
        self.folder = _folder(system, resources)
        self._file = render_template(config.file)
        columns = [*config.columns, "_key"] if config.include_key else config.columns
        self._header = _csv_line(columns) if config.format == "csv" else ""
        self._checked: set[str] = set()  # csv files whose header was compared with ours

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        name = self._file.render(record, quote=lambda s: _UNSAFE_IN_NAME.sub("_", s)).strip()
        if name in ("", ".", ".."):
            raise RecordInvalid(
                [Violation("file", f"the file name is {name!r} for this record")], step="files"
            )
        if self.config.format == "jsonl":
            if self.config.include_key:
                rest = (
                    {k: v for k, v in record.items() if k != "_key"}
                    if isinstance(record, dict)
                    else {"value": record}
                )
                record = {"_key": key, **rest}
            line = orjson.dumps(record).decode() + "\n"
        else:
            cells = [self._cell(dig(record, path)) for path in self.config.columns]
            line = _csv_line([*cells, key] if self.config.include_key else cells)
        return {"file": name, "line": line}

    def _cell(self, value: Any) -> str:
        text = to_text(value)
        if self.config.escape_formulas and isinstance(value, str) and text.startswith(_FORMULA_START):
            return "'" + text
        return text

    # -- delivery half -----------------------------------------------------
    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        name = str(request.get("file", ""))
        if _UNSAFE_IN_NAME.search(name) or name in ("", ".", ".."):
            return Outcome(OutcomeClass.TERMINAL, error=f"writing a file: bad file name {name!r}")
        path = self.folder / name
        try:
            size = await asyncio.to_thread(self._append, path, str(request["line"]).encode())
        except OSError as exc:
            cls = classify_os_error(exc)
            hint = "; fix it, then resume the destination" if cls is OutcomeClass.AUTH else ""
            what = exc.strerror or str(exc)
            return Outcome(
                cls,
                None,
                sw.ms,
                error=f"writing {path}: {what} ({errno.errorcode.get(exc.errno or 0, '?')}){hint}",
            )
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, excerpt=f"appended to {name} ({size} bytes)")

    def _append(self, path: Path, data: bytes) -> int:
        """In a worker thread: rotate if due, append, flush and fsync. Returns the file's new size."""
        with _lock_for(path):
            if not self.folder.is_dir():
                if self.folder.exists():
                    raise NotADirectoryError(
                        errno.ENOTDIR, "the system's folder is not a folder", str(self.folder)
                    )
                self.folder.mkdir(exist_ok=True)
                _fsync_dir(self.folder.parent)
            rotated = self._rotate_if_due(path, len(data))
            with open(path, "ab") as f:
                created = f.tell() == 0
                if created and self._header:
                    f.write(self._header.encode())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            if created or rotated:
                _fsync_dir(self.folder)
            return size

    def _rotate_if_due(self, path: Path, incoming: int) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size == 0:
            return False
        cfg = self.config
        if self._header and str(path) not in self._checked:
            self._checked.add(str(path))
            with open(path, "rb") as f:
                first = f.readline()
            if first != self._header.encode():  # the columns changed: keep the old file whole
                path.rename(_free_name(path, None))
                return True
        if cfg.rotate_daily:
            day = datetime.fromtimestamp(st.st_mtime, UTC).date()
            if day != datetime.now(UTC).date():
                path.rename(_free_name(path, day.isoformat()))
                return True
        if cfg.rotate_bytes and st.st_size + incoming > cfg.rotate_bytes:
            path.rename(_free_name(path, None))
            return True
        return False


def classify_os_error(exc: OSError) -> OutcomeClass:
    """What a failed write means: retry (disk full), pause (permissions), or dead-letter (this name)."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.ENOTDIR):
        return OutcomeClass.AUTH
    if exc.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.EINVAL):
        return OutcomeClass.TERMINAL
    return OutcomeClass.TRANSIENT  # ENOSPC, EDQUOT, EIO, ENOENT (share gone), ESTALE, EMFILE, ...


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue()


def _free_name(path: Path, tag: str | None) -> Path:
    """`leads.jsonl` -> `leads.<tag>.jsonl`, or the next free `leads.<n>.jsonl` (highest: newest)."""
    stem, suffix = path.stem, path.suffix
    if tag is not None:
        candidate = path.with_name(f"{stem}.{tag}{suffix}")
        if not candidate.exists():
            return candidate
        stem = f"{stem}.{tag}"
    pattern = re.compile(re.escape(stem) + r"\.(\d+)" + re.escape(suffix) + "$")
    used = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{stem}.{max(used, default=0) + 1}{suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make a created or renamed directory entry durable (a no-op where a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    """One lock per file in this process: destinations sharing a file do not interleave or rotate twice."""
    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


# --- source ---------------------------------------------------------------------------------------

log = logging.getLogger("patchbay.connectors.files")

_BY_EXTENSION = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_IN_PROGRESS = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")
_MAX_LISTED = 100  # bad lines listed in an .error.txt; the count says how many more
_HOLD_S = 60.0  # a file that cannot be read or moved is tried again after this (or once it changes)


class CsvOptions(Spec):
    delimiter: str = Field(
        ",", min_length=1, max_length=1, description='The character between cells, e.g. ";" or "\\t" (tab).'
    )
    header: bool = Field(True, description="The first row names the columns: they become the record's keys.")
    columns: list[str] = Field(
        default_factory=list, description="With `header: false`: the column names, in order."
    )
    encoding: str = Field(
        "utf-8",
        description="The text encoding, e.g. utf-8, cp1252, latin-1, utf-16 "
        "(a UTF-8 byte order mark is skipped).",
    )

    @field_validator("encoding")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}, e.g. utf-8, cp1252, latin-1") from None
        return v

    @model_validator(mode="after")
    def _names(self) -> CsvOptions:
        if not self.header and not self.columns:
            raise ValueError("with header: false, give the column names: columns: [email, first_name, ...]")
        if self.header and self.columns:
            raise ValueError("`columns` is for files without a header row (header: false)")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("`columns` names a column twice")
        return self


class FilesSourceConfig(Spec):
    pattern: str = Field(
        "*.jsonl",
        description="Which file names in the folder to read (a glob, case-sensitive), e.g. `*.csv` or "
        "`orders-*.jsonl`. Give each flow reading one folder its own pattern.",
    )
    format: Literal["auto", "jsonl", "csv"] = Field(
        "auto",
        description="auto: by extension (.jsonl and .ndjson: JSON Lines; .csv: CSV); jsonl: one JSON object "
        "per line, UTF-8; csv: one record per row, every value a string.",
    )
    csv: CsvOptions = Field(default_factory=CsvOptions, description="How CSV files are read.")
    done_folder: str = Field(
        "done",
        description="Where a file is moved once all its records are committed; relative to the folder. "
        "A name already there gets a timestamp. Keep it on the same disk so the move is a rename.",
    )
    failed_folder: str = Field(
        "failed",
        description="Where a file with unreadable lines is moved, untouched and beside `<name>.error.txt` "
        "listing them; relative to the folder. None of its records are committed.",
    )
    min_age_s: Duration = Field(
        1.0,
        description="Leave a file alone until it has not changed for this long, so a half-written drop is "
        "not read. Better still, write under a temporary name (`.tmp`, `.part`) and rename when done.",
    )
    scan_every_s: Duration = Field(1.0, gt=0, description="How often the folder is looked at.")
    batch_size: int = Field(
        500, ge=1, le=10000, description="Records committed together; the file moves after the last batch."
    )

    @field_validator("pattern")
    @classmethod
    def _in_folder(cls, v: str) -> str:
        if not v.strip() or _UNSAFE_IN_NAME.search(v):
            raise ValueError(f"bad pattern {v!r}: match names inside the folder, without / or \\")
        return v

    @field_validator("done_folder", "failed_folder")
    @classmethod
    def _sub_folder(cls, v: str) -> str:
        if v.strip() in ("", "."):
            raise ValueError("give a folder other than the watched one, e.g. done")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> FilesSourceConfig:
        if os.path.normpath(self.done_folder) == os.path.normpath(self.failed_folder):
            raise ValueError("done_folder and failed_folder must differ")
        ext = os.path.splitext(self.pattern)[1].lower()
        if self.format == "auto" and ext and not any(c in ext for c in "*?[") and ext not in _BY_EXTENSION:
            raise ValueError(
                f"format auto knows .jsonl, .ndjson and .csv, not {ext}: set format: jsonl or csv"
            )
        return self


class _Skip(Exception):
    """Reading or moving a drop failed; `reason` None means it vanished (another reader took it)."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        super().__init__(reason or "vanished")


class _Changed(Exception):
    """The drop changed between looking at it and reading (or moving) it."""


Sig = tuple[int, int, int]
Row = tuple[int, dict[str, Any] | None, bytes | None, str | None]  # line, record, raw line, problem


@connector("files", roles=("source",), config=FilesSourceConfig, system_config=FilesSystem)
class FilesSource:
    """Read the CSV / JSON Lines files dropped in the folder: each once, then moved to done/."""

    mode = "stream"

    def __init__(self, system: FilesSystem, config: FilesSourceConfig, resources: Resources) -> None:
        self.system = system
        self.config = config
        self.resources = resources
        self.folder = _folder(system, resources)
        self.done = self.folder / Path(config.done_folder).expanduser()
        self.failed = self.folder / Path(config.failed_folder).expanduser()
        self._log_extra = {"flow": resources.extra.get("flow", "")}
        self._held: dict[str, tuple[tuple[int, int], float]] = {}  # name -> (size, mtime), until
        self._warned: set[str] = set()
        self.scans = 0  # scans done so far, each with the files it found ready read and moved

    async def stream(self, emit: Emit) -> None:
        """Scan, read each ready file and move it, sleep; until cancelled."""
        while True:
            for path in await asyncio.to_thread(self._ready):
                await self._take(path, emit)
            self.scans += 1
            await asyncio.sleep(self.config.scan_every_s)

    async def close(self) -> None:
        return None

    # -- one scan ----------------------------------------------------------
    def _ready(self) -> list[Path]:
        """In a worker thread: the matching files old enough to read, oldest first."""
        try:
            self.folder.mkdir(exist_ok=True)
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            raise TransientError(f"watching {self.folder}: {exc.strerror or exc}") from exc
        now = time.time()
        ready: list[tuple[float, str]] = []
        for entry in entries:
            name = entry.name
            if not fnmatch.fnmatchcase(name, self.config.pattern) or _in_progress(name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    # A link could point at any file the hub can read: never follow one.
                    if entry.is_symlink() and name not in self._warned:
                        self._warned.add(name)
                        log.warning(
                            "%s in %s is a symbolic link: not read", name, self.folder, extra=self._log_extra
                        )
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if now - st.st_mtime < self.config.min_age_s:
                continue  # maybe still being written
            held = self._held.get(name)
            if held is not None and held[0] == (st.st_size, st.st_mtime_ns) and now < held[1]:
                continue
            ready.append((st.st_mtime, name))
        return [self.folder / name for _, name in sorted(ready)]

    # -- one file ----------------------------------------------------------
    async def _take(self, path: Path, emit: Emit) -> None:
        name, n = path.name, 0
        fmt = _BY_EXTENSION.get(path.suffix.lower()) if self.config.format == "auto" else self.config.format
        try:
            if fmt is None:
                problem = f"format auto knows .jsonl, .ndjson and .csv, not {path.suffix!r}: set format"
                await self._io(self._fail, path, [problem], 1)
                log.warning("moved %s to %s: %s", name, self.failed, problem, extra=self._log_extra)
                return
            sig, digest, problems, total = await self._io(self._inspect, path, fmt)
            if problems:
                await self._io(self._fail, path, problems, total)
                log.warning(
                    "moved %s to %s: %d bad line(s), nothing committed; first: %s",
                    name,
                    self.failed,
                    total,
                    problems[0],
                    extra=self._log_extra,
                )
                return
            reader = self._records(path, fmt, f"{name}:{digest[:16]}", sig)
            try:
                while batch := await self._io(next, reader, []):
                    await emit(Batch(batch))  # returns once committed: only then read on
                    n += len(batch)
            finally:
                with suppress(ValueError):  # still running in its thread after a cancel: GC closes it
                    reader.close()
            await self._io(self._finish, path, sig)
            log.info("read %s: %d records; moved to %s", name, n, self.done, extra=self._log_extra)
        except _Changed:
            if n == 0:
                return  # not read yet: look again once it is old enough
            problem = (
                f"the file changed while it was read: the {n} records read from the earlier version were "
                "committed. Writers should write under a temporary name (.tmp) and rename when done"
            )
            with suppress(_Skip):
                await self._io(self._fail, path, [problem], 1)
            log.error("moved %s to %s: %s", name, self.failed, problem, extra=self._log_extra)
        except _Skip as skip:
            if skip.reason is None:
                log.info(
                    "%s went away before it was read whole; another reader took it?",
                    name,
                    extra=self._log_extra,
                )
                return
            with suppress(OSError):
                st = path.stat()
                self._held[name] = ((st.st_size, st.st_mtime_ns), time.time() + _HOLD_S)
            log.error(
                "reading %s: %s; trying again in %.0fs or when it changes",
                path,
                skip.reason,
                _HOLD_S,
                extra=self._log_extra,
            )

    async def _io(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError as exc:
            if exc.filename is not None and Path(exc.filename).parent != self.folder:
                raise _Skip(f"{exc.strerror} ({exc.filename})") from exc
            raise _Skip(None) from exc
        except OSError as exc:
            raise _Skip(f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, '?')})") from exc

    def _inspect(self, path: Path, fmt: str) -> tuple[Sig, str, list[str], int]:
        """In a worker thread: the file's signature and SHA-256, and its bad lines (listed up to a limit)."""
        with open(path, "rb") as f:
            sig = _sig(os.fstat(f.fileno()))
            digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            f.seek(0)
            problems: list[str] = []
            total = 0
            for line_no, _, raw, problem in self._rows(f, fmt):
                if problem is not None:
                    total += 1
                    if total <= _MAX_LISTED:
                        problems.append(
                            f"line {line_no}: {problem}" + (f"\n    {excerpt(raw, 200)}" if raw else "")
                        )
        return sig, digest.hexdigest(), problems, total

    def _records(
        self, path: Path, fmt: str, prefix: str, sig: Sig
    ) -> Generator[list[SourceRecord], None, None]:
        """Batches of records, read while the previous batch is committed; ids are `prefix:line`."""
        with open(path, "rb") as f:
            if _sig(os.fstat(f.fileno())) != sig:
                raise _Changed
            batch: list[SourceRecord] = []
            for line_no, data, raw, problem in self._rows(f, fmt):
                if data is None or problem is not None:
                    raise _Changed  # it parsed whole a moment ago
                batch.append(SourceRecord(data, id=f"{prefix}:{line_no}", raw=raw))
                if len(batch) >= self.config.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def _rows(self, f: Any, fmt: str) -> Iterator[Row]:
        return _jsonl_rows(f) if fmt == "jsonl" else _csv_rows(f, self.config.csv)

    def _finish(self, path: Path, sig: Sig) -> None:
        """In a worker thread: every record is committed; move the file to done/ unless it changed."""
        if _sig(path.stat()) != sig:
            raise _Changed
        self.done.mkdir(parents=True, exist_ok=True)
        _move(path, _free(self.done / path.name))

    def _fail(self, path: Path, problems: list[str], total: int) -> None:
        """In a worker thread: move the file, untouched, to failed/ beside an explanation."""
        self.failed.mkdir(parents=True, exist_ok=True)
        target = _free(self.failed / path.name)
        more = f"\n... and {total - len(problems)} more\n" if total > len(problems) else ""
        report = (
            f"patchbay could not read {path.name} (from {path.parent}, "
            f"{datetime.now(UTC).isoformat(timespec='seconds')}); none of its records were committed.\n"
            "Fix it and drop the whole file in the folder again.\n\n" + "\n".join(problems) + "\n" + more
        )
        with open(self.failed / f"{target.name}.error.txt", "w", encoding="utf-8") as f:
            f.write(report)
            f.flush()
            os.fsync(f.fileno())
        _move(path, target)


def _jsonl_rows(f: Any) -> Iterator[Row]:
    for line_no, line in enumerate(f, 1):
        if line_no == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield line_no, None, line, f"not JSON: {exc}"
            continue
        if not isinstance(data, dict):
            yield line_no, None, line, f"expected a JSON object, got {type(data).__name__}"
            continue
        yield line_no, data, line, None


class _NotText(Exception):
    pass


def _text_lines(f: Any, encoding: str) -> Iterator[str]:
    """Decode line by line (so a bad byte is blamed on its own line), keeping the line ends for csv."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"
    decoder = codecs.getincrementaldecoder(encoding)()
    pending = ""
    while True:
        chunk = f.readline(1 << 20)
        try:
            text = pending + decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise _NotText(f"not {encoding.removesuffix('-sig')} text: {exc.reason}") from exc
        if not chunk:
            if text:
                yield text
            return
        *lines, pending = text.split("\n")
        for line in lines:
            yield line + "\n"


def _csv_rows(f: Any, opts: CsvOptions) -> Iterator[Row]:
    reader = csv.reader(_text_lines(f, opts.encoding), delimiter=opts.delimiter, strict=True)
    columns: list[str] | None = None if opts.header else list(opts.columns)
    while True:
        line_no = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line_no, None, None, f"bad CSV: {exc}"
            continue
        except _NotText as exc:
            yield reader.line_num + 1, None, None, str(exc)
            return
        if not row:
            continue  # a blank line
        if columns is None:
            blank = [i + 1 for i, c in enumerate(row) if not c.strip()]
            dupes = sorted({c for c in row if row.count(c) > 1})
            if blank or dupes:
                what = f"column {blank[0]} has no name" if blank else f"column {dupes[0]!r} appears twice"
                yield line_no, None, opts.delimiter.join(row).encode(), f"bad header row: {what}"
                return
            columns = row
            continue
        if len(row) != len(columns):
            raw = opts.delimiter.join(row).encode()
            yield line_no, None, raw, f"{len(row)} cells, but there are {len(columns)} columns"
            continue
        yield line_no, dict(zip(columns, row, strict=True)), None, None


def _sig(st: os.stat_result) -> Sig:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _in_progress(name: str) -> bool:
    return name.startswith((".", "~")) or name.lower().endswith(_IN_PROGRESS)


def _free(target: Path) -> Path:
    """`target`, or `name.<UTC timestamp>.ext` (then `.1`, `.2`) when a file of that name is there."""
    if not target.exists():
        return target
    return _free_name(target, datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))


def _move(src: Path, dst: Path) -> None:
    """Rename, durably; copy then delete when `dst` is on another file system."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
        os.unlink(src)
    _fsync_dir(dst.parent)
    _fsync_dir(src.parent)
