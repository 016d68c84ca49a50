"""Kafka side: the consumer source, the dead-letter producer, and the edges built of them."""

from dedupe_consumer.kafka.dead_letters import KafkaDeadLetters
from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.kafka.wiring import edges

__all__ = ["KafkaDeadLetters", "KafkaSource", "edges"]
