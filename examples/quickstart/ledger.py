from pydantic import BaseModel

from dedupe_consumer import Event, Handler


class Payment(BaseModel):
    account: str
    amount_cents: int


class Ledger(Handler):
    payload_model = Payment

    def handle(self, event: Event) -> None:
        key = f"balance:{event.payload.account}"  # payments are keyed by account
        balance = int(event.staged(key) or b"0") + event.payload.amount_cents
        event.stage(key, str(balance))  # commits with the dedupe record, or not at all
