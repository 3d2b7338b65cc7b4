"""Where events, runs, deliveries and attempts live: SQLite by default."""
