"""API tokens: format, hashed storage, verification failures, scopes; the `tokens` and `audit` commands."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.security.project import store_path_of
from patchbay.security.tokens import (
    TokenError,
    check_scopes,
    create_token,
    normalise_id,
    parse_bearer,
    revoke_token,
    verify,
)
from patchbay.store.base import Actor
from patchbay.store.blocking import BlockingStore
from patchbay.store.sqlite import SqliteStore

ME = Actor("alice")


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "store.db")
    yield s
    await s.close()


async def test_token_format_and_only_a_hash_is_stored(store):
    text, info = await create_token(store, "ci-bot", ["runs:read", "runs:replay", "runs:read"], None, ME)
    prefix, tid, secret = text.split("_", 2)
    assert prefix == "pbt" and tid == info.id and len(tid) == 12 and len(secret) >= 43
    assert info.scopes == ("runs:read", "runs:replay")  # deduplicated, in order
    assert info.created_by == "alice"
    row = await store.read(lambda c: c.execute("SELECT * FROM api_tokens").fetchone())
    assert secret not in str(tuple(row)) and text not in str(tuple(row))
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert (await verify(store, text)).name == "ci-bot"
    for given in (text, f"pbt_{tid}", tid):
        assert (await revoke_token(store, given)).id == tid


async def test_two_tokens_never_share_an_id_or_secret(store):
    made = [(await create_token(store, f"t{i}", ["admin"], None, ME))[0] for i in range(50)]
    assert len({t.split("_")[1] for t in made}) == 50 and len(set(made)) == 50


@pytest.mark.parametrize(
    "presented, code",
    [
        ("", "bad_token"),
        ("pbt_", "bad_token"),
        ("pbt_xyz_abc", "bad_token"),
        ("Bearer pbt_0", "bad_token"),
        ("pbt_0123456789ab_" + "A" * 43, "bad_token"),  # well formed, unknown id
    ],
)
async def test_malformed_and_unknown_tokens_are_refused(store, presented, code):
    with pytest.raises(TokenError) as exc:
        await verify(store, presented)
    assert exc.value.code == code


async def test_wrong_secret_revoked_and_expired(store):
    text, info = await create_token(store, "a", ["admin"], None, ME)
    with pytest.raises(TokenError, match="unknown or wrong"):
        await verify(store, text[:-4] + ("AAAA" if not text.endswith("AAAA") else "BBBB"))
    assert (await revoke_token(store, info.id)).status() == "revoked"
    first = (await store.token_secret(info.id))[0].revoked_at
    await revoke_token(store, info.id)
    assert (await store.token_secret(info.id))[0].revoked_at == first  # revoking twice keeps the first
    with pytest.raises(TokenError) as exc:
        await verify(store, text)
    assert exc.value.code == "revoked_token"
    assert await revoke_token(store, "ffffffffffff") is None

    soon, _ = await create_token(store, "b", ["runs:read"], time.time() + 60, ME)
    assert (await verify(store, soon)).name == "b"
    with pytest.raises(TokenError) as exc:
        await verify(store, soon, now=time.time() + 61)
    assert exc.value.code == "expired_token"
    assert {t.name: t.status() for t in await store.tokens()} == {"a": "revoked", "b": "active"}
    assert [t.name for t in await store.tokens(include_inactive=False)] == ["b"]


def test_scopes_and_names_are_checked():
    assert check_scopes(["admin"]) == ("admin",)
    with pytest.raises(ValueError, match="unknown scope 'runs:write'"):
        check_scopes(["runs:write"])
    with pytest.raises(ValueError, match="at least one"):
        check_scopes([])


async def test_bad_names_refused(store):
    for name in ("", "has space", "x" * 65, "-leading"):
        with pytest.raises(ValueError, match="bad token name"):
            await create_token(store, name, ["admin"], None, ME)
    assert await store.tokens() == []


def test_parse_bearer():
    assert parse_bearer("Bearer pbt_x") == "pbt_x"
    assert parse_bearer("bearer   pbt_x ") == "pbt_x"
    for bad, code in (
        (None, "missing_token"),
        ("", "missing_token"),
        ("Basic abc", "bad_token"),
        ("Bearer", "bad_token"),
    ):
        with pytest.raises(TokenError) as exc:
            parse_bearer(bad)
        assert exc.value.code == code


def test_normalise_id():
    assert normalise_id("abcdefabcdef") == "abcdefabcdef"
    assert normalise_id("pbt_abcdefabcdef") == "abcdefabcdef"
    assert normalise_id("pbt_abcdefabcdef_" + "x" * 43) == "abcdefabcdef"


async def test_plaintext_is_not_recoverable_from_the_store_file(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    text, _ = await create_token(store, "a", ["admin"], None, ME)
    await store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.db"))
    assert text.split("_", 2)[2].encode() not in data


# ----------------------------------------------------------------------------- the commands
@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "patchbay.yaml").write_text("port: 0\n")
    return root


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_cli_create_list_revoke_and_audit(project, monkeypatch):
    monkeypatch.setenv("USER", "alice")
    code, out, err = run(
        "tokens",
        "create",
        "console",
        "--scope",
        "runs:read",
        "--scope",
        "runs:replay",
        "--expires",
        "30d",
        "-p",
        str(project),
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("pbt_") and "shown only now" in err
    tid = token.split("_")[1]

    with BlockingStore(store_path_of(project)) as store:
        info = store.run(lambda s: verify(s, token))
    assert (
        info.scopes == ("runs:read", "runs:replay")
        and 29 * 86400 < info.expires_at - time.time() <= 30 * 86400
    )

    code, out, _ = run("tokens", "list", "-p", str(project))
    assert code == 0 and tid in out and "runs:read runs:replay" in out and token.split("_", 2)[2] not in out
    code, out, _ = run("tokens", "list", "--json", "-p", str(project))
    [row] = json.loads(out)
    assert row["id"] == tid and row["status"] == "active" and "token" not in row

    code, out, _ = run("tokens", "revoke", f"pbt_{tid}", "-p", str(project))
    assert code == 0 and f"revoked {tid}" in out
    code, out, _ = run("tokens", "list", "-p", str(project))
    assert "no tokens" in out
    code, out, _ = run("tokens", "list", "--all", "-p", str(project))
    assert "revoked" in out
    code, _, err = run("tokens", "revoke", "000000000000", "-p", str(project))
    assert code == 1 and "no token" in err

    code, out, _ = run("audit", "-p", str(project))
    assert code == 0
    lines = out.splitlines()
    assert "token.revoke" in lines[1] and "token.create" in lines[2] and "cli" in lines[1]
    code, out, _ = run("audit", "--action", "token.", "--json", "-p", str(project))
    rows = json.loads(out)
    assert [r["action"] for r in rows] == ["token.revoke", "token.create"]
    assert rows[1]["detail"]["scopes"] == ["runs:read", "runs:replay"] and token not in out
    code, out, _ = run("audit", "--action", "replay", "-p", str(project))
    assert "no audit entries" in out
    code, out, _ = run("audit", "--since", "1h", "--json", "-p", str(project))
    assert len(json.loads(out)) == 2


def test_cli_refuses_bad_input(project):
    code, _, err = run("audit", "-p", str(project))
    assert code == 1 and "no store" in err
    code, _, err = run("tokens", "create", "x", "--scope", "root", "-p", str(project))
    assert code == 2 and "root" in err
    code, _, err = run("tokens", "create", "x", "-p", str(project))
    assert code == 2 and "--scope" in err
    code, _, err = run("tokens", "create", "x", "--scope", "admin", "--expires", "soon", "-p", str(project))
    assert code == 2 and "duration" in err
    code, _, err = run("tokens", "create", "bad name", "--scope", "admin", "-p", str(project))
    assert code == 2 and "bad token name" in err
    code, _, err = run("tokens", "list", "-p", str(project / "missing"))
    assert code == 2 and "no project folder" in err
