"""Dead letters to a Kafka topic, durable before the batch that decided them is persisted."""

from __future__ import annotations

from confluent_kafka import KafkaError, Message, Producer

from dedupe_consumer.config import Settings
from dedupe_consumer.dead_letters import DeadLetter, dead_letter_headers
from dedupe_consumer.errors import DeadLetterError
from dedupe_consumer.models import SourceMessage


class KafkaDeadLetters:
    """An idempotent producer (acks=all) to ``processing.dead_letter_topic``."""

    def __init__(self, settings: Settings, flush_timeout_s: float = 30.0) -> None:
        self.topic = settings.processing.dead_letter_topic
        self.flush_timeout_s = flush_timeout_s
        conf: dict[str, str | int | float | bool] = {
            **settings.kafka.connection(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
        conf.update(settings.kafka.producer)
        self._producer = Producer(conf)
        self._failures: list[str] = []
        self._queued = 0

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        kind, ts = message.timestamp()
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=message.value(),
                    key=message.key(),
                    headers=dead_letter_headers(message, letter),
                    timestamp=ts if kind and ts > 0 else 0,
                    on_delivery=self._delivered,
                )
                break
            except BufferError:  # the local queue is full (a burst of poison): drain it
                self._producer.poll(0.1)
        self._queued += 1
        self._producer.poll(0)

    def flush(self) -> None:
        if not self._queued:
            return
        remaining = self._producer.flush(self.flush_timeout_s)
        failures, self._failures = self._failures, []
        self._queued = 0
        if remaining or failures:
            raise DeadLetterError(
                f"{remaining} dead letter(s) still queued and {len(failures)} failed for topic "
                f"{self.topic!r} after {self.flush_timeout_s}s: {failures[:3]}; the batch is not "
                "persisted or committed, so it is redelivered after a restart"
            )

    def close(self) -> None:
        self._producer.flush(self.flush_timeout_s)
