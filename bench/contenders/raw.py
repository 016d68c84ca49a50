"""The baseline: a plain confluent-kafka batch consumer that reads and commits, no dedupe.

It touches every message's value and headers (what any handler does) and
commits synchronously once per batch, as a hand-written consumer does; it runs
the same loop as the hand-written Redis and PostgreSQL contenders.
"""

from __future__ import annotations

from confluent_kafka import Message

from bench._child import emit, parse_args
from bench.contenders._handwritten import batch_loop


def touch(message: Message) -> bool:
    message.value()
    message.headers()
    return True


def main() -> None:
    args = parse_args(__doc__ or "")
    consumed, handled, seconds = batch_loop(args, touch)
    emit(consumed, handled, seconds)


if __name__ == "__main__":
    main()
