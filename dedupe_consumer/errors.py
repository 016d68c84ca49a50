"""Every error the library raises on purpose.

They live in one module so users can ``except dedupe_consumer.DedupeError`` and
so that the handler-facing ones (:class:`RetryableError`, :class:`PermanentError`)
are importable without pulling in Kafka or RocksDB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dedupe_consumer.models import TopicPartition


class DedupeError(Exception):
    """Base class of every error dedupe_consumer raises itself."""


class ConfigError(DedupeError):
    """Settings are unusable; raised at start-up, before anything is consumed."""


class NotAuthorizedError(ConfigError):
    """The brokers refuse this consumer's principal a right it needs (an ACL is missing).

    Raised at start-up, by the checks that ask the brokers what the principal may
    do, and while running when a right is taken away (the consumer stops). The
    message names the operation, the resource and the ``kafka-acls`` command
    that grants it; the attributes say the same for programs.
    """

    def __init__(
        self, message: str, operation: str = "", resource_type: str = "", resource: str = ""
    ) -> None:
        super().__init__(message)
        self.operation = operation
        """The ACL operation missing, as Kafka names it: ``READ``, ``WRITE``, ``CREATE``..."""
        self.resource_type = resource_type
        """``topic``, ``group``, ``transactional id`` or ``cluster``."""
        self.resource = resource
        """The resource's name (a prefix for a transactional id)."""


class StoreError(DedupeError):
    """The processed-ID store cannot be opened or written."""


class StoreLockedError(StoreError):
    """Another process holds the store: two writers would corrupt the dedupe state."""


class NotOwnerError(StoreError):
    """The group fenced this instance's changelog transaction: its partitions have moved.

    The transaction is aborted, so none of its records or offsets are visible;
    the batch is not persisted locally either. Not fatal: the rebalance goes on.
    """


class DeadLetterError(DedupeError):
    """A dead-letter record could not be made durable.

    ``failed`` names the source messages (topic, partition, offset) whose letters
    were lost: the engine persists the decisions before the first of them and stops.
    """

    def __init__(self, message: str, failed: tuple[tuple[str, int, int], ...] = ()) -> None:
        super().__init__(message)
        self.failed = failed


class OffsetRegressionError(DedupeError):
    """A partition's offsets went back below its watermark (topic recreated or truncated).

    Raised at assignment with ``processing.on_offset_regression = "fail"``: new events
    at reused offsets would otherwise be taken for replays and never handled.
    """


class CommitError(DedupeError):
    """A source could not commit offsets: this commit, or an earlier one that failed
    since. Never fatal.

    The offsets are durable already (the watermark in the store covers them,
    invariant 2), so the source keeps them and commits them again later: with
    the next batch or idle poll, before their partition is revoked, at close.
    ``code`` names the cause as the source reported it (e.g. a Kafka error name);
    ``offsets`` are the ones that failed, when the source knows.
    """

    def __init__(
        self,
        message: str,
        code: str = "",
        offsets: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.offsets = dict(offsets or {})


class SchemaRegistryUnavailableError(DedupeError):
    """The Schema Registry could not be reached (or kept failing) for longer than
    ``payload.registry_retry_for``, or refused this consumer's credentials: the
    consumer stops; nothing past the last decided event is committed."""


class RegistryWaitStopped(SchemaRegistryUnavailableError):
    """The consumer was asked to stop (SIGTERM) while it waited for the Schema Registry:
    the event is left undecided, read again after the restart."""


class MissingEventIdError(DedupeError):
    """An event has no usable ID and ``on_missing_id = "fail"`` asks us to stop."""


class HandlerError(DedupeError):
    """Base of the exceptions a handler raises to steer retries."""


class RetryableError(HandlerError):
    """A transient failure: the engine retries the event with backoff.

    ``retry_after``: seconds the downstream asked to wait (an HTTP ``Retry-After``,
    a rate limiter's hint). The next attempt waits at least that long, up to
    ``processing.retry_backoff_max``; like every backoff, the wait holds only the
    event's key and ends at once on a stop or a revocation.
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class PermanentError(HandlerError):
    """The event can never succeed: it goes straight to the dead-letter topic."""
