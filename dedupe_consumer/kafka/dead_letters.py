"""Dead letters to a Kafka topic, durable before the batch that decided them is persisted."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from dedupe_consumer.config import Settings
from dedupe_consumer.dead_letters import DeadLetter, dead_letter_headers
from dedupe_consumer.errors import DeadLetterError
from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.kafka.topics import ensure_dead_letter_topic
from dedupe_consumer.librdkafka import DURABLE_PRODUCER
from dedupe_consumer.models import SourceMessage, as_bytes

log = structlog.get_logger("dedupe_consumer.dead_letters")

_Where = tuple[str, int, int]
"""The source message a letter is for: (topic, partition, offset)."""


_LAST_SHRINK = 2
"""0: the whole letter; 1: without the value; 2: without value, key and original headers."""


def _where(message: SourceMessage) -> _Where:
    return (message.topic() or "", message.partition() or 0, message.offset() or 0)


class KafkaDeadLetters:
    """An idempotent producer (acks=all) to ``processing.dead_letter_topic``.

    A letter the topic refuses as too large (``MSG_SIZE_TOO_LARGE``, locally or from
    the broker) is sent again without its value, with ``dlq.value.omitted =
    "too-large"`` and ``dlq.value.size``: its ``dlq.original.*`` headers say where
    the value still is. Refused again (a huge key or headers), it goes a last time
    with only the ``dlq.*`` headers (``dlq.key.omitted``, ``dlq.headers.omitted``).
    Any other failure names the source messages whose letters were lost
    (:attr:`DeadLetterError.failed`).
    """

    def __init__(
        self,
        settings: Settings,
        flush_timeout_s: float = 30.0,
        topic_timeout_s: float = 30.0,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        # Sized like the source, logged; not waited for past a stop asked for meanwhile.
        ensure_dead_letter_topic(settings, topic_timeout_s, stopping=stopping)
        self.topic = settings.processing.dead_letter_topic
        self.flush_timeout_s = flush_timeout_s
        conf: dict[str, str | int | float | bool] = {
            **settings.kafka.connection().config("producer"),
            "linger.ms": 5,
        }
        conf.update(settings.kafka.producer)
        conf.update(DURABLE_PRODUCER)  # [kafka.producer] may not weaken it (see config)
        self._producer = Producer({**conf, **kafka_log_config()})
        self._pending: dict[_Where, tuple[SourceMessage, DeadLetter, int]] = {}
        """Letters not yet delivered, with how much was left out (see ``_SHRINKS``)."""
        self._failures: dict[_Where, str] = {}
        self._too_large: list[_Where] = []
        self._lock = threading.RLock()
        """Handler threads send while a persist flushes: a letter sent during a flush
        must not be counted lost by it (nor slip out of its bookkeeping)."""

    def _on_delivery(self, where: _Where) -> Callable[[KafkaError | None, Message], None]:
        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is None:
                self._pending.pop(where, None)
                self._failures.pop(where, None)
                return
            entry = self._pending.get(where)
            too_large = error.code() == KafkaError.MSG_SIZE_TOO_LARGE
            if entry is not None and too_large and entry[2] < _LAST_SHRINK:
                self._too_large.append(where)  # the broker's limit: resent smaller
            else:
                self._failures[where] = f"{message.topic()}: {error}"

        return delivered

    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        with self._lock:
            self._produce(message, letter, shrink=0)

    def _produce(self, message: SourceMessage, letter: DeadLetter, *, shrink: int) -> None:
        kind, ts = message.timestamp()
        value = as_bytes(message.value())
        where = _where(message)
        self._pending[where] = (message, letter, shrink)
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=None if shrink else value,
                    key=None if shrink == _LAST_SHRINK else message.key(),
                    headers=dead_letter_headers(
                        message,
                        letter,
                        value_omitted=len(value or b"") if shrink else None,
                        originals_omitted=shrink == _LAST_SHRINK,
                    ),
                    timestamp=ts if kind and ts > 0 else 0,
                    on_delivery=self._on_delivery(where),
                )
                break
            except BufferError:  # the local queue is full (a burst of poison): drain it
                self._producer.poll(0.1)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and shrink < _LAST_SHRINK:
                    self._shrink(where, str(error))
                    return
                del self._pending[where]
                raise DeadLetterError(
                    f"cannot send a dead letter for {where[0]}[{where[1]}]@{where[2]} to topic "
                    f"{self.topic!r}: {error}",
                    (where,),
                ) from exc
        self._producer.poll(0)

    def _shrink(self, where: _Where, why: str) -> None:
        """Send the letter again with less: first without the value, then with only ours."""
        message, letter, shrink = self._pending[where]
        log.warning(
            "dead_letter_value_omitted" if shrink == 0 else "dead_letter_originals_omitted",
            topic=where[0],
            partition=where[1],
            offset=where[2],
            value_bytes=len(as_bytes(message.value()) or b""),
            key_bytes=len(as_bytes(message.key()) or b""),
            dead_letter_topic=self.topic,
            error=why,
        )
        self._produce(message, letter, shrink=shrink + 1)

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        remaining = self._producer.flush(self.flush_timeout_s)
        while self._too_large and not remaining:
            too_large, self._too_large = self._too_large, []
            for where in too_large:
                self._shrink(where, "MSG_SIZE_TOO_LARGE from the broker")
            remaining = self._producer.flush(self.flush_timeout_s)
        lost, self._pending = self._pending, {}
        failures, self._failures = self._failures, {}
        self._too_large = []
        if lost:
            raise DeadLetterError(
                f"{remaining} dead letter(s) still queued and {len(failures)} failed for topic "
                f"{self.topic!r} after {self.flush_timeout_s}s: {list(failures.values())[:3]}; "
                "the decisions before the first of them are persisted, the rest are not, so "
                "they are redelivered after a restart",
                tuple(sorted(lost)),
            )

    def close(self) -> None:
        self._producer.flush(self.flush_timeout_s)
