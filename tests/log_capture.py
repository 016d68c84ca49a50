"""Capture structlog events whatever level an earlier test configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog


@contextmanager
def captured_logs() -> Iterator[list[Any]]:
    """``structlog.testing.capture_logs`` at debug level (the demo, say, sets 'warning')."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)
