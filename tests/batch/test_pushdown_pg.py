"""SQL pushdown on the real PostgreSQL: the same rows through the pushed SELECT and through Python give the
same values and the same quarantine reasons (hypothesis rows with unicode, whitespace classes, NULLs, edge
numbers and JSON of every type)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_service
from tests.connectors.bulk_harness import HOST, PORT, bulk, database, fetch, name, steps, sync

psycopg = pytest.importorskip("psycopg")

from patchbay.batch.frame import Frame, unescape  # noqa: E402
from patchbay.batch.pushdown import plan  # noqa: E402
from patchbay.batch.transform import FrameTransform, PushedTransform, Result  # noqa: E402
from patchbay.config.batch import BatchFrom  # noqa: E402
from patchbay.connectors.bulk_client import Window  # noqa: E402

TABLE_SQL = (
    "CREATE TABLE {t} (id bigint PRIMARY KEY, t text, v varchar(40), c char(3), n bigint, s text,"
    " j jsonb, f float8, ts timestamptz)"
)

# Steps that push down almost everything; `h` (a hash) stays in Python, so the fast rows still run a map.
MIXED = (
    {
        "map": {
            "id": "id",
            "e": "lower(trim(t))",
            "u": "upper(v)",
            "tr": "trim(t)",
            "cc": "concat(v, '-', n)",
            "o": "t || v",
            "tier": "j.tier",
            "deep": "j.a.b",
            "k": {"value": "const"},
            "num": {"expr": "s", "type": "int"},
            "ns": {"expr": "n", "type": "str"},
            "d": {"expr": "v", "default": "none"},
            "co": "coalesce(t, v)",
            "h": "hash_sha256(t)",
            "c": "c",
            "j": "j",
            "f": "f",
            "ts": "ts",
        }
    },
    {
        "validate": {
            "e": {"required": True, "format": "email"},
            "u": {"max_length": 5},
            "tr": {"pattern": "^[a-z]+( [a-z.]+)*\\d?$"},
            "num": {"minimum": -100, "maximum": 1000},
            "tier": {"one_of": ["gold", "silver", "1"]},
            "d": {"min_length": 2, "not_empty": True},
        }
    },
)
# Everything pushed: the fast rows are handed over as COPY blocks (no Python at all).
RAW = (
    {
        "map": {
            "id": "id",
            "e": "lower(trim(t))",
            "tier": "j.tier",
            "n": "n",
            "v": "upper(v)",
            "c": "c",
            "j": "j",
            "ts": "ts",
        }
    },
    {"validate": {"e": {"format": "email"}, "n": {"minimum": 0}, "v": {"pattern": "^[A-Z ]*$"}}},
)
# No map: the rules read the source's columns.
CHECKS_ONLY = (
    {
        "validate": {
            "t": {"required": True, "min_length": 1, "pattern": "^\\w+[.]?\\s?$"},
            "n": {"one_of": [1, 2, 3.0, True, "1"]},
            "v": {"format": "uuid"},
        }
    },
)

ODD = [
    " ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000",
    "É", "é", "ß", "İ", "ı", "ǅ", "ﬁ", "Σ", "😀", "'", '"', "\\", "@", ".", "-", "+", "_", "0", "9", "٣", "１",
]  # fmt: skip
ALPHABET = st.sampled_from(ODD) | st.characters(min_codepoint=32, max_codepoint=126)
TEXT = st.none() | st.text(ALPHABET, max_size=12)
EMAILS = st.builds(lambda a, b, c: f"{a}@{b}.{c}", TEXT.map(lambda s: s or "x"), TEXT.map(str), TEXT.map(str))
INTS = (
    st.none()
    | st.sampled_from([0, -1, 1, 3, 2**63 - 1, -(2**63), 1000, 1001, -100, -101])
    | st.integers(-500, 2000)
)
NUMBERS = st.none() | st.sampled_from(
    [
        "12",
        " 12 ",
        "+5",
        "-0",
        "007",
        "1_0",
        "1.0",
        "1e3",
        "٣",
        "１２",
        "",
        " ",
        "99999999999999999999",
        "\t7\n",
    ]
)
JSON_VALUE = (
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | TEXT
)
JSON = st.none() | st.one_of(
    st.fixed_dictionaries({}, optional={"tier": JSON_VALUE | st.sampled_from(["gold", "silver", "1"]),
                                        "a": st.none() | st.fixed_dictionaries({}, optional={"b": JSON_VALUE})}),
    st.lists(JSON_VALUE, max_size=2),
    JSON_VALUE,
)  # fmt: skip
ROW = st.tuples(
    TEXT | EMAILS,
    TEXT,
    TEXT.map(lambda s: None if s is None else s[:3]),
    INTS,
    NUMBERS,
    JSON,
    st.none() | st.sampled_from([0.1, 1e20, -0.0, 1.5, 3.0]),
    st.none() | st.sampled_from(["2024-01-01 00:00:01+00", "2024-06-30 23:59:59.123456+02"]),
)


SEEN: Counter[str] = Counter()  # rows per kind of frame, over every example: the fast path must be exercised

# Rows that mostly pass every guard and rule (so the fast path carries them), with a few odd values.
WORD = st.text(st.sampled_from("abcxyzABC .-"), min_size=1, max_size=8)
NICE_ROW = st.tuples(
    st.builds(
        lambda a, b: f" {a}@{b}.com", st.text(st.sampled_from("abcXYZ.+_1"), min_size=1, max_size=6), WORD
    ),
    st.none() | st.sampled_from(["ab", "AB", "xyz", "0e4f2a3c-1b2d-4e5f-8a9b-0C1D2E3F4A5B"]),
    st.none() | st.sampled_from(["ab", "AB", "xyz"]),
    st.none() | st.integers(0, 900),
    st.none() | st.sampled_from(["12", " 7", "-3", "0900"]),
    st.none() | st.sampled_from([{"tier": "gold"}, {"tier": "silver"}, {"tier": "1"}, {"a": {"b": "x"}}, {}]),
    st.none() | st.sampled_from([0.1, 2.5]),
    st.none() | st.just("2024-01-01 00:00:01+00"),
)
ROWS = st.lists(st.one_of(NICE_ROW, NICE_ROW, NICE_ROW, ROW), min_size=1, max_size=40)


def _decoded(rows: list[list[bytes]]) -> list[tuple[str | None, ...]]:
    return [tuple(unescape(f) for f in r) for r in rows]


def _lines(block: bytes) -> list[list[bytes]]:
    return [line.split(b"\t") for line in block[:-1].split(b"\n")] if block else []


async def _through(table: str, step_specs: tuple[dict[str, Any], ...], *, pushed: bool) -> dict[str, Any]:
    src = bulk()
    frm = BatchFrom(system="db", table=table)
    try:
        columns = await src.columns(frm)
        step_list = steps(*step_specs)
        results: list[Result] = []
        if pushed:
            p = plan(step_list, columns)
            assert p.pushed, p.notes
            transform: Any = PushedTransform(p, step_list, columns, key=["id"])
            frames = src.read_pushed(frm, columns, Window(), 100, p.read)
        else:
            transform = FrameTransform(step_list, columns, key=["id"])
            frames = src.read(frm, columns, Window(), 100)
        parts = []
        async for frame in frames:
            assert isinstance(frame, Frame)
            parts.append(frame.part)
            SEEN[frame.part or "python-only"] += len(frame)
            results.append(transform.apply(frame))
    finally:
        await src.close()
    rows: list[tuple[str | None, ...]] = []
    invalid = []
    for r in results:
        rows += _decoded(r.rows) + _decoded(_lines(r.raw or b""))
        invalid += [(bad.row["id"], bad.row, bad.reason) for bad in r.invalid]
    return {
        "rows": sorted(rows, key=lambda r: int(r[0] or 0)),
        "invalid": sorted(invalid, key=lambda x: x[0]),
        "filtered": sum(r.filtered for r in results),
        "columns": [c.name for c in transform.output_columns()],
        "parts": parts,
    }


def _same(table: str, step_specs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    python = asyncio.run(_through(table, step_specs, pushed=False))
    pushed = asyncio.run(_through(table, step_specs, pushed=True))
    assert pushed["rows"] == python["rows"]
    assert pushed["invalid"] == python["invalid"]
    assert pushed["filtered"] == python["filtered"]
    assert pushed["columns"] == python["columns"]
    return pushed


@pytest.fixture(scope="module")
def source_table() -> Any:
    require_service("PostgreSQL", HOST, PORT)
    table = f"pd_src_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=HOST, port=PORT, dbname="test", user="postgres", autocommit=True) as conn:
        conn.execute(TABLE_SQL.format(t=table))
        yield conn, table
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def _load(conn: Any, table: str, rows: list[tuple[Any, ...]]) -> None:
    conn.execute(f"TRUNCATE {table}")
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)",
            [
                (i + 1, *r[:5], psycopg.types.json.Jsonb(r[5]) if r[5] is not None else None, *r[6:])
                for i, r in enumerate(rows)
            ],
        )


EQUIV = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EQUIV
@given(rows=ROWS)
def test_mixed_steps_same_as_python(source_table: Any, rows: list[tuple[Any, ...]]) -> None:
    conn, table = source_table
    _load(conn, table, rows)
    _same(table, MIXED)


@EQUIV
@given(rows=ROWS)
def test_raw_path_same_as_python(source_table: Any, rows: list[tuple[Any, ...]]) -> None:
    conn, table = source_table
    _load(conn, table, rows)
    _same(table, RAW)


@EQUIV
@given(rows=ROWS)
def test_checks_only_same_as_python(source_table: Any, rows: list[tuple[Any, ...]]) -> None:
    conn, table = source_table
    _load(conn, table, rows)
    _same(table, CHECKS_ONLY)


def test_fast_rows_skip_python_and_odd_rows_take_it(source_table: Any) -> None:
    """ASCII rows that pass stay in the pushed frames; non-ASCII, odd whitespace, JSON numbers and failing
    rows are read again for Python, with the Python path's reasons."""
    conn, table = source_table
    rows = [
        ("  Ann@Example.COM ", "ab", "abc", 5, "1", {"tier": "gold"}, None, None),
        ("ÉVE@example.com", "ab", "abc", 5, "1", {"tier": "gold"}, None, None),  # non-ASCII: Python lowers É
        ("\x1cbob@example.com", "ab", "abc", 5, "1", {"tier": "gold"}, None, None),  # strip() trims \x1c
        ("carl@example.com", "ab", "abc", 5, "1", {"tier": 7}, None, None),  # a JSON number
        ("not an email", "ab", "abc", -5, "1", {"tier": "gold"}, None, None),  # invalid twice
    ]
    _load(conn, table, rows)
    out = _same(table, RAW)
    assert out["parts"] == ["pushed", "python"]
    assert [r[1] for r in out["rows"]] == [
        "ann@example.com",
        "éve@example.com",
        "bob@example.com",
        "carl@example.com",
    ]
    assert out["rows"][3][2] == "7"  # the number as the Python path writes it
    [(rid, row, reason)] = out["invalid"]
    assert rid == 5 and row["t"] == "not an email"
    assert (
        reason == 'validate: e: "not an email" is not a valid email address; n: -5 is less than the minimum 0'
    )


def test_plan_says_what_is_pushed_and_why_not() -> None:
    columns = [
        *_cols(("id", "int", "bigint"), ("t", "text", "text"), ("c", "text", "character(3)")),
        *_cols(("f", "float", "double precision"), ("j", "json", "jsonb"), ("ts", "timestamptz", "timestamp with time zone")),
    ]  # fmt: skip
    p = plan(
        steps(
            {
                "map": {
                    "id": "id",
                    "e": "lower(t)",
                    "lc": "lower(c)",
                    "h": "hash_md5(t)",
                    "ff": "concat(f)",
                    "w": "j",
                }
            },
            {"validate": {"e": {"format": "date"}, "h": {"required": True}, "id": {"minimum": 1}}},
            {"filter": {"when": "id"}},
            {"validate": {"e": {"required": True}}},
        ),
        columns,
    )
    notes = "\n".join(p.notes)
    assert "map#1 e: pushed down" in notes
    assert "map#1 lc: Python (column c is character(3)" in notes
    assert "map#1 h: Python (hash_md5() has no exact SQL form here)" in notes
    assert "map#1 ff: Python (column f is double precision" in notes
    assert "validate#2 e: Python (format: date has no exact SQL form)" in notes
    assert "validate#2 h: Python (its value is computed in Python)" in notes
    assert "validate#2 id: pushed down" in notes
    assert "validate#4 e: pushed down" in notes  # after a filter: the same values
    assert "filter#3: Python (filters are not pushed down)" in notes
    assert not p.read.raw


def _cols(*specs: tuple[str, str, str]) -> list[Any]:
    from patchbay.batch.frame import Column

    return [Column(n, t, d) for n, t, d in specs]


async def test_batch_run_pushdown_auto_and_off_write_the_same() -> None:
    """A whole run, into PostgreSQL tables: the same rows, counts and quarantined reasons; the report says
    what was pushed down."""
    async with database() as pg:
        src = name(pg, "pd_run_src")
        await pg.execute(TABLE_SQL.format(t=src))
        await pg.execute(
            f"INSERT INTO {src} (id, t, v, n, j) SELECT i, CASE WHEN i % 7 = 0 THEN 'bad' WHEN i % 11 = 0"
            f" THEN 'Zoë@Example.com' ELSE ' User' || i || '@Example.com ' END, repeat('v', i % 5 + 1), i,"
            f" jsonb_build_object('tier', CASE WHEN i % 5 = 0 THEN to_jsonb(i) ELSE to_jsonb('t' || i) END)"
            f" FROM generate_series(1, 3000) i"
        )
        reports = {}
        for mode in ("auto", "off"):
            dst = name(pg, f"pd_run_{mode}")
            spec = {
                "from": {"system": "db", "table": src},
                "to": {"system": "db", "table": dst},
                "mode": "merge",
                "key": ["id"],
                "pushdown": mode,
                "batch_rows": 500,
            }
            reports[mode] = await sync(f"test-pd-{mode}", spec, steps(*RAW))
            assert reports[mode].status == "ok", reports[mode].error
            reports[mode].rows = await fetch(pg, f"SELECT * FROM {dst} ORDER BY id")  # type: ignore[attr-defined]
            reports[mode].types = await fetch(  # type: ignore[attr-defined]
                pg,
                f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{dst}'"
                " ORDER BY ordinal_position",
            )
        auto, off = reports["auto"], reports["off"]
        assert auto.rows == off.rows and auto.types == off.types  # type: ignore[attr-defined]
        assert (auto.read, auto.written, auto.inserted, auto.quarantined) == (
            off.read, off.written, off.inserted, off.quarantined
        )  # fmt: skip
        assert auto.quarantined == 3000 // 7
        assert sorted(map(str, auto.samples)) == sorted(map(str, off.samples))
        assert any("pushed down" in n for n in auto.pushdown)
        assert off.pushdown == ["pushdown: off for this flow; every step runs in Python"]


def test_the_examples_exercised_both_paths() -> None:
    """Runs after the hypothesis tests (same module, in order): many rows took each path."""
    if not SEEN:
        pytest.skip("run with the equivalence tests")
    assert SEEN["pushed"] > 30 and SEEN["python"] > 100, SEEN


async def test_an_error_mid_copy_fails_the_run_and_the_connection_stays_usable() -> None:
    """The COPY is read straight from libpq: a row the server cannot compute fails the run with the server's
    message (both paths), and the source connection still answers afterwards."""
    async with database() as pg:
        src = name(pg, "pd_err_src")
        await pg.execute(f"CREATE TABLE {src} (id bigint PRIMARY KEY, t text)")
        await pg.execute(f"INSERT INTO {src} SELECT i, 'a' || i FROM generate_series(1, 5000) i")
        query = f"SELECT id, t, 10 / (id - 4000) AS x FROM {src}"
        for mode in ("auto", "off"):
            spec = {
                "from": {"system": "db", "query": query},
                "to": {"system": "db", "table": name(pg, "pd_err_dst")},
                "mode": "full",
                "pushdown": mode,
                "batch_rows": 500,
            }
            report = await sync(f"test-pd-err-{mode}", spec, steps({"map": {"id": "id", "t": "upper(t)"}}))
            assert report.status == "failed"
            assert "division by zero" in (report.error or "")
        source = bulk()
        try:
            frm = BatchFrom(system="db", table=src)
            assert len(await source.columns(frm)) == 2
            bad = BatchFrom(system="db", query=query)
            with pytest.raises(psycopg.errors.DivisionByZero):
                async for _ in source.read(bad, await source.columns(bad), Window(), 100):
                    pass
            assert await source.count(frm, Window()) is not None
        finally:
            await source.close()


async def test_a_case_insensitive_column_is_compared_as_python_does() -> None:
    """A column with a nondeterministic collation: one_of and patterns still compare code points."""
    async with database() as pg:
        await pg.execute(
            "CREATE COLLATION IF NOT EXISTS pb_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )
        src = name(pg, "pd_ci_src")
        await pg.execute(f"CREATE TABLE {src} (id bigint PRIMARY KEY, t text COLLATE pb_ci)")
        await pg.execute(f"INSERT INTO {src} VALUES (1, 'gold'), (2, 'GOLD'), (3, 'Gold')")
        step_list = steps({"validate": {"t": {"one_of": ["gold"], "pattern": "^[a-z]+$"}}})
        for mode in ("auto", "off"):
            spec = {
                "from": {"system": "db", "table": src},
                "to": {"system": "db", "table": name(pg, "pd_ci_dst")},
                "mode": "full",
                "pushdown": mode,
            }
            report = await sync(f"test-pd-ci-{mode}", spec, step_list)
            assert report.status == "ok", report.error
            assert (report.written, report.quarantined) == (1, 2), mode


async def test_a_reader_stopped_early_leaves_the_connection_usable() -> None:
    """The consumer stops after the first frame (a failed write, say): the COPY is cancelled, the
    snapshot rolled back, and the same connection answers the next question."""
    async with database() as pg:
        src = name(pg, "pd_stop_src")
        await pg.execute(f"CREATE TABLE {src} (id bigint PRIMARY KEY, t text)")
        await pg.execute(f"INSERT INTO {src} SELECT i, 'a' || i FROM generate_series(1, 50000) i")
        source = bulk()
        try:
            frm = BatchFrom(system="db", table=src)
            columns = await source.columns(frm)
            p = plan(steps({"map": {"id": "id", "t": "upper(t)"}}), columns)
            for reader in (
                source.read_pushed(frm, columns, Window(), 100, p.read),
                source.read(frm, columns, Window(), 100),
            ):
                async for _ in reader:
                    break
                await reader.aclose()  # type: ignore[attr-defined]
                assert await source.count(frm, Window()) is not None
                assert [c.name for c in await source.columns(frm)] == ["id", "t"]
        finally:
            await source.close()
