"""The SQL destinations' shared half, without a database: config rules, rendering, statements, errors."""

from __future__ import annotations

import importlib
import re
import sqlite3
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from patchbay import registry
from patchbay.cli import main
from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import MissingDriver, OutcomeClass, Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sql_client.errors import DbRefused, classify_db
from patchbay.connectors.sql_client.names import is_loopback, quote_ident
from patchbay.connectors.sql_client.statements import RowRenderer, build_statement
from patchbay.errors import RecordInvalid
from tests.connectors import contacts_project


def dest(**kw: object) -> SqlSinkConfig:
    return SqlSinkConfig.model_validate(kw)


def errors_of(**kw: object) -> str:
    with pytest.raises(ValidationError) as info:
        dest(**kw)
    return str(info.value)


# ---------------------------------------------------------------- config
def test_key_is_required_for_upsert_update_delete_and_refused_for_insert():
    for op in ("upsert", "update", "delete"):
        assert "needs `key: [column, ...]`" in errors_of(table="t", write_mode=op)
    assert "insert does not use `key`" in errors_of(table="t", write_mode="insert", key=["id"])


def test_names_must_be_plain_identifiers():
    assert "bad table name" in errors_of(table='t"; DROP TABLE x; --', write_mode="insert")
    assert "`schema: crm` and `table: contacts`" in errors_of(table="crm.contacts", write_mode="insert")
    assert "bad column name" in errors_of(table="t", write_mode="insert", columns={"first name": "a"})
    assert "bad column name" in errors_of(table="t", write_mode="upsert", key=["id`"])
    assert "bad schema name" in errors_of(table="t", write_mode="insert", schema="a b")


def test_columns_are_checked_against_the_key_and_the_operation():
    assert "key column 'id' is not in `columns`" in errors_of(
        table="t", write_mode="upsert", key=["id"], columns={"email": "email"}
    )
    assert "at least one column besides the key" in errors_of(
        table="t", write_mode="update", key=["id"], columns={"id": "id"}
    )
    assert "delete uses only the key columns" in errors_of(
        table="t", write_mode="delete", key=["id"], columns={"id": "id", "name": "name"}
    )
    assert "if_missing` applies to write_mode: update" in errors_of(
        table="t", write_mode="upsert", key=["id"], if_missing="ignore"
    )


def test_a_bad_expression_is_a_config_error():
    assert "unknown function 'lowr'" in errors_of(
        table="t", write_mode="insert", columns={"email": "lowr(email)"}
    )


# ---------------------------------------------------------------- render
def test_render_with_columns_evaluates_expressions_and_keeps_constants():
    r = RowRenderer(
        dest(
            table="contacts",
            schema="crm",
            write_mode="upsert",
            key=["email"],
            columns={
                "email": "lower(properties.email)",
                "name": "properties.name",
                "active": True,
                "tags": "tags",
            },
        )
    )
    req = r.render({"properties": {"email": "A@X.COM", "name": "Ann"}, "tags": ["a", "b"]})
    assert req == {
        "op": "upsert",
        "schema": "crm",
        "table": "contacts",
        "key": ["email"],
        "row": {"email": "a@x.com", "name": "Ann", "active": True, "tags": ["a", "b"]},
    }
    assert orjson.loads(orjson.dumps(req)) == req  # stored as JSON


def test_render_without_columns_takes_the_top_level_fields():
    r = RowRenderer(dest(table="t", write_mode="insert"))
    assert r.render({"id": 1, "name": "x", "meta": {"a": 1}})["row"] == {
        "id": 1,
        "name": "x",
        "meta": {"a": 1},
    }


def test_render_refuses_fields_that_are_not_column_names():
    r = RowRenderer(dest(table="t", write_mode="insert"))
    with pytest.raises(RecordInvalid) as info:
        r.render({"id": 1, "bad name": 2, 'x"; drop table t; --': 3})
    assert [v.path for v in info.value.violations] == ["bad name", 'x"; drop table t; --']
    with pytest.raises(RecordInvalid, match="not an object"):
        r.render([1, 2])


def test_render_refuses_a_missing_key_and_reports_expression_errors_by_column():
    r = RowRenderer(dest(table="t", write_mode="upsert", key=["id"], columns={"id": "id", "n": "to_int(n)"}))
    with pytest.raises(RecordInvalid) as info:
        r.render({"n": "abc"})
    paths = [v.path for v in info.value.violations]
    assert paths == ["n"]
    with pytest.raises(RecordInvalid) as info:
        r.render({"n": "5"})
    assert [str(v) for v in info.value.violations] == ["id: key column is missing or null"]


def test_render_delete_keeps_only_the_key():
    r = RowRenderer(dest(table="t", write_mode="delete", key=["id"]))
    assert r.render({"id": 3, "name": "x"})["row"] == {"id": 3}


# ---------------------------------------------------------------- statements
ROW = {"op": "upsert", "table": "t", "row": {"id": 1, "name": "a"}, "key": ["id"]}


def test_upsert_sql_per_dialect():
    pg = build_statement(ROW, "postgres")
    assert pg.sql == (
        'INSERT INTO "t" ("id", "name") VALUES (%s, %s) '
        'ON CONFLICT ("id") DO UPDATE SET "name" = excluded."name"'
    )
    assert pg.params == [1, "a"]
    my = build_statement({**ROW, "schema": "crm"}, "mysql")
    assert my.sql == (
        "INSERT INTO `crm`.`t` (`id`, `name`) VALUES (%s, %s) ON DUPLICATE KEY UPDATE `name` = VALUES(`name`)"
    )
    assert build_statement(ROW, "sqlite").sql.startswith(
        'INSERT INTO "t" ("id", "name") VALUES (?, ?) ON CONFLICT'
    )
    my8 = build_statement(ROW, "mysql", mysql_row_alias=True)
    assert my8.sql == (
        "INSERT INTO `t` (`id`, `name`) VALUES (%s, %s) AS patchbay_new "
        "ON DUPLICATE KEY UPDATE `name` = patchbay_new.`name`"
    )
    only_key = {**ROW, "row": {"id": 1}}
    assert build_statement(only_key, "postgres").sql.endswith('ON CONFLICT ("id") DO NOTHING')
    assert build_statement(only_key, "mysql").sql.endswith("ON DUPLICATE KEY UPDATE `id` = `id`")


def test_update_and_delete_sql():
    up = build_statement({**ROW, "op": "update"}, "postgres")
    assert (up.sql, up.params) == ('UPDATE "t" SET "name" = %s WHERE "id" = %s', ["a", 1])
    de = build_statement({**ROW, "op": "delete", "row": {"id": 1}}, "sqlite")
    assert (de.sql, de.params) == ('DELETE FROM "t" WHERE "id" = ?', [1])
    assert de.action == "delete from t"


def test_update_with_expect_sql_per_dialect():
    req = {
        "op": "update",
        "table": "t",
        "row": {"id": 1, "name": "b", "n": 2},
        "key": ["id"],
        "expect": {"name": "a"},
    }
    pg = build_statement(req, "postgres")
    assert pg.sql == (
        'UPDATE "t" SET "name" = CASE WHEN "name" IS NOT DISTINCT FROM %s THEN %s ELSE "name" END, "n" = %s'
        ' WHERE "id" = %s'
    )
    assert pg.params == ["a", "b", 2, 1]
    assert "CASE WHEN `name` <=> %s THEN %s ELSE `name` END" in build_statement(req, "mysql").sql
    assert 'CASE WHEN "name" IS ? THEN ? ELSE "name" END' in build_statement(req, "sqlite").sql
    assert "`expect` applies to write_mode: update" in errors_of(
        table="t", write_mode="upsert", key=["id"], expect={"name": "x"}
    )
    assert "not in `columns`" in errors_of(
        table="t", write_mode="update", key=["id"], columns={"id": "id", "a": "a"}, expect={"b": "x"}
    )
    assert "key column" in errors_of(
        table="t", write_mode="update", key=["id"], columns={"id": "id", "a": "a"}, expect={"id": "x"}
    )
    r = RowRenderer(
        dest(table="t", write_mode="update", key=["id"], columns={"id": "id", "a": "v"}, expect={"a": "old"})
    )
    assert r.render({"id": 1, "v": 2, "old": 1}) == {
        "op": "update",
        "table": "t",
        "row": {"id": 1, "a": 2},
        "key": ["id"],
        "expect": {"a": 1},
    }


def test_a_tampered_request_never_reaches_sql():
    with pytest.raises(ValueError, match="bad column name"):
        build_statement({**ROW, "row": {'id" = 1; --': 1, "id": 1}}, "postgres")
    with pytest.raises(ValueError, match="bad table name"):
        build_statement({**ROW, "table": "t; drop"}, "mysql")
    for name in ("a`b", "id\n", 'a"b', "1a", "a" * 64):
        with pytest.raises(ValueError):
            quote_ident(name, "mysql")


def test_values_are_adapted_not_formatted():
    st = build_statement(
        {**ROW, "row": {"id": 1, "name": "x'); DROP TABLE t; --", "j": {"a": 1}}},
        "sqlite",
        adapt=lambda v: orjson.dumps(v).decode() if isinstance(v, dict) else v,
    )
    assert "DROP" not in st.sql and st.params == [1, "x'); DROP TABLE t; --", '{"a":1}']


# ---------------------------------------------------------------- errors
def test_classify_sqlite_errors():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    db.execute("INSERT INTO t VALUES (1, 'a')")
    cases = [
        ("INSERT INTO t VALUES (1, 'b')", OutcomeClass.TERMINAL, "UNIQUE constraint failed: t.id"),
        ("INSERT INTO t (id) VALUES (2)", OutcomeClass.TERMINAL, "NOT NULL constraint failed"),
        ("INSERT INTO t (nope) VALUES (2)", OutcomeClass.TERMINAL, "no column named nope"),
    ]
    for sql, cls, text in cases:
        with pytest.raises(sqlite3.Error) as info:
            db.execute(sql)
        out = classify_db(info.value, "sqlite", action="insert into t")
        assert out.cls is cls and text in out.error and out.error.startswith("insert into t: [SQLITE_")
    db.close()


def test_classify_network_and_refusals_and_redaction():
    out = classify_db(ConnectionRefusedError(111, "Connection refused"), "postgres", action="x")
    assert out.cls is OutcomeClass.TRANSIENT and "Connection refused" in out.error
    out = classify_db(
        DbRefused("TLS required, password hunter2"),
        "mysql",
        redact=lambda s: s.replace("hunter2", "[secret]"),
    )
    assert out.cls is OutcomeClass.AUTH and "hunter2" not in out.error + out.excerpt
    assert "destination paused" in out.error
    assert classify_db(RuntimeError("bug"), "sqlite").cls is OutcomeClass.TRANSIENT


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "/var/run/postgresql"))
    assert not any(is_loopback(h) for h in ("db.internal", "10.0.0.5", "2001:db8::1"))


def check_project(root: Path) -> tuple[int, str]:
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    return res.exit_code, res.output


def test_check_accepts_a_sql_destination_and_locates_unknown_settings(tmp_path):
    root = contacts_project(tmp_path, {"kind": "sqlite", "path": str(tmp_path / "x.db")}, "contacts")
    code, out = check_project(root)
    assert code == 0, out
    assert "contacts: POST /hooks/contacts -> db" in out
    flow = root / "flows" / "contacts.yaml"
    flow.write_text(flow.read_text().replace("write_mode: upsert", "write_mode: upsert\n  keys: [email]"))
    code, out = check_project(root)
    assert code != 0
    lines = flow.read_text().splitlines()
    line_no = next(i for i, text in enumerate(lines, 1) if "keys:" in text)
    assert f"contacts.yaml:{line_no}: unknown setting 'keys'; did you mean 'key'?" in out, out
    flow.write_text(flow.read_text().replace("keys: [email]", "columns: {email: 'lowr(email)'}"))
    code, out = check_project(root)
    assert code != 0 and "unknown function 'lowr'" in out, out


@pytest.mark.parametrize(("kind", "module"), [("postgres", "psycopg"), ("mysql", "aiomysql")])
def test_a_missing_driver_says_how_to_install_it(kind, module, monkeypatch):
    registry.discover()
    entry = registry.CONNECTORS[kind]
    cls, _ = registry.connector_for(kind, "destination") or (None, None)
    assert cls is not None and entry.extra is not None
    monkeypatch.setitem(sys.modules, module, None)  # what an install without the extra looks like
    load_driver = importlib.import_module(f"patchbay.connectors.{kind}").load_driver
    if hasattr(load_driver, "cache_clear"):
        load_driver.cache_clear()
    system = entry.system_config.model_validate({"host": "127.0.0.1", "database": "d", "user": "u"})
    config = SqlSinkConfig.model_validate({"table": "t", "write_mode": "insert"})
    try:
        with pytest.raises(MissingDriver, match=re.escape(registry.install_hint(entry.extra))):
            cls(system, config, DeliveryPolicy(), Resources())
    finally:
        if hasattr(load_driver, "cache_clear"):
            load_driver.cache_clear()  # the next caller imports the real driver again
