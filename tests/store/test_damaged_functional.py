"""A damaged store file, for real: `patchbay serve` refuses it in one line and `patchbay store check` says why."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.security.vault import MasterKey
from patchbay.store.base import NewDelivery, NewEvent
from patchbay.store.sqlite import SCHEMA_VERSION, SqliteStore, SyncStore, tx_accept
from tests.cluster.harness import free_port
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project

pytestmark = pytest.mark.slow
RUNS = 5000


def pb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")},
        "PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC,
        "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN,
    }
    return subprocess.run(
        [sys.executable, "-m", "patchbay", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def project_with_runs(root: Path, runs: int = RUNS) -> Path:
    """A project whose store holds `runs` accepted events, written by the store's own code."""
    lead_project(root, "http://127.0.0.1:9/", hub={"port": free_port()})
    store = SyncStore(root / ".patchbay" / "patchbay.db")
    now = time.time()
    for n in range(runs):
        body = f'{{"email": "lead-{n}@example.com", "notes": "{"x" * 200}"}}'.encode()
        store.write(
            tx_accept,
            NewEvent(
                id=f"evt_{n:08d}",
                flow="lead-capture",
                received_at=now,
                payload=body,
                body_hash=hashlib.sha256(body).hexdigest(),
                dedupe_key=f"msg_{n}",
                status="pending",
                record_key=f"lead-{n}@example.com",
                deliveries=[NewDelivery("crm", {"method": "POST", "url": "http://127.0.0.1:9/"}, f"k{n}")],
            ),
        )
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return root / ".patchbay" / "patchbay.db"


def damage_pages(db: Path, seed: int = 8) -> None:
    """Random bytes over a few pages in the middle of the file (table and index pages alike)."""
    rng = random.Random(seed)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        for _ in range(6):
            f.seek(rng.randrange(4096 * 4, size - 4096) // 4096 * 4096 + rng.randrange(0, 64))
            f.write(rng.randbytes(2048))


def truncate(db: Path) -> None:
    os.truncate(db, 0)


def half(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


def schema_page(db: Path) -> None:
    with open(db, "r+b") as f:  # keep the 100-byte header, overwrite the rest of page 1 (the schema)
        f.seek(100)
        f.write(random.Random(1).randbytes(3996))


def foreign(db: Path) -> None:
    db.write_text("name,email\nAda,ada@example.com\n" * 100)


def newer(db: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()


def _fingerprint(db: Path) -> tuple[int, str]:
    data = db.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (truncate, "empty (0 bytes)"),
        (damage_pages, "damaged"),
        (half, "damaged"),
        (schema_page, "damaged"),
        (foreign, "not a SQLite database"),
        (newer, "newer Patchbay"),
    ],
    ids=["zero-bytes", "random-pages", "half-truncated", "schema-page", "foreign-file", "newer-schema"],
)
def test_serve_refuses_a_damaged_store_in_one_line_and_changes_nothing(tmp_path, damage, says):
    db = project_with_runs(tmp_path, 2000 if damage is not damage_pages else RUNS)
    damage(db)
    before = _fingerprint(db)

    res = pb("serve", str(tmp_path), timeout=60)

    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr[-3000:]
    assert str(db) in lines[0] and says in lines[0], lines[0]
    assert "backup" in lines[0] or "newer version" in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert _fingerprint(db) == before  # refused, not repaired into an empty store
    assert not (tmp_path / ".patchbay" / "patchbay.db-wal").exists() or damage is newer


def test_check_blames_a_damaged_store_not_the_secrets_kept_in_it(tmp_path):
    """The vault is in the store file: with the file damaged, `check` says so at the store line (the default
    store here, so line 0 of patchbay.yaml) and does not report each secret as missing."""
    root = lead_project(tmp_path / "p", "http://127.0.0.1:9/")
    MasterKey.load_ring(root / ".patchbay", create=True)
    db = root / ".patchbay" / "patchbay.db"
    db.write_bytes(b"not a store " * 1000)
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code == 2, res.output
    assert "store: opening the store" in res.output and "is not a SQLite database" in res.output
    assert "missing secret" not in res.output
    assert db.read_bytes() == b"not a store " * 1000  # nothing was changed


@pytest.mark.parametrize("damage", [damage_pages, half, schema_page, truncate, foreign])
def test_store_check_finds_the_damage(tmp_path, damage):
    db = project_with_runs(tmp_path, 2000)
    damage(db)
    before = _fingerprint(db)

    res = pb("store", "check", "-p", str(tmp_path))

    assert res.returncode == 1, res.stdout + res.stderr
    assert "DAMAGED" in res.stdout and str(db) in res.stdout
    assert "backup" in res.stdout
    assert _fingerprint(db) == before


def test_store_check_of_a_whole_store(tmp_path):
    project_with_runs(tmp_path, 300)
    res = pb("store", "check", "-p", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (
        f"ok (schema {SCHEMA_VERSION}, 300 runs" in res.stdout
        and "integrity_check found no problem" in res.stdout
    )
    quick = pb("store", "check", "--quick", "-p", str(tmp_path), "--json")
    assert quick.returncode == 0 and '"check": "quick_check"' in quick.stdout


def test_other_commands_refuse_an_empty_store_too(tmp_path):
    db = project_with_runs(tmp_path, 10)
    truncate(db)
    for args in (["runs", "-p", str(tmp_path)], ["dead", "-p", str(tmp_path)]):
        res = pb(*args)
        assert res.returncode == 3 and "empty (0 bytes)" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert db.stat().st_size == 0


async def test_the_store_and_its_wal_are_private(tmp_path):
    db = tmp_path / "state" / "patchbay.db"
    store = SqliteStore(db)
    try:
        await store.write(lambda c: c.execute("INSERT INTO meta VALUES('x', 'y')"))
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        await store.close()
    os.chmod(db, 0o644)  # a store made by an older version
    SyncStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_a_new_store_never_appears_half_made(tmp_path):
    db = tmp_path / "patchbay.db"
    SyncStore(db).close()
    assert db.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["patchbay.db"]


async def test_opening_the_store_again_keeps_the_wal_of_a_serving_store(tmp_path):
    """Checking a store file must not drop this process's SQLite locks on it: a CLI command that
    closes its last connection would then delete the -wal and -shm the serving hub still uses, and
    new readers would not see what the hub had acknowledged."""
    db = tmp_path / "patchbay.db"
    store = SqliteStore(db)
    try:
        await store.write(lambda c: c.execute("INSERT INTO meta VALUES('before', '1')"))
        SyncStore(db).close()  # in the hub's process: the vault and the API open the file this way
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sqlite3; sqlite3.connect({str(db)!r}).execute('SELECT COUNT(*) FROM meta').fetchall()",
            ],
            check=True,
        )
        assert Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
        await store.write(lambda c: c.execute("INSERT INTO meta VALUES('after', '1')"))
        other = SyncStore(db)
        try:
            seen = other.conn.execute("SELECT COUNT(*) FROM meta WHERE key IN ('before', 'after')")
            assert seen.fetchone()[0] == 2  # what the hub acknowledged is what a new reader sees
        finally:
            other.close()
    finally:
        await store.close()
