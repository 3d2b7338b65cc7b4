"""The one place that turns a project's store setting into a store: a SQLite file or a PostgreSQL URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from patchbay.store.base import SecretRows

if TYPE_CHECKING:
    from patchbay.store.sqlite import SqliteStore


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_hub_store(
    location: str | Path, *, check: bool = True, holder: str | None = None, lease_s: float | None = None
) -> SqliteStore:
    """The store at `location` (a SQLite path or a postgresql:// URL); StoreUnusable when it cannot be used.
    Typed as SqliteStore, whose `problem` and `stats` the hub reads: PostgresStore is one. `holder` names
    this process in a shared store (its delivery claims); engine/roles.Node.id; `lease_s` how long its claims
    last unless renewed (the hub's `claim_lease`)."""
    if is_postgres(location):
        from patchbay.store.postgres import PostgresStore

        if lease_s is None:
            return PostgresStore(str(location), check=check, holder=holder)
        return PostgresStore(str(location), check=check, holder=holder, lease_s=lease_s)
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


def migrate(location: str | Path) -> tuple[int, int, list[str]]:
    """Take the store at `location` to the newest schema: (version before, after, the steps applied)."""
    from patchbay.store.migrations import read_version

    if is_postgres(location):
        import psycopg

        from patchbay.store.postgres.store import PostgresStore, connect_once, unusable

        try:
            with connect_once(str(location)) as conn:
                exists = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
                before = read_version(conn) if exists and exists[0] else 0
        except psycopg.Error as exc:
            raise unusable(str(location), exc) from None
    else:
        from patchbay.store.sqlite_schema import connect, schema_version

        path = Path(location)
        if not path.exists():
            from patchbay.errors import StoreUnusable

            raise StoreUnusable(f"migrating the store {path}: there is no store file there yet")
        conn_l = connect(path)
        try:
            before = schema_version(conn_l, path)
        finally:
            conn_l.close()
    from patchbay.store.migrations import pending

    steps = [f"{m.version}: {m.what}" for m in pending(before)]
    if is_postgres(location):
        PostgresStore.migrate_only(str(location))
    else:
        from patchbay.store.sqlite_schema import open_store

        open_store(Path(location)).close()
    from patchbay.store.migrations import LATEST

    return before, LATEST, steps
