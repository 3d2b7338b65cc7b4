"""files: appends (JSON Lines, CSV), rotation, durability calls and error classes, on a real folder."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.files import FilesSink, FilesSinkConfig, FilesSystem, classify_os_error
from patchbay.errors import RecordInvalid
from tests.conftest import write_project

LEAD = {"email": "ada@example.com", "properties": {"firstname": "Ada", "score": 7}}


def make(folder: Path | str, resources: Resources | None = None, **dest: Any) -> FilesSink:
    return FilesSink(
        FilesSystem(folder=str(folder)),
        FilesSinkConfig(**{"file": "leads.jsonl", **dest}),
        DeliveryPolicy(),
        resources or Resources(),
    )


async def write(sink: FilesSink, record: Any, key: str = "k1") -> Any:
    return await sink.send(sink.render(record, key), key)


async def test_jsonl_appends_one_line_per_record_with_fsync(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = make(tmp_path / "out", include_key=True)
    for n in range(3):
        outcome = await write(sink, {**LEAD, "n": n, "_key": "spoofed"}, key=f"evt_{n}.files")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome

    lines = [orjson.loads(x) for x in (tmp_path / "out" / "leads.jsonl").read_bytes().splitlines()]
    assert [x["n"] for x in lines] == [0, 1, 2]
    assert [x["_key"] for x in lines] == [
        "evt_0.files",
        "evt_1.files",
        "evt_2.files",
    ]  # the record cannot spoof it
    assert list(lines[0]) == ["_key", "email", "properties", "n"]
    assert len(synced) >= 3  # every append reached the disk before the delivery counted as done


async def test_csv_header_once_dotted_columns_and_formula_escaping(tmp_path):
    sink = make(
        tmp_path,
        file="leads.csv",
        format="csv",
        include_key=True,
        columns=["email", "properties.firstname", "properties.score", "missing"],
    )
    await write(sink, LEAD, "evt_1.f")
    await write(
        sink,
        {"email": '=HYPERLINK("http://evil")', "properties": {"firstname": "Bob, Jr.", "score": -3}},
        "evt_2.f",
    )

    text = (tmp_path / "leads.csv").read_bytes().decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["email", "properties.firstname", "properties.score", "missing", "_key"],
        ["ada@example.com", "Ada", "7", "", "evt_1.f"],
        ['\'=HYPERLINK("http://evil")', "Bob, Jr.", "-3", "", "evt_2.f"],  # numbers are not escaped
    ]
    assert text.count("\r\n") == 3


async def test_csv_with_changed_columns_starts_a_new_file(tmp_path):
    await write(make(tmp_path, file="leads.csv", format="csv", columns=["email"]), LEAD)
    await write(
        make(tmp_path, file="leads.csv", format="csv", columns=["email", "properties.firstname"]), LEAD
    )
    assert (tmp_path / "leads.1.csv").read_bytes() == b"email\r\nada@example.com\r\n"
    assert (tmp_path / "leads.csv").read_bytes() == b"email,properties.firstname\r\nada@example.com,Ada\r\n"


async def test_rotate_bytes_numbers_files_and_never_exceeds_the_limit(tmp_path):
    sink = make(tmp_path, rotate_bytes=1024)
    record = {"pad": "x" * 300}
    for n in range(10):
        await write(sink, {**record, "n": n})

    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["leads.1.jsonl", "leads.2.jsonl", "leads.3.jsonl", "leads.jsonl"]
    assert all(f.stat().st_size <= 1024 for f in files)
    ns = [
        orjson.loads(line)["n"]
        for f in ("leads.1.jsonl", "leads.2.jsonl", "leads.3.jsonl", "leads.jsonl")
        for line in (tmp_path / f).read_bytes().splitlines()
    ]
    assert ns == list(range(10))  # oldest in .1, newest in the live file


async def test_rotate_daily_renames_yesterdays_file(tmp_path):
    live = tmp_path / "leads.jsonl"
    live.write_text('{"old": true}\n')
    yesterday = datetime.now(UTC) - timedelta(days=1)
    os.utime(live, (yesterday.timestamp(), yesterday.timestamp()))
    sink = make(tmp_path, rotate_daily=True)
    await write(sink, LEAD)
    await write(sink, LEAD)  # same day: no second rotation

    assert (tmp_path / f"leads.{yesterday.date().isoformat()}.jsonl").read_text() == '{"old": true}\n'
    assert len(live.read_bytes().splitlines()) == 2


async def test_concurrent_appends_with_rotation_lose_and_tear_nothing(tmp_path):
    sink = make(tmp_path, rotate_bytes=4096)
    outcomes = await asyncio.gather(*(write(sink, {"n": n, "pad": "y" * 100}, f"k{n}") for n in range(200)))
    assert {o.cls for o in outcomes} == {OutcomeClass.SUCCESS}
    seen = [orjson.loads(line)["n"] for f in tmp_path.iterdir() for line in f.read_bytes().splitlines()]
    assert sorted(seen) == list(range(200))


def test_file_name_from_the_record_stays_in_the_folder(tmp_path):
    sink = make(tmp_path, file="{{ team }}.jsonl")
    assert sink.render({"team": "../../etc/passwd"}, "k")["file"] == ".._.._etc_passwd.jsonl"
    with pytest.raises(RecordInvalid, match="file name"):
        make(tmp_path, file="{{ team }}").render({"team": ".."}, "k")


def test_relative_folder_is_under_the_project(tmp_path):
    sink = make("exports", Resources(extra={"root": tmp_path}))
    assert sink.folder == tmp_path / "exports"


@pytest.mark.parametrize(
    ("setup", "cls"),
    [
        ("folder_is_a_file", OutcomeClass.AUTH),  # every record would fail: pause, lose nothing
        ("name_is_a_folder", OutcomeClass.TERMINAL),  # only this file name fails: dead-letter the record
        ("parent_missing", OutcomeClass.TRANSIENT),  # e.g. a share not mounted yet
    ],
)
async def test_real_write_errors_are_classified(tmp_path, setup, cls):
    folder = tmp_path / "out"
    if setup == "folder_is_a_file":
        folder.write_text("")
    elif setup == "name_is_a_folder":
        (folder / "leads.jsonl").mkdir(parents=True)
    else:
        folder = tmp_path / "missing" / "out"
    outcome = await write(make(folder), LEAD)
    assert outcome.cls is cls, outcome
    assert str(folder) in outcome.error


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
async def test_permission_denied_pauses(tmp_path):
    tmp_path.chmod(0o500)
    try:
        outcome = await write(make(tmp_path), LEAD)
    finally:
        tmp_path.chmod(0o700)
    assert outcome.cls is OutcomeClass.AUTH and "resume" in outcome.error


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOSPC, OutcomeClass.TRANSIENT),
        (errno.EDQUOT, OutcomeClass.TRANSIENT),
        (errno.EIO, OutcomeClass.TRANSIENT),
        (errno.EACCES, OutcomeClass.AUTH),
        (errno.EROFS, OutcomeClass.AUTH),
        (errno.ENAMETOOLONG, OutcomeClass.TERMINAL),
    ],
)
def test_os_error_classes(code, cls):
    assert classify_os_error(OSError(code, os.strerror(code))) is cls


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ({"format": "csv"}, "format csv needs `columns`"),
        ({"columns": ["email"]}, "`columns` is for format csv"),
        ({"file": "../leads.jsonl"}, "bad file name"),
        ({"file": "sub/leads.jsonl"}, "bad file name"),
        ({"rotate_bytes": 10}, "greater than or equal to 1024"),
    ],
)
def test_config_mistakes_are_refused(dest, message):
    with pytest.raises(ValueError, match=message):
        FilesSinkConfig(**{"file": "leads.jsonl", **dest})


def test_check_accepts_a_files_project_and_locates_unknown_settings(tmp_path):
    systems = """
    website:
      owner: web
      webhook: {scheme: standard_webhooks, secrets: [{secret: website_whsec}]}
    exports:
      kind: files
      owner: ops
      folder: exports
    """
    flow = """
    purpose: keep a copy of every lead
    owner: ops
    trigger:
      webhook: {system: website}
    destinations:
      - name: archive
        system: exports
        file: "leads-{{ utm_source || 'web' }}.csv"
        format: csv
        columns: [email, first_name]
        rotate_daily: true
    """
    root = write_project(tmp_path, {"systems.yaml": systems, "flows/archive.yaml": flow})
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 0, res.output

    (root / "flows/archive.yaml").write_text(
        (root / "flows/archive.yaml").read_text().replace("rotate_daily", "rotate_dayly")
    )
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code != 0
    assert (
        f"{root / 'flows/archive.yaml'}:11: unknown setting 'rotate_dayly'; did you mean 'rotate_daily'?"
        in res.output
    )
