"""Kafka side: the consumer source and the dead-letter producer."""

from dedupe_consumer.kafka.dead_letters import KafkaDeadLetters
from dedupe_consumer.kafka.source import KafkaSource

__all__ = ["KafkaDeadLetters", "KafkaSource"]
