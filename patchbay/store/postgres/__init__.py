"""The PostgreSQL store (issue 13): `store: postgresql://…` in patchbay.yaml.

`store.py` holds `PostgresStore` (the `Store` protocol) and `PostgresSecretRows` (`SecretRows`);
`schema.py` the tables, `dialect.py` the connection that runs the store's query functions on PostgreSQL.
"""

from __future__ import annotations

from patchbay.store.postgres.store import PostgresSecretRows, PostgresStore, is_postgres_url

__all__ = ["PostgresSecretRows", "PostgresStore", "is_postgres_url"]
