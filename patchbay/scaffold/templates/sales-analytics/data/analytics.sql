-- The analytics table; `patchbay init` creates data/analytics.db from this file.
CREATE TABLE sales (
  order_id   TEXT PRIMARY KEY,
  day        TEXT NOT NULL,     -- YYYY-MM-DD, for daily totals
  channel    TEXT NOT NULL,
  country    TEXT,
  items      INTEGER NOT NULL,
  net        REAL NOT NULL,     -- total minus tax
  currency   TEXT NOT NULL
);
