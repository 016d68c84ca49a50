"""A changelog offset answered without a value (-1001, as a moving leader may answer)
is asked again, never taken for an empty or recreated log (broker-fault finding)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.errors import StoreError
from dedupe_consumer.kafka.changelog import Changelog


class _Admin:
    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.asked = 0

    def list_offsets(self, request: dict[Any, Any], **_: Any) -> dict[Any, Future[Any]]:
        self.asked += 1
        future: Future[Any] = Future()
        offset = self.answers.pop(0) if self.answers else -1001
        future.set_result(SimpleNamespace(offset=offset))
        return {next(iter(request)): future}

    def list_topics(self, *_: Any, **__: Any) -> None:
        return None


class _Consumer:
    def __init__(self, answers: list[int]) -> None:
        self.answers = answers

    def get_watermark_offsets(self, *_: Any, **__: Any) -> tuple[int, int]:
        low = self.answers.pop(0) if self.answers else -1001
        return low, 0


def _changelog(admin: _Admin, timeout_s: float = 5.0) -> Changelog:
    changelog = object.__new__(Changelog)
    changelog._admin = admin  # type: ignore[assignment]
    changelog.timeout_s = timeout_s
    return changelog


KTP = KafkaTopicPartition("g.orders.dedupe-changelog", 0)


def test_an_end_answered_without_an_offset_is_asked_again() -> None:
    admin = _Admin([-1001, -1001, 10947])
    assert _changelog(admin)._high(KTP) == 10947
    assert admin.asked == 3


def test_an_end_never_answered_is_an_error_not_an_empty_log() -> None:
    with pytest.raises(StoreError, match="no offset"):
        _changelog(_Admin([]), timeout_s=0.5)._high(KTP)


def test_a_start_answered_without_an_offset_is_asked_again() -> None:
    changelog = _changelog(_Admin([]))
    consumer = _Consumer([-1001, 42])
    assert changelog._low(consumer, KTP) == 42  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="no offset"):
        _changelog(_Admin([]), timeout_s=0.5)._low(_Consumer([]), KTP)  # type: ignore[arg-type]
