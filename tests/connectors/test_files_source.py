"""files as a source: drops in a real folder read once, committed in batches, moved to done/ or failed/."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.config.project import load_or_raise
from patchbay.connectors.base import Batch, Resources
from patchbay.connectors.files import FilesSource, FilesSourceConfig, FilesSystem
from patchbay.engine.hub import Hub
from tests.conftest import eventually, resolver, write_project


async def scans_more(hub: Any, n: int) -> None:
    """Wait until each files source of the hub has scanned its folder `n` more times."""
    sources = [fr.source for fr in hub.hub.flows.values() if hasattr(fr.source, "scans")]
    start = [src.scans for src in sources]
    await eventually(
        lambda: all(src.scans >= s + n for src, s in zip(sources, start, strict=True)), what=f"{n} more scans"
    )


def make(folder: Path, **cfg: Any) -> FilesSource:
    config = FilesSourceConfig.model_validate({"min_age_s": 0, "scan_every_s": 0.01, **cfg})
    return FilesSource(FilesSystem(folder=str(folder)), config, Resources())


class Engine:
    """Stands in for the hub: keeps the first record of each id, as the store's dedupe does."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.batches: list[Batch] = []

    async def emit(self, batch: Batch) -> None:
        self.batches.append(batch)
        for r in batch.records:
            assert r.id is not None
            self.records.setdefault(r.id, r.data)


async def run(
    src: FilesSource, emit: Callable[[Batch], Any], until: Callable[[], bool], timeout: float = 5.0
) -> None:
    """Run the source's stream until `until()` holds; a stream that fails raises here."""
    task = asyncio.create_task(src.stream(emit))
    deadline = time.monotonic() + timeout
    try:
        while not until():
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the source")
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def age(path: Path, seconds: float = 60) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# ----------------------------------------------------------------------------- end to end
def drops_project(root: Path, sink_url: str, **source: Any) -> Path:
    def flow(pattern: str) -> dict[str, Any]:
        return {
            "purpose": "dropped rows reach reporting",
            "owner": "ops",
            "trigger": {
                "source": {
                    "system": "drops",
                    "pattern": pattern,
                    "min_age_s": 0,
                    "scan_every_s": 0.05,
                    **source,
                }
            },
            "destinations": [{"name": "report", "system": "reporting", "path": "/rows"}],
        }

    return write_project(
        root,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(
                {
                    "drops": {"kind": "files", "owner": "ops", "folder": "inbox"},
                    "reporting": {
                        "kind": "http",
                        "owner": "finance",
                        "url": sink_url,
                        "allow_private_network": True,
                    },
                }
            ),
            "flows/jsonl-drops.yaml": yaml.safe_dump(flow("*.jsonl")),
            "flows/csv-drops.yaml": yaml.safe_dump(flow("*.csv")),
        },
    )


async def test_jsonl_and_csv_drops_reach_the_destination_and_move_to_done(tmp_path, sink, start_hub):
    root = drops_project(tmp_path, sink.url)
    inbox = root / "inbox"
    inbox.mkdir()
    (inbox / "orders.jsonl").write_bytes(jsonl([{"order": 1, "total": 10.5}, {"order": 2, "total": 20}]))
    csv_text = b'email,name\r\nada@example.com,"Lovelace, Ada"\r\nbob@example.com,Bob\r\n'
    (inbox / "leads.csv").write_bytes(csv_text)
    (inbox / "later.jsonl.tmp").write_bytes(jsonl([{"order": 99}]))  # still being written under a temp name
    hub = await start_hub(root)

    await sink.wait_for(4)
    bodies = sorted((r.body for r in sink.received), key=lambda b: sorted(b.items()))
    assert bodies == [
        {"email": "ada@example.com", "name": "Lovelace, Ada"},  # csv values are strings
        {"email": "bob@example.com", "name": "Bob"},
        {"order": 1, "total": 10.5},
        {"order": 2, "total": 20},
    ]
    await eventually(lambda: names(inbox / "done") == ["leads.csv", "orders.jsonl"], what="moved to done")
    assert names(inbox) == ["done", "later.jsonl.tmp"]

    # A new file with a used name is new; an identical copy of a processed file adds nothing.
    (inbox / "later.jsonl.tmp").rename(inbox / "orders.jsonl")
    await sink.wait_for(5)
    assert sink.received[-1].body == {"order": 99}
    await eventually(lambda: len(names(inbox / "done")) == 3, what="the second orders.jsonl moved")
    (inbox / "copy.tmp").write_bytes((inbox / "done" / "orders.jsonl").read_bytes())
    (inbox / "copy.tmp").rename(inbox / "orders.jsonl")  # written under a temporary name, then renamed
    await eventually(lambda: len(names(inbox / "done")) == 4, what="the copy moved")
    await scans_more(hub, 2)  # and nothing else comes of it
    assert len(sink.received) == 5
    assert await hub.count() == 5
    done = names(inbox / "done")
    stamped = [n for n in done if n not in ("leads.csv", "orders.jsonl")]
    assert len(stamped) == 2 and all(n.startswith("orders.2") and n.endswith(".jsonl") for n in stamped)


async def test_crash_after_a_commit_mid_file_delivers_every_line_once(tmp_path, sink, start_hub):
    root = drops_project(tmp_path, sink.url, batch_size=3)
    inbox = root / "inbox"
    inbox.mkdir()
    (inbox / "big.jsonl").write_bytes(jsonl([{"n": n} for n in range(20)]))

    # First life: the second batch is committed, then the process dies before the source hears back.
    hub = Hub(load_or_raise(root), resolver=resolver())
    real = hub.ingest_batch
    calls: list[int] = []
    crashed = asyncio.Event()

    async def ingest_then_die(flow: str, batch: Batch, meta: Any = None) -> Any:
        calls.append(len(batch.records))
        accepted = await real(flow, batch, meta)
        if len(calls) == 2:
            crashed.set()
            await asyncio.Event().wait()  # never answers: the stop below cancels it
        return accepted

    hub.ingest_batch = ingest_then_die  # type: ignore[method-assign,assignment]
    await hub.start()
    try:
        await asyncio.wait_for(crashed.wait(), 10)
    finally:
        await hub.stop()
    assert names(inbox) == ["big.jsonl"]  # not moved: it was not read to the end

    # Second life: the file is read again from the top; the six committed lines are recognised.
    restarted = await start_hub(root)
    await eventually(lambda: names(inbox / "done") == ["big.jsonl"], what="moved to done")
    await sink.wait_for(20)
    await scans_more(restarted, 2)  # and nothing else comes
    assert await restarted.count() == 20
    assert len(sink.keys) == 20  # one delivery per line: nothing twice
    assert sorted({r.body["n"] for r in sink.received}) == list(range(20))


# ----------------------------------------------------------------------------- the source on its own
async def test_a_file_is_left_alone_until_it_is_old_enough(tmp_path):
    src, engine = make(tmp_path, min_age_s=30), Engine()
    drop = tmp_path / "a.jsonl"
    drop.write_bytes(jsonl([{"a": 1}]))
    task = asyncio.create_task(src.stream(engine.emit))
    try:
        await eventually(lambda: src.scans >= 2, what="two scans")
        assert engine.batches == [] and names(tmp_path) == ["a.jsonl"]
        age(drop)  # the writer finished half a minute ago
        await eventually(lambda: names(tmp_path / "done") == ["a.jsonl"], what="read once old enough")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert list(engine.records.values()) == [{"a": 1}]


async def test_temporary_hidden_and_linked_names_are_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text('{"password": "hunter2"}\n')
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.tmp", "b.part", "c.partial", ".d", "~e", "f.crdownload"):
        (inbox / name).write_bytes(jsonl([{"skip": name}]))
    (inbox / "link.data").symlink_to(secret)
    (inbox / "real.data").write_bytes(jsonl([{"keep": 1}]))
    src, engine = make(inbox, pattern="*", format="jsonl"), Engine()
    await run(src, engine.emit, lambda: (inbox / "done" / "real.data").exists() and src.scans >= 2)
    assert list(engine.records.values()) == [{"keep": 1}]
    assert "link.data" in names(inbox)


async def test_records_carry_file_hash_and_line_ids_and_come_in_batches(tmp_path):
    import hashlib

    body = jsonl([{"n": n} for n in range(5)]).replace(b'{"n":2}\n', b'{"n":2}\n\n   \n')  # blanks skipped
    (tmp_path / "x.ndjson").write_bytes(body)
    src, engine = make(tmp_path, pattern="*.ndjson", batch_size=2), Engine()
    await run(src, engine.emit, lambda: (tmp_path / "done" / "x.ndjson").exists())
    digest = hashlib.sha256(body).hexdigest()[:16]
    assert [len(b.records) for b in engine.batches] == [2, 2, 1]
    assert list(engine.records) == [f"x.ndjson:{digest}:{n}" for n in (1, 2, 3, 6, 7)]  # physical lines
    assert engine.batches[0].records[1].raw == b'{"n":1}'


async def test_a_failure_after_a_commit_rereads_without_duplicates(tmp_path):
    drop = tmp_path / "big.jsonl"
    drop.write_bytes(jsonl([{"n": n} for n in range(10)]))
    engine, seen = Engine(), 0

    async def commit_then_fail(batch: Batch) -> None:
        nonlocal seen
        await engine.emit(batch)  # committed...
        seen += 1
        if seen == 2:
            raise ConnectionError("store went away")  # ...but the source never hears so

    src = make(tmp_path, batch_size=4)
    with pytest.raises(ConnectionError):
        await run(src, commit_then_fail, lambda: False)
    assert names(tmp_path) == ["big.jsonl"] and len(engine.records) == 8

    await run(make(tmp_path, batch_size=4), engine.emit, lambda: (tmp_path / "done" / "big.jsonl").exists())
    assert [d["n"] for d in engine.records.values()] == list(range(10))  # each line once, in order
    assert sum(len(b.records) for b in engine.batches) == 18  # 8 re-read; the store drops those by id


async def test_a_file_with_bad_lines_moves_to_failed_with_a_report_and_nothing_is_committed(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"ok": 1}\n{"ok": 2, oops}\n[1, 2]\n{"ok": 4}\n{"ok": 5')
    src, engine = make(tmp_path), Engine()
    await run(src, engine.emit, lambda: (tmp_path / "failed" / "bad.jsonl").exists())
    assert engine.batches == []
    report = (tmp_path / "failed" / "bad.jsonl.error.txt").read_text()
    assert "none of its records were committed" in report
    assert "line 2: not JSON" in report and '{"ok": 2, oops}' in report
    assert "line 3: expected a JSON object, got list" in report
    assert "line 5: not JSON" in report  # a last line cut short
    assert "line 1:" not in report and "line 4:" not in report
    assert (tmp_path / "failed" / "bad.jsonl").read_bytes().startswith(b'{"ok": 1}')  # untouched

    # Fixed and dropped again whole: every line is new (the content changed), none twice.
    (tmp_path / "bad.jsonl").write_bytes(jsonl([{"ok": n} for n in range(1, 6)]))
    await run(src, engine.emit, lambda: (tmp_path / "done" / "bad.jsonl").exists())
    assert [d["ok"] for d in engine.records.values()] == [1, 2, 3, 4, 5]


async def test_csv_problems_are_reported_by_line(tmp_path):
    (tmp_path / "rows.csv").write_bytes(
        b'a,b\r\n1,2\r\n3,4,5\r\n"multi\r\nline",6\r\n7\r\n8,\xff\r\n9,10\r\n'
    )
    (tmp_path / "header.csv").write_bytes(b"a,,a\r\n1,2,3\r\n")
    src, engine = make(tmp_path, pattern="*.csv"), Engine()
    await run(src, engine.emit, lambda: len(names(tmp_path / "failed")) == 4)
    report = (tmp_path / "failed" / "rows.csv.error.txt").read_text()
    assert "line 3: 3 cells, but there are 2 columns" in report
    assert "line 6: 1 cells" in report  # counted from the row's first line, after a quoted newline
    assert "line 7: not utf-8 text" in report
    assert "line 9" not in report  # reading stops at bytes that are not text
    header_report = (tmp_path / "failed" / "header.csv.error.txt").read_text()
    assert "line 1: bad header row: column 2 has no name" in header_report
    assert engine.batches == []


async def test_csv_options_and_encodings(tmp_path):
    (tmp_path / "excel.csv").write_bytes("\ufeffemail;name\r\nzoë@example.com;Zoë\r\n".encode())
    (tmp_path / "legacy.txt").write_bytes('1\tCafé\n2\t"a\ttab"\n'.encode("cp1252"))
    engine = Engine()
    await run(
        make(tmp_path, pattern="*.csv", csv={"delimiter": ";"}),
        engine.emit,
        lambda: (tmp_path / "done" / "excel.csv").exists(),
    )
    await run(
        make(
            tmp_path,
            pattern="*.txt",
            format="csv",
            csv={"delimiter": "\t", "header": False, "columns": ["id", "name"], "encoding": "cp1252"},
        ),
        engine.emit,
        lambda: (tmp_path / "done" / "legacy.txt").exists(),
    )
    assert list(engine.records.values()) == [
        {"email": "zoë@example.com", "name": "Zoë"},  # the byte order mark is not part of "email"
        {"id": "1", "name": "Café"},
        {"id": "2", "name": "a\ttab"},
    ]


async def test_empty_file_moves_to_done_and_a_used_name_gets_a_timestamp(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "empty.jsonl").write_bytes(b"old")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    src, engine = make(tmp_path), Engine()
    await run(src, engine.emit, lambda: len(names(tmp_path / "done")) == 2)
    assert engine.batches == []
    moved = [n for n in names(tmp_path / "done") if n != "empty.jsonl"]
    assert len(moved) == 1 and moved[0].startswith("empty.2") and moved[0].endswith("Z.jsonl")


async def test_unknown_extension_with_format_auto_goes_to_failed(tmp_path):
    (tmp_path / "data.txt").write_bytes(jsonl([{"a": 1}]))
    await run(make(tmp_path, pattern="*"), Engine().emit, lambda: (tmp_path / "failed" / "data.txt").exists())
    assert "set format" in (tmp_path / "failed" / "data.txt.error.txt").read_text()


async def test_done_folder_can_be_absolute(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl([{"a": 1}]))
    await run(
        make(tmp_path / "in", done_folder=str(tmp_path / "archive")),
        Engine().emit,
        lambda: (tmp_path / "archive" / "a.jsonl").exists(),
    )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"pattern": "sub/*.csv"}, "bad pattern"),
        ({"pattern": "*.txt"}, "format auto knows .jsonl, .ndjson and .csv, not .txt"),
        ({"done_folder": "."}, "other than the watched one"),
        ({"done_folder": "x", "failed_folder": "x/"}, "must differ"),
        ({"csv": {"header": False}}, "give the column names"),
        ({"csv": {"columns": ["a"]}}, "without a header row"),
        ({"csv": {"delimiter": ";;"}}, "at most 1 character"),
        ({"csv": {"encoding": "klingon"}}, "unknown encoding"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"scan_every_s": 0}, "greater than 0"),
    ],
)
def test_config_mistakes_are_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        FilesSourceConfig.model_validate(cfg)


def test_durations_read_like_durations():
    cfg = FilesSourceConfig.model_validate({"min_age_s": "2m", "scan_every_s": "500ms", "pattern": "*.csv"})
    assert (cfg.min_age_s, cfg.scan_every_s, cfg.format) == (120.0, 0.5, "auto")


def test_check_accepts_a_folder_source_and_locates_unknown_settings(tmp_path):
    systems = """
    drops:
      kind: files
      owner: ops
      folder: inbox
    reporting:
      kind: http
      owner: finance
      url: https://reporting.example.com
    """
    flow = """
    purpose: dropped leads reach reporting
    owner: ops
    trigger:
      source:
        system: drops
        pattern: "*.csv"
        csv: {delimiter: ";"}
        min_age_s: 5s
    destinations:
      - name: report
        system: reporting
        path: /rows
    """
    root = write_project(tmp_path, {"systems.yaml": systems, "flows/drops.yaml": flow})
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code == 0, res.output

    path = root / "flows/drops.yaml"
    path.write_text(flow_text := path.read_text().replace("min_age_s: 5s", "min_age: 5s"))
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code != 0
    assert f"{path}:8: unknown setting 'min_age'; did you mean 'min_age_s'?" in res.output

    scheduled = flow_text.replace("min_age: 5s", "min_age_s: 5s").replace(
        "source:", "schedule: {every: 1m}\n  source:"
    )
    path.write_text(scheduled)
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code != 0 and "consumed continuously; remove `schedule`" in res.output
