"""What the broker providers raise, and how they quote a tool's output in it."""

from __future__ import annotations

from typing import Final

__all__ = ["BrokerUnavailableError", "output_tail"]

TAIL_CHARS: Final = 4000
"""How much of a tool's output or a log an error message quotes."""


class BrokerUnavailableError(RuntimeError):
    """No real Kafka broker could be had; the message says why, provider by provider."""


def output_tail(text: str, limit: int = TAIL_CHARS) -> str:
    """The end of a tool's output, for an error message: the error is usually last."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
