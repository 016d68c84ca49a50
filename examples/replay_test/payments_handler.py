"""A payment handler whose effect must happen once per payment: it moves money.

The ledger is in memory so the replay test can look at the effect itself, not
only at call counts. In production ``charge`` would call a payment provider
with ``event.id`` as the idempotency key.
"""

from __future__ import annotations

from pydantic import BaseModel

from dedupe_consumer import Event, Handler, PermanentError


class Payment(BaseModel):
    payment_id: str
    account: str
    amount_cents: int
    currency: str


class ChargeHandler(Handler):
    """Debits ``account`` by ``amount_cents``; a second call would be a double charge."""

    payload_model = Payment  # a value that does not validate is dead-lettered, never retried

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.charges = 0

    def handle(self, event: Event) -> None:
        payment: Payment = event.payload
        if payment.amount_cents <= 0:
            raise PermanentError(f"non-positive amount {payment.amount_cents}")
        self.balances[payment.account] = (
            self.balances.get(payment.account, 0) - payment.amount_cents
        )
        self.charges += 1
