-- The shop's orders; `patchbay init` creates data/shop.db from this file. In production this is the
-- shop's own database (PostgreSQL or MariaDB): change the `shop` system, the flow stays the same.
CREATE TABLE orders (
  id          INTEGER PRIMARY KEY,
  email       TEXT,
  status      TEXT NOT NULL,     -- paid, refunded, test
  total_cents INTEGER NOT NULL,
  currency    TEXT,
  created_at  TEXT NOT NULL,
  updated_at  TEXT NOT NULL      -- the cursor: moves whenever the order changes
);
INSERT INTO orders VALUES
  (1001, ' Ada@Example.com ', 'paid',     4200, 'eur', '2026-01-01T09:12:00Z', '2026-01-01T09:12:00Z'),
  (1002, 'grace@example.com', 'paid',     1999, 'usd', '2026-01-01T10:30:00Z', '2026-01-01T10:30:00Z'),
  (1003, 'qa@example.com',    'test',        1, 'eur', '2026-01-01T11:00:00Z', '2026-01-01T11:00:00Z'),
  (1004, 'not-an-email',      'paid',      500, 'eur', '2026-01-01T12:45:00Z', '2026-01-01T12:45:00Z'),
  (1005, 'alan@example.com',  'refunded',  850, 'gbp', '2026-01-01T08:00:00Z', '2026-01-01T14:00:00Z');
