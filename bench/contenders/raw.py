"""The baseline: a plain confluent-kafka batch consumer that reads and commits, no dedupe.

It touches every message's value and headers (what any handler does) and
commits synchronously once per batch, as dedupe_consumer does, so the ratio
to it is the price of the dedupe decision and its durability, nothing else.
"""

from __future__ import annotations

from confluent_kafka import Consumer

from bench._child import Stopwatch, emit, parse_args


def main() -> None:
    args = parse_args(__doc__ or "")
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    clock = Stopwatch()
    seen = 0
    try:
        while seen < args.events:
            # Never ask for more than is left: a short last batch would otherwise wait
            # out the whole poll timeout and be measured as processing time.
            batch = consumer.consume(min(args.batch, args.events - seen), 1.0)
            if not batch:
                continue
            clock.start_once()
            for message in batch:
                if message.error():
                    raise RuntimeError(f"consume error: {message.error()}")
                message.value()
                message.headers()
            seen += len(batch)
            consumer.commit(asynchronous=False)
            clock.lap()
    finally:
        consumer.close()
    emit(seen, seen, clock.seconds)


if __name__ == "__main__":
    main()
