"""Tests of the vault: encryption at rest, name binding, master key files, rotation, shared SQLite files."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from patchbay.errors import ConfigError
from patchbay.security.vault import MasterKey, SecretInfo, Vault, VaultError
from patchbay.store.secrets import SqliteSecretRows

VALUE = "sk_live_51HxQ-very-secret-token"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "patchbay.db"


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def vault(db: Path, key: MasterKey) -> Vault:
    v = Vault.at(db, [key])
    v.ensure_schema()
    return v


def raw_rows(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT name, key_id, nonce, ciphertext FROM secrets ORDER BY name").fetchall()
    finally:
        conn.close()


# -- the vault ------------------------------------------------------------------------------------


def test_round_trip(vault: Vault) -> None:
    vault.set("stripe.key", VALUE)
    vault.set("unicode", "pässwörd ✓ \x00 end")
    vault.set("empty", "")
    assert vault.get("stripe.key") == VALUE
    assert vault.get("unicode") == "pässwörd ✓ \x00 end"
    assert vault.get("empty") == ""
    assert vault.get("absent") is None


def test_replace_is_a_rotation(db: Path, key: MasterKey) -> None:
    clock = iter([100.0, 200.0, 300.0])
    v = Vault(SqliteSecretRows(db), [key], now=lambda: next(clock))
    v.ensure_schema()
    v.set("crm", "one")
    assert v.list() == [SecretInfo("crm", 100.0, None, 1, key.id)]
    v.set("crm", "two")
    v.set("crm", "three")
    assert v.list() == [SecretInfo("crm", 100.0, 300.0, 3, key.id)]
    assert v.get("crm") == "three"


def test_list_and_delete(vault: Vault, key: MasterKey) -> None:
    vault.set("b", "2")
    vault.set("a", "1")
    infos = vault.list()
    assert [i.name for i in infos] == ["a", "b"]
    assert all(i.key_id == key.id and i.version == 1 for i in infos)
    assert not any(hasattr(i, "value") for i in infos)
    assert vault.delete("a") is True
    assert vault.delete("a") is False
    assert [i.name for i in vault.list()] == ["b"]


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "x" * 101, "ünï"])
def test_bad_names_are_refused(vault: Vault, name: str) -> None:
    with pytest.raises(ValueError, match="bad secret name"):
        vault.set(name, "v")


def test_plaintext_is_not_in_the_file(db: Path, vault: Vault) -> None:
    vault.set("stripe.key", VALUE)
    vault.set("stripe.key", VALUE + "-2")  # a replaced value must not linger either
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
    data = b"".join(p.read_bytes() for p in files)
    assert b"stripe.key" in data  # we are looking at the right file
    assert VALUE.encode() not in data
    assert VALUE.encode("utf-16-le") not in data


def test_nonce_is_fresh_on_every_encryption(db: Path, vault: Vault) -> None:
    vault.set("a", VALUE)
    [(_, _, nonce1, ct1)] = raw_rows(db)
    vault.set("a", VALUE)
    [(_, _, nonce2, ct2)] = raw_rows(db)
    assert nonce1 != nonce2 and ct1 != ct2
    assert isinstance(nonce1, bytes) and len(nonce1) == 12


def test_wrong_key_fails_clearly(db: Path, vault: Vault, key: MasterKey) -> None:
    vault.set("stripe.key", VALUE)
    other = MasterKey.generate()
    with pytest.raises(VaultError) as info:
        Vault.at(db, [other]).get("stripe.key")
    message = str(info.value)
    assert "'stripe.key'" in message and key.id in message and other.id in message
    assert VALUE not in message


def test_ciphertext_is_bound_to_its_name(db: Path, vault: Vault, key: MasterKey) -> None:
    vault.set("stripe.key", VALUE)
    vault.set("harmless", "nothing")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE secrets SET nonce = (SELECT nonce FROM secrets WHERE name = 'stripe.key'), "
            "ciphertext = (SELECT ciphertext FROM secrets WHERE name = 'stripe.key') WHERE name = 'harmless'"
        )
    conn.close()
    with pytest.raises(VaultError, match="'harmless'.*" + key.id) as info:
        vault.get("harmless")
    assert VALUE not in str(info.value)
    assert vault.get("stripe.key") == VALUE


def test_tampered_ciphertext_fails(db: Path, vault: Vault) -> None:
    vault.set("a", VALUE)
    conn = sqlite3.connect(db)
    with conn:
        [(ct,)] = conn.execute("SELECT ciphertext FROM secrets").fetchall()
        conn.execute("UPDATE secrets SET ciphertext = ?", (bytes([ct[0] ^ 1]) + ct[1:],))
    conn.close()
    with pytest.raises(VaultError, match="altered"):
        vault.get("a")


# -- rekeying -------------------------------------------------------------------------------------


def test_rekey_re_encrypts_everything(db: Path, vault: Vault, key: MasterKey) -> None:
    for i in range(5):
        vault.set(f"s{i}", f"value-{i}")
    before = {r[0]: r[3] for r in raw_rows(db)}
    new = MasterKey.generate()
    assert vault.rekey(new) == 5
    assert {r[1] for r in raw_rows(db)} == {new.id}
    assert all(before[r[0]] != r[3] for r in raw_rows(db))
    assert vault.keys[0] == new
    vault.set("after", "x")
    assert {i.key_id for i in vault.list()} == {new.id}
    # The old key can be retired: the new one alone reads everything, the old one alone nothing.
    only_new = Vault.at(db, [new])
    assert [only_new.get(f"s{i}") for i in range(5)] == [f"value-{i}" for i in range(5)]
    with pytest.raises(VaultError, match=new.id):
        Vault.at(db, [key]).get("s0")


def test_reading_during_rotation_with_new_and_old_keys(db: Path, vault: Vault, key: MasterKey) -> None:
    vault.set("under_old", "1")
    new = MasterKey.generate()
    both = Vault.at(db, [new, key])
    both.set("under_new", "2")
    assert {i.name: i.key_id for i in both.list()} == {"under_old": key.id, "under_new": new.id}
    assert (both.get("under_old"), both.get("under_new")) == ("1", "2")
    with pytest.raises(VaultError, match="not loaded"):
        vault.get("under_new")


def test_rekey_is_all_or_nothing(db: Path, vault: Vault, key: MasterKey) -> None:
    vault.set("a", "1")
    Vault.at(db, [MasterKey.generate()]).set("z_unreadable", "2")
    with pytest.raises(VaultError, match="z_unreadable"):
        vault.rekey(MasterKey.generate())
    assert {r[0]: r[1] for r in raw_rows(db)}["a"] == key.id
    assert vault.keys == [key]
    assert vault.get("a") == "1"


def test_rekey_can_be_repeated(db: Path, vault: Vault, key: MasterKey) -> None:
    vault.set("a", "1")
    new = MasterKey.generate()
    assert Vault.at(db, [new, key]).rekey(new) == 1
    assert vault.rekey(new) == 1  # this vault never held `new`: rows already under it are read with it
    assert Vault.at(db, [new]).get("a") == "1"


# -- sharing the file -----------------------------------------------------------------------------


@pytest.fixture
def wal_db(db: Path) -> Iterator[Path]:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    yield db


def test_threads_share_the_file(wal_db: Path, key: MasterKey) -> None:
    v = Vault.at(wal_db, [key])
    v.ensure_schema()

    def work(n: int) -> None:
        for i in range(20):
            v.set(f"t{n}.{i}", f"value {n} {i}")
            assert v.get(f"t{n}.{i}") == f"value {n} {i}"

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert len(v.list()) == 80


def test_waits_for_another_writer(wal_db: Path, key: MasterKey) -> None:
    v = Vault.at(wal_db, [key])
    v.ensure_schema()
    other = sqlite3.connect(wal_db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE store_stuff (x)")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        v.set("a", "1")  # blocks on the store's write lock, then goes through
        v.rekey(MasterKey.generate())
    finally:
        release.join()
        other.close()
    assert v.get("a") == "1"


def test_works_while_a_reader_holds_a_snapshot(wal_db: Path, key: MasterKey) -> None:
    v = Vault.at(wal_db, [key])
    v.ensure_schema()
    v.set("a", "1")
    reader = sqlite3.connect(wal_db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM secrets").fetchone() == (1,)
    v.set("b", "2")
    v.rekey(MasterKey.generate())
    reader.execute("COMMIT")
    reader.close()
    assert (v.get("a"), v.get("b")) == ("1", "2")


# -- master keys ----------------------------------------------------------------------------------


def test_key_id_and_text_form() -> None:
    raw = bytes(range(32))
    k = MasterKey(raw)
    assert k.id == hashlib.sha256(raw).hexdigest()[:8]
    assert MasterKey.from_text(k.to_text()) == k
    assert MasterKey.from_text(k.to_text().rstrip("=") + "\n") == k
    assert raw.hex() not in repr(k) and k.to_text() not in repr(k)
    assert MasterKey.generate() != MasterKey.generate()


@pytest.mark.parametrize("text", ["", "short", "A" * 43 + "!", "QUFB" * 12])
def test_bad_key_text(text: str) -> None:
    with pytest.raises(ConfigError, match="32 random bytes"):
        MasterKey.from_text(text, source="$PATCHBAY_MASTER_KEY")


def test_missing_key_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        MasterKey.load(tmp_path, env={})
    message = str(info.value)
    assert "PATCHBAY_MASTER_KEY" in message and str(tmp_path / "master.key") in message
    assert "patchbay secrets init" in message


def test_create_writes_a_private_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    k = MasterKey.load(state, env={}, create=True)
    path = state / "master.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert MasterKey.load(state, env={}) == k
    assert MasterKey.load(state, env={}, create=True) == k  # never replaces an existing key
    assert [p.name for p in state.iterdir()] == ["master.key"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    k = MasterKey.load(tmp_path, env={}, create=True)
    path = tmp_path / "master.key"
    path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        MasterKey.load(tmp_path, env={})
    assert k.to_text() not in str(info.value)
    path.chmod(0o400)
    assert MasterKey.load(tmp_path, env={}) == k


def test_env_key_wins(tmp_path: Path) -> None:
    MasterKey.load(tmp_path, env={}, create=True)
    from_env = MasterKey.generate()
    assert MasterKey.load(tmp_path, env={"PATCHBAY_MASTER_KEY": from_env.to_text()}) == from_env
    assert MasterKey.load(tmp_path / "nowhere", env={"PATCHBAY_MASTER_KEY": from_env.to_text()}) == from_env


def test_bad_env_key_is_named_not_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$PATCHBAY_MASTER_KEY") as info:
        MasterKey.load(tmp_path, env={"PATCHBAY_MASTER_KEY": "hunter2hunter2"})
    assert "hunter2" not in str(info.value)


def test_load_ring_adds_old_keys(tmp_path: Path) -> None:
    cur = MasterKey.load(tmp_path, env={}, create=True)
    old = MasterKey.generate()
    old.write(tmp_path / "master.key.old")
    env_old = MasterKey.generate()
    assert MasterKey.load_ring(tmp_path, env={}) == [cur, old]
    assert MasterKey.load_ring(tmp_path, env={"PATCHBAY_MASTER_KEY_OLD": env_old.to_text()}) == [
        cur,
        env_old,
        old,
    ]


# -- rotating the key files -----------------------------------------------------------------------


def test_rotate_files(tmp_path: Path, db: Path) -> None:
    state = tmp_path / "state"
    first = MasterKey.load(state, env={}, create=True)
    v = Vault.at(db, MasterKey.load_ring(state, env={}))
    v.ensure_schema()
    v.set("a", "1")
    v.set("b", "2")

    old, new = MasterKey.rotate_files(state, v, env={})

    assert old == first and new != first
    assert sorted(p.name for p in state.iterdir()) == ["master.key", "master.key.old"]
    assert MasterKey.load(state, env={}) == new
    assert MasterKey.read(state / "master.key.old") == old
    assert (state / "master.key").stat().st_mode & 0o777 == 0o600
    assert (state / "master.key.old").stat().st_mode & 0o777 == 0o600
    assert {i.key_id for i in v.list()} == {new.id}
    assert MasterKey.load_ring(state, env={}) == [new, old]
    # The old key can go: the new one alone reads everything.
    (state / "master.key.old").unlink()
    assert [Vault.at(db, [MasterKey.load(state, env={})]).get(n) for n in ("a", "b")] == ["1", "2"]


def test_second_rotation_waits_for_the_old_key_to_be_retired(tmp_path: Path, db: Path) -> None:
    MasterKey.load(tmp_path, env={}, create=True)
    v = Vault.at(db, MasterKey.load_ring(tmp_path, env={}))
    v.ensure_schema()
    v.set("a", "1")
    _, new = MasterKey.rotate_files(tmp_path, v, env={})
    with pytest.raises(ConfigError, match="earlier rotation"):
        MasterKey.rotate_files(tmp_path, v, env={})
    assert MasterKey.load(tmp_path, env={}) == new
    (tmp_path / "master.key.old").unlink()
    _, newer = MasterKey.rotate_files(tmp_path, v, env={})
    assert Vault.at(db, [newer]).get("a") == "1"


def test_rotation_resumes_after_a_crash_past_the_rekey(tmp_path: Path, db: Path) -> None:
    first = MasterKey.load(tmp_path, env={}, create=True)
    v = Vault.at(db, [first])
    v.ensure_schema()
    v.set("a", "1")
    # A run that stopped after the rekey committed: master.key.new holds the key the rows are under.
    pending = MasterKey.generate()
    pending.write(tmp_path / "master.key.new")
    Vault.at(db, [first]).rekey(pending)
    assert MasterKey.load_ring(tmp_path, env={}) == [first, pending]  # the hub can still read meanwhile

    old, new = MasterKey.rotate_files(tmp_path, Vault.at(db, [first]), env={})

    assert (old, new) == (first, pending)
    assert MasterKey.load(tmp_path, env={}) == pending
    assert Vault.at(db, [pending]).get("a") == "1"


def test_rotate_files_refuses_an_env_key(tmp_path: Path, db: Path, key: MasterKey) -> None:
    with pytest.raises(ConfigError, match="PATCHBAY_MASTER_KEY_OLD"):
        MasterKey.rotate_files(tmp_path, Vault.at(db, [key]), env={"PATCHBAY_MASTER_KEY": key.to_text()})
