"""Shared by the SQL connectors (postgres, mysql, sqlite), one module per seam.

A SQL sink renders each record at ingest into a JSON-able request

    {"op": "upsert", "schema": "crm", "table": "contacts", "row": {"id": 7, ...}, "key": ["id"]}

and turns it into one parameterised statement at send time. Values are always bound as parameters;
names (table, schema, columns) are checked against IDENT_RE and quoted for the dialect.

A SQL source polls a table or a query by keyset pagination on (cursor_column, id_column):

    SELECT ... WHERE (cursor_column, id_column) > (:last_value, :last_id)
    ORDER BY cursor_column, id_column LIMIT batch_size

and yields one batch per page with the last row's position as its cursor (see SourceQuery).

    names.py            identifiers and dialects
    config.py           the sink's settings (SqlSinkConfig) and the server systems' (SqlServerSystem)
    statements.py       record -> stored request (RowRenderer) -> one statement (build_statement)
    errors.py           classify_db: a database error as an Outcome; source_error: as an exception
    <dialect>_errors.py each dialect's classifier (postgres, mysql, sqlite)
    pool.py             the connection pool
    sink.py             SqlSink: the send half every SQL sink shares
    source_config.py    SqlSourceConfig and the `:cursor` binding of user SQL
    source_query.py     page statements, the saved cursor, values as JSON
    source.py           SqlSource: the poll loop every SQL source shares
"""
