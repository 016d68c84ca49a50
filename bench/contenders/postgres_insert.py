"""PostgreSQL ``INSERT ... ON CONFLICT DO NOTHING`` per message, one transaction each.

The pattern of a service that already has a database: a table with the event
ID as primary key, and a handler that runs only when the insert added a row.
Autocommit means one durable commit (a WAL fsync) per message, which is what
this pattern costs unless someone writes batching code around it.
"""

from __future__ import annotations

import psycopg

from bench.child import emit, parse_args
from bench.contenders._handwritten import consume_loop

SCHEMA = """
CREATE TABLE IF NOT EXISTS processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = "INSERT INTO processed_events (event_id) VALUES (%s) ON CONFLICT DO NOTHING"


def main() -> None:
    args = parse_args(__doc__ or "", "dsn")
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)

        def is_new(event_id: str) -> bool:
            return conn.execute(INSERT, (event_id,)).rowcount == 1

        consumed, handled, seconds = consume_loop(args, is_new)
    emit(consumed, handled, seconds)


if __name__ == "__main__":
    main()
