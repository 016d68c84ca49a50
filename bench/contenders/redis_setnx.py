"""Redis ``SET <id> 1 NX EX <ttl>`` per message: the most common hand-written dedupe.

One blocking round trip per message to a private, loopback redis-server with
persistence off (the fastest Redis can be; it is also not durable, which the
README's table notes). The TTL is dedupe_consumer's default retention.
"""

from __future__ import annotations

import redis

from bench.child import emit, parse_args
from bench.contenders._handwritten import consume_loop

TTL_SECONDS = 7 * 24 * 3600


def main() -> None:
    args = parse_args(__doc__ or "", "redis-url")
    client = redis.Redis.from_url(args.redis_url)
    client.ping()

    def is_new(event_id: str) -> bool:
        return bool(client.set(event_id, b"1", nx=True, ex=TTL_SECONDS))

    try:
        consumed, handled, seconds = consume_loop(args, is_new)
    finally:
        client.close()
    emit(consumed, handled, seconds)


if __name__ == "__main__":
    main()
