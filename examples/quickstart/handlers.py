import os
import sqlite3

from pydantic import BaseModel

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError, Settings


class Payment(BaseModel):
    account: str
    amount_cents: int


def charge(payment: Payment, idempotency_key: str) -> None:
    """The side effect: a row in a SQLite file here, a payment provider's API in real life."""
    db = sqlite3.connect(os.environ.get("CHARGES_DB", "charges.sqlite3"))
    with db:  # one transaction: committed, or rolled back if this raises
        db.execute("CREATE TABLE IF NOT EXISTS charges (idempotency_key, account, amount_cents)")
        db.execute(
            "INSERT INTO charges VALUES (?, ?, ?)",
            (idempotency_key, payment.account, payment.amount_cents),
        )
    db.close()


class ChargeHandler(Handler):
    payload_model = Payment  # invalid payload -> dead-letter topic, never retried

    def handle(self, event: Event) -> None:
        if event.payload.amount_cents <= 0:
            raise PermanentError("non-positive amount")  # -> dead-letter topic
        charge(event.payload, idempotency_key=event.id)  # other exceptions are retried


if __name__ == "__main__":
    DedupeConsumer(ChargeHandler(), Settings.from_toml("config/consumer.toml")).run()
