"""Replay a recorded payments topic through ChargeHandler: every payment charged once.

``payments.jsonl`` was recorded from a real topic by ``make_recording.py``
(``dedupe-consumer record``); it holds producer retries (same event ID, same
bytes), a binary key and headers. The ``replay`` fixture comes with the
dedupe-consumer package and needs no broker.
"""

from __future__ import annotations

import json
from pathlib import Path

from dedupe_consumer.replay import read_recording
from dedupe_consumer.testing.pytest_plugin import ReplayRunner

from .payments_handler import ChargeHandler

RECORDING = Path(__file__).with_name("payments.jsonl")


def test_each_account_debited_once_per_payment_despite_retries_and_restarts(
    replay: ReplayRunner,
) -> None:
    expected: dict[str, int] = {}
    seen: set[str] = set()
    for record in read_recording(RECORDING).records:
        payment = json.loads(record.value_ or b"{}")
        if payment["payment_id"] not in seen:
            seen.add(payment["payment_id"])
            expected[payment["account"]] = (
                expected.get(payment["account"], 0) - payment["amount_cents"]
            )

    handler = ChargeHandler()
    report = replay(handler, RECORDING, inject_duplicates=0.5, redeliver_batches=True, seed=7)

    assert report.duplicates > report.injected > 0  # the recording's own retries, plus ours
    assert handler.charges == len(seen) == len(report.unique_ids)
    assert handler.balances == expected
