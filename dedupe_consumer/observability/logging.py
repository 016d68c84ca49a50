"""structlog set-up: console for people, JSON for log pipelines."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _stderr_logger(*args: object) -> structlog.PrintLogger:
    # Resolve sys.stderr per logger, not once: a test runner may swap and close the
    # stream it had when configure_logging ran.
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog globally; logs go to stderr so stdout stays for reports."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
