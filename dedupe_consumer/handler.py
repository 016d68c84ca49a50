"""The user's side of the contract: subclass :class:`Handler`, implement ``handle``."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from dedupe_consumer.errors import PermanentError, RetryableError
from dedupe_consumer.models import Event
from dedupe_consumer.store.base import Response

__all__ = ["Handler", "PermanentError", "Response", "RetryableError"]


class Handler:
    """Called once per unseen event ID: in partition order at the default
    ``processing.concurrency = 1``; above it, in offset order per key (or per
    partition, ``processing.ordering = "partition"``), on several threads.
    ``handle``, ``reconcile``, ``setup`` and ``teardown`` may be ``async def``
    (awaited on one event loop); ``parse`` may not.

    ``handle`` returning normally means the effect happened. It may return a
    response (bytes, str, a pydantic model or :class:`Response`): it is kept with
    the event's ID record, sent as the reply when the request names a reply topic,
    and given to ``on_duplicate`` (see :mod:`dedupe_consumer.responses`). Raise
    :class:`RetryableError` for a transient failure (retried with backoff, as is
    any unexpected exception) and :class:`PermanentError` when retrying cannot
    help (the event goes to the dead-letter topic). Use ``event.id`` as the
    idempotency key of any external call: it closes the one window plain mode
    leaves open (a crash between your effect and the store write).
    """

    payload_model: ClassVar[type[BaseModel] | None] = None
    """If set, each value is parsed into this model first; a value that does not
    validate is dead-lettered with reason ``invalid-payload`` and never retried."""

    def setup(self) -> None:
        """Called once before the first event (open connections here, not in ``__init__``)."""

    def handle(self, event: Event) -> object:
        raise NotImplementedError(f"{type(self).__name__} must implement handle(event)")

    def reconcile(self, event: Event) -> object:
        """Claim mode, ``on_uncertain = "reconcile"``: did this event's effect happen?

        Called for an event whose claim was found in progress after a crash. Ask
        the downstream system (by ``event.id``): True means it happened (recorded
        as handled, no call), False means it did not (``handle`` is called). With
        responses on, return the response instead of True (even an empty one): it
        is stored and sent as the reply, which the crash kept from being sent.
        ``event.payload`` is parsed as for ``handle``; what ``event.stage`` writes
        here is committed only when this returns True. An exception is retried like
        one from ``handle``, then the event is dead-lettered (``reconcile-failed``).
        """
        raise NotImplementedError

    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        """Called for each duplicate of a handled event (default: nothing), with the
        response ``handle`` returned for it (None when it returned none, or when the
        first event is still being decided). Not called for a replay of an offset
        already committed, nor for a conflict (same ID, another payload).

        Runs on the consuming thread, once per duplicate delivered (again if the
        process dies before the duplicate's offset is committed): keep it quick and
        idempotent. ``event.payload`` is not parsed. An exception is logged
        (``on_duplicate_failed``); the duplicate is skipped all the same. To answer
        duplicates on Kafka, set ``processing.reply_on_duplicate`` instead: that reply
        is sent exactly once per duplicate, in the transaction.
        """

    def teardown(self) -> None:
        """Called once after the last batch was persisted and committed."""

    def parse(self, value: bytes | None) -> Any:
        """Parse the raw value into ``payload_model``.

        Raising marks the value invalid: it is dead-lettered (``invalid-payload``,
        the exception class in ``dlq.error.class``) and never retried.
        """
        if self.payload_model is None:
            return None
        if value is None:
            raise ValueError("value is absent but the handler declares a payload_model")
        return self.payload_model.model_validate_json(value)

    def validate(self, record: Any) -> Any:
        """Turn a decoded record into the payload: ``payload_model.model_validate(record)``,
        or the record itself without a model.

        Called instead of :meth:`parse` when the value was decoded for it
        (``payload.format`` 'avro', 'protobuf' or 'json-schema', or a structured
        CloudEvent's JSON data): a dict, or a protobuf message (validated from its
        fields). Raising marks the value invalid, as for :meth:`parse`.
        """
        if self.payload_model is None:
            return record
        if hasattr(record, "DESCRIPTOR"):  # a protobuf message: its fields, by name
            from dedupe_consumer.payloads import proto_dict

            record = proto_dict(record)
        return self.payload_model.model_validate(record)
