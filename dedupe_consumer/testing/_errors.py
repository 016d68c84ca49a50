"""What the broker and schema registry providers raise, and how they quote a tool's output."""

from __future__ import annotations

from typing import Final

__all__ = ["BrokerUnavailableError", "SchemaRegistryStartError", "output_tail"]

TAIL_CHARS: Final = 4000
"""How much of a tool's output or a log an error message quotes."""


class BrokerUnavailableError(RuntimeError):
    """No real Kafka broker could be had; the message says why, provider by provider."""


class SchemaRegistryStartError(RuntimeError):
    """The local schema registry could not be fetched or started; the message says which step
    failed and quotes its output or log."""


def output_tail(text: str, limit: int = TAIL_CHARS) -> str:
    """The end of a tool's output, for an error message: the error is usually last."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
