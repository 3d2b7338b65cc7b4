-- The reporting table; `patchbay init` creates data/reporting.db from this file.
CREATE TABLE payments (
  payment_id   TEXT PRIMARY KEY,
  status       TEXT NOT NULL,
  amount       REAL NOT NULL,   -- in the currency's main unit (cents / 100)
  currency     TEXT NOT NULL,
  customer     TEXT,
  occurred_at  TEXT NOT NULL
);
