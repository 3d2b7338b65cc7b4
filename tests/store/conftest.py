"""The `store` fixture: every implementation of the Store protocol, each passing tests/store/test_conformance.py.

A new store (PostgreSQL, issue 13) is one more parameter here: a factory that opens an empty store
(unique per test) and, for a server, skips with a reason when it is unreachable (`require_service`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from patchbay.store.base import SecretRows, Store
from tests.conftest import postgres_url


def _sqlite(tmp_path: Path) -> Store:
    from patchbay.store.sqlite import SqliteStore

    return SqliteStore(tmp_path / "store.db")


def _postgres(tmp_path: Path) -> Store:
    from patchbay.store.postgres import PostgresStore

    return PostgresStore(postgres_url())


STORES: dict[str, Callable[[Path], Store]] = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = STORES[request.param](tmp_path)
    try:
        yield s
    finally:
        await s.close()


def _sqlite_secret_rows(tmp_path: Path) -> SecretRows:
    from patchbay.store.secrets import SqliteSecretRows

    return SqliteSecretRows(tmp_path / "store.db")


def _postgres_secret_rows(tmp_path: Path) -> SecretRows:
    from patchbay.store.postgres import PostgresSecretRows

    return PostgresSecretRows(postgres_url())


SECRET_ROWS: dict[str, Callable[[Path], SecretRows]] = {
    "sqlite": _sqlite_secret_rows,
    "postgres": _postgres_secret_rows,
}


@pytest.fixture(params=sorted(SECRET_ROWS))
def secret_rows(request: pytest.FixtureRequest, tmp_path: Path) -> SecretRows:
    rows = SECRET_ROWS[request.param](tmp_path)
    rows.ensure_schema()
    return rows
