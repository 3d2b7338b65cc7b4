"""The one place that turns a project's store setting into a store: a SQLite file or a PostgreSQL URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from patchbay.store.base import SecretRows

if TYPE_CHECKING:
    from patchbay.store.sqlite import SqliteStore


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_hub_store(location: str | Path, *, check: bool = True) -> SqliteStore:
    """The store at `location` (a SQLite path or a postgresql:// URL); StoreUnusable when it cannot be used.
    Typed as SqliteStore, whose `problem` and `stats` the hub reads: PostgresStore is one."""
    if is_postgres(location):
        from patchbay.store.postgres import PostgresStore

        return PostgresStore(str(location), check=check)
    from patchbay.store.sqlite import SqliteStore

    return SqliteStore(Path(location), check=check)


def secret_rows_at(location: str | Path) -> SecretRows:
    """The vault's rows beside the store at `location`."""
    if is_postgres(location):
        from patchbay.store.postgres import PostgresSecretRows

        return PostgresSecretRows(str(location))
    from patchbay.store.secrets import SqliteSecretRows

    return SqliteSecretRows(Path(location))


def probe(location: str | Path) -> str | None:
    """Why the store at `location` cannot be used right now (for `check`), or None. A SQLite file is checked
    when it is opened; a PostgreSQL store is connected to, and its schema version read."""
    if not is_postgres(location):
        return None
    from patchbay.store.postgres.store import probe as pg_probe

    return pg_probe(str(location))
