"""The vault's rows in the store's SQLite file (security/vault.py encrypts them; this keeps them)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from patchbay.store.base import Sealed, SecretRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name       TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,     -- MasterKey.id of the key that encrypted this row
    nonce      BLOB NOT NULL,     -- 96 random bits, new on every encryption
    ciphertext BLOB NOT NULL,     -- AES-256-GCM of the value with the name as associated data, tag appended
    created_at REAL NOT NULL,     -- Unix seconds
    rotated_at REAL,              -- Unix seconds of the last replacement of the value
    version    INTEGER NOT NULL DEFAULT 1
)
"""
_COLUMNS = "name, key_id, nonce, ciphertext, created_at, rotated_at, version"


class SqliteSecretRows:
    """A new connection per operation, each operation one short transaction, so the hub's own
    connections (and other threads) share the file; each waits out the others' locks."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def ensure_schema(self) -> None:
        with self._write() as conn:
            conn.execute(SCHEMA)

    def get(self, name: str) -> SecretRow | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM secrets WHERE name = ?", (name,)).fetchone()
        return None if row is None else SecretRow(*row)

    def list(self) -> list[SecretRow]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM secrets ORDER BY name").fetchall()
        return [SecretRow(*r) for r in rows]

    def put(self, name: str, sealed: Sealed, now: float) -> None:
        key_id, nonce, ciphertext = sealed
        with self._write() as conn:
            conn.execute(
                "INSERT INTO secrets (name, key_id, nonce, ciphertext, created_at, rotated_at, version) "
                "VALUES (?, ?, ?, ?, ?, NULL, 1) "
                "ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, "
                "ciphertext = excluded.ciphertext, rotated_at = excluded.created_at, version = secrets.version + 1",
                (name, key_id, nonce, ciphertext, now),
            )

    def put_if_absent(self, name: str, sealed: Sealed, now: float) -> SecretRow:
        key_id, nonce, ciphertext = sealed
        with self._write() as conn:
            conn.execute(
                "INSERT INTO secrets (name, key_id, nonce, ciphertext, created_at, rotated_at, version) "
                "VALUES (?, ?, ?, ?, ?, NULL, 1) ON CONFLICT (name) DO NOTHING",
                (name, key_id, nonce, ciphertext, now),
            )
            row = conn.execute(f"SELECT {_COLUMNS} FROM secrets WHERE name = ?", (name,)).fetchone()
        return SecretRow(*row)

    def delete(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount > 0

    def reseal(self, fn: Callable[[SecretRow], Sealed]) -> int:
        with self._write() as conn:
            rows = [SecretRow(*r) for r in conn.execute(f"SELECT {_COLUMNS} FROM secrets").fetchall()]
            for row in rows:
                key_id, nonce, ciphertext = fn(row)
                conn.execute(
                    "UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ? WHERE name = ?",
                    (key_id, nonce, ciphertext, row.name),
                )
        return len(rows)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front (waiting out the busy timeout), so a
        # read-then-write like reseal never fails half way on a lock upgrade.
        with self._read() as conn:
            conn.isolation_level = None
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
