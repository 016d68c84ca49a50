"""librdkafka's own log lines, routed through structlog.

Without a ``logger``, librdkafka writes ``%4|1700000000.123|GETPID|rdkafka#consumer-1|
...`` straight to the process's stderr: not JSON, not filtered by level, and
mixed into the structured log stream. Every client the library creates merges
:func:`kafka_log_config` into its configuration; confluent-kafka then hands each
line to a :class:`logging.Logger` whose one handler re-logs it with structlog as
``librdkafka`` with plain fields (``facility``, ``client``, ``message``).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException

_log = structlog.get_logger("dedupe_consumer.librdkafka")


class _ToStructlog(logging.Handler):
    """confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client, text)``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            args = record.args if isinstance(record.args, tuple) else ()
            if len(args) == 3:
                facility, client, text = (str(a) for a in args)
            else:
                facility, client, text = "", "", record.getMessage()
            level = logging.getLevelName(record.levelno).lower()
            level = {"critical": "error", "notset": "debug"}.get(level, level)
            if level not in ("debug", "info", "warning", "error"):
                level = "warning"
            getattr(_log, level)("librdkafka", facility=facility, client=client, message=text)
        except Exception:  # a log line must never take a client down
            self.handleError(record)


def _bridge() -> logging.Logger:
    logger = logging.getLogger("dedupe_consumer.librdkafka")
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())
    logger.setLevel(logging.DEBUG)  # librdkafka's log_level / debug decide what is produced
    logger.propagate = False  # structlog renders it; the root logger must not print it again
    return logger


def kafka_log_config() -> dict[str, Any]:
    """Merge into every confluent-kafka client's config: its logs go through structlog."""
    return {"logger": _bridge()}


def kafka_error_fields(error: BaseException | KafkaError) -> dict[str, str]:
    """``error`` and ``error_code`` as plain text, not ``KafkaError{code=...,val=...}`` reprs."""
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        error = error.args[0]
    if isinstance(error, KafkaError):
        return {"error": error.str(), "error_code": error.name()}
    return {"error": str(error), "error_code": type(error).__name__}


def plain_offset(offset: int | None) -> int | None:
    """An offset to log: librdkafka's negative markers (``-1001`` and co.) become ``None``."""
    return offset if offset is not None and offset >= 0 else None
