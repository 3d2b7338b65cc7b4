"""The `tables` fixture: a crm table in PostgreSQL and a marketing table in MariaDB, unique per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import IN_CI, require_service
from tests.identity.helpers import MY, PG, Tables


@pytest.fixture
async def tables() -> AsyncIterator[Tables]:
    require_service("PostgreSQL", PG["host"], PG["port"])
    require_service("MariaDB", MY["host"], MY["port"])
    if not IN_CI:
        pytest.importorskip("psycopg", reason="the postgres extra is not installed")
        pytest.importorskip("aiomysql", reason="the mysql extra is not installed")
    t = await Tables().open()
    yield t
    await t.close()


from tests.server.test_console_browser import browser  # noqa: E402, F401  (the console tests' Chromium)
