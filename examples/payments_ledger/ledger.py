"""A payments ledger in SQLite that applies each payment exactly once.

The pattern for an external database: make the event ID a unique key of the
write and do the write and the balance update in *one* database transaction.

* A repeat of the same event (the crash window of plain mode, or a retried
  ``handle`` call) hits the unique key, and the whole transaction is a no-op.
  The database itself closes the window that dedupe_consumer cannot close
  from outside.
* In claim mode with ``on_uncertain = "reconcile"``, ``reconcile`` asks the
  same table whether the payment was applied. Reconcile then never has to
  guess.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from pydantic import BaseModel, Field

from dedupe_consumer import Event, Handler, PermanentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    event_id     TEXT PRIMARY KEY,          -- the dedupe key, enforced by the database
    account      TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    "offset"     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    account       TEXT PRIMARY KEY,
    balance_cents INTEGER NOT NULL
);
"""


class Payment(BaseModel):
    account: str = Field(min_length=1)
    amount_cents: int


class LedgerHandler(Handler):
    """Applies payments to ``$LEDGER_DB`` (default ``./ledger.sqlite3``)."""

    payload_model = Payment

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path or os.environ.get("LEDGER_DB", "ledger.sqlite3"))
        self._db: sqlite3.Connection | None = None

    def setup(self) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an applied payment survives power loss
        self._db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("setup() was not called")
        return self._db

    def handle(self, event: Event) -> None:
        payment: Payment = event.payload
        if payment.amount_cents == 0:
            raise PermanentError("a zero-amount payment is a producer bug")
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            inserted = db.execute(
                'INSERT INTO ledger (event_id, account, amount_cents, topic, partition, "offset")'
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                (
                    event.id,
                    payment.account,
                    payment.amount_cents,
                    event.topic,
                    event.partition,
                    event.offset,
                ),
            ).rowcount
            if inserted:  # first time this event ID reaches the database
                db.execute(
                    "INSERT INTO balances (account, balance_cents) VALUES (?, ?)"
                    " ON CONFLICT (account) DO UPDATE SET"
                    " balance_cents = balance_cents + excluded.balance_cents",
                    (payment.account, payment.amount_cents),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def reconcile(self, event: Event) -> bool:
        row = self.db.execute("SELECT 1 FROM ledger WHERE event_id = ?", (event.id,)).fetchone()
        return row is not None

    def teardown(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def balances(self) -> dict[str, int]:
        rows = self.db.execute("SELECT account, balance_cents FROM balances").fetchall()
        return {str(account): int(balance) for account, balance in rows}
