"""structlog set-up: console for people, JSON for log pipelines.

Both formats are safe for any value a log call passes, because log lines carry
data from the outside (event IDs, error messages):

* JSON never raises: keys that are not strings (a ``TopicPartition``) become
  strings, values JSON cannot hold become their ``str()``. A log line must
  never be what stops a consumer.
* The console escapes control characters the way ``repr`` does (``\\n``,
  ``\\x1b``...), so an ID with a newline or an ANSI escape cannot forge a log
  line or repaint the terminal. Tracebacks keep their line breaks.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from dedupe_consumer.observability.tracing import add_trace_ids

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the
# bidirectional overrides and isolates that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MULTILINE_KEYS = ("exception", "stack")
"""Tracebacks: their line breaks are ours, the rest of them is escaped."""


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters written as ``repr`` would write them."""
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escape_char, text)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class _Shown:
    """A value already rendered: the console renderer's ``repr()`` returns it as is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


_COLUMNS = ("timestamp", "level", "event", "logger", "logger_name")
"""Printed with ``str()`` by the console renderer, unquoted."""
_QUOTED = re.compile("[ \t=\r\n\"']")
"""Strings the console renderer shows quoted, by ``repr()``."""


def _escape_for_console(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """A processor for the console renderer: every key and value without raw controls.

    A value is shown as the renderer shows it (a plain word bare, anything else by
    ``repr``), but a string with a non-printable character is always quoted and
    escaped, and a ``repr`` that lets control characters through is escaped too.
    """
    out: EventDict = {}
    for key, value in event_dict.items():
        shown: object
        if key in _MULTILINE_KEYS and isinstance(value, str):
            shown = escape_controls(value, keep_newlines=True)
        elif key in _COLUMNS:
            shown = escape_controls(value if isinstance(value, str) else _text(value))
        elif isinstance(value, str) and value.isprintable() and not _QUOTED.search(value):
            shown = value
        else:
            shown = _Shown(escape_controls(_safe_repr(value)))
        out[escape_controls(str(key))] = shown
    return out


def _jsonable(value: object, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN is not JSON
    if depth < 16:
        if isinstance(value, dict):
            return {
                k if isinstance(k, str) else _text(k): _jsonable(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [_jsonable(v, depth + 1) for v in value]
    return _text(value)


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def json_dumps(event_dict: object, **kwargs: Any) -> str:
    """``json.dumps`` that never raises: what JSON cannot hold is written as text."""
    kwargs.pop("default", None)
    try:
        return json.dumps(_jsonable(event_dict), default=_text, **kwargs)
    except Exception as exc:  # a value whose str() lies about itself, say
        return json.dumps({"event": "log_render_failed", "error": _text(exc)})


def _stderr_logger(*args: object) -> structlog.PrintLogger:
    # Resolve sys.stderr per logger, not once: a test runner may swap and close the
    # stream it had when configure_logging ran.
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog globally; logs go to stderr so stdout stays for reports."""
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.JSONRenderer(serializer=json_dumps)]
        if fmt == "json"
        else [_escape_for_console, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_ids,  # trace_id, span_id: with tracing on, in an event's span
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
