"""The sidecar's settings: the consumer's, plus ``[sidecar]`` (where to POST, retry, listen).

:class:`SidecarAppSettings` is what ``dedupe-consumer sidecar`` loads: the core
:class:`~dedupe_consumer.config.Settings` plus the optional ``[sidecar]``
section (:class:`SidecarSettings`). The dependency points one way: this module
imports :mod:`dedupe_consumer.config`, never the reverse, so the core settings
know nothing of the sidecar. Durations come from ``_durations`` like the core
ones, so they are written and rejected exactly alike (``"200ms"``, ``"10s"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import BeforeValidator

from dedupe_consumer._durations import ACCEPTED as DURATION_FORMS
from dedupe_consumer._durations import Duration
from dedupe_consumer.config import Settings
from dedupe_consumer.redaction import redact

STATUS_FORMS = "a list of HTTP status codes (e.g. 404) or classes (e.g. '4xx'), not 2xx"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP header name (RFC 9110 ``token``)."""
_FIELD_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
"""Printable ASCII without edge spaces: survives any HTTP stack unchanged."""


def _status_pattern(value: object) -> str:
    """Normalise ``404``, ``"404"`` or ``"4xx"`` to ``"404"`` / ``"4xx"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected {STATUS_FORMS}")
    text = str(value).strip().lower()
    if re.fullmatch(r"[1-5]xx", text) is None and not (
        text.isdigit() and len(text) == 3 and 100 <= int(text) <= 599
    ):
        raise ValueError(f"bad status {value!r}: expected {STATUS_FORMS}")
    if text.startswith("2"):
        raise ValueError(f"status {value!r} is a success; expected {STATUS_FORMS}")
    return text


StatusPattern = Annotated[str, BeforeValidator(_status_pattern)]


def status_matches(status: int, patterns: tuple[str, ...]) -> bool:
    """Whether ``status`` is one of ``patterns`` (exact codes or ``Nxx`` classes)."""
    code = str(status)
    return any(p == code or (p.endswith("xx") and p[0] == code[0]) for p in patterns)


class SidecarSettings(BaseModel):
    """``[sidecar]``: deliver each unique event once to a local HTTP endpoint.

    ``max_retries``, ``retry_backoff`` and ``retry_backoff_max`` replace the
    ``[processing]`` keys of the same names in sidecar mode: the engine's own
    retry loop does the retrying (see :mod:`dedupe_consumer.sidecar.runner`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    target_url: str = Field(
        description="an http:// or https:// URL that receives one POST per unique event, "
        "e.g. 'http://127.0.0.1:8080/events'"
    )
    timeout: Duration = Field(
        timedelta(seconds=10),
        description=f"the limit on each of connect, send and wait for the answer, above zero: "
        f"{DURATION_FORMS}",
    )
    max_retries: int = Field(
        10,
        ge=0,
        le=100,
        description="an integer 0..100: retries after the first attempt for 5xx, 408, 429 and "
        "connection errors, before the event is dead-lettered (replaces processing.max_retries)",
    )
    retry_backoff: Duration = Field(
        timedelta(milliseconds=200),
        description=f"the first retry's delay, doubled each retry: {DURATION_FORMS}",
    )
    retry_backoff_max: Duration = Field(
        timedelta(seconds=10),
        description=f"the longest delay between retries, also the cap on Retry-After: "
        f"{DURATION_FORMS}",
    )
    permanent_statuses: tuple[StatusPattern, ...] = Field(
        ("4xx",),
        description=f"{STATUS_FORMS}: answers that can never succeed, dead-lettered at once",
    )
    retryable_statuses: tuple[StatusPattern, ...] = Field(
        ("408", "429"),
        description=f"{STATUS_FORMS}: retried even when permanent_statuses matches them "
        "(every other non-2xx answer is retried too)",
    )
    bearer_token: SecretStr | None = Field(
        None,
        description="a token sent as 'Authorization: Bearer <token>' (printable ASCII), "
        "or unset; prefer the DEDUPE_SIDECAR__BEARER_TOKEN environment variable",
    )
    content_type: str = Field(
        "application/octet-stream",
        description="a media type sent as Content-Type when the event has no "
        "'content-type' Kafka header, e.g. 'application/json'",
    )
    header_prefix: str = Field(
        "Kafka-Header-",
        description="a non-empty HTTP header name prefix for forwarded Kafka headers "
        "(letters, digits and !#$%&'*+-.^_`|~)",
    )
    listen_host: str = Field(
        "127.0.0.1",
        description="an address for /healthz, /readyz and /metrics; '0.0.0.0' to let "
        "Kubernetes probes and Prometheus reach them",
    )
    listen_port: int = Field(
        9400, ge=0, le=65535, description="a TCP port 0..65535 (0: any free port)"
    )

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value) if name == "target_url" else value  # user:password@

    @field_validator("target_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        expected = (
            "expected an http:// or https:// URL with a host and, if given, a port "
            "1..65535, e.g. 'http://127.0.0.1:8080/events'"
        )
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"the scheme must be http:// or https://; {expected}")
        if not parts.hostname:
            raise ValueError(f"the URL has no host; {expected}")
        try:
            port = parts.port
        except ValueError:  # not a number, or above 65535
            port = 0
        if port == 0:
            raise ValueError(f"bad port; {expected}")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be longer than zero: {DURATION_FORMS}")
        return value

    @field_validator("bearer_token")
    @classmethod
    def _header_safe_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and _FIELD_VALUE.fullmatch(value.get_secret_value()) is None:
            raise ValueError(
                "the bearer token must be non-empty printable ASCII without edge spaces "
                "(it is sent in an HTTP header); a token read from a mounted file often ends "
                "in a newline: strip it, e.g. $(tr -d '\\n' < /path/to/token)"
            )
        return value

    @field_validator("content_type")
    @classmethod
    def _header_safe_type(cls, value: str) -> str:
        if _FIELD_VALUE.fullmatch(value) is None:
            raise ValueError(
                f"bad content_type {value!r}: expected a media type in printable ASCII, "
                "e.g. 'application/json'"
            )
        return value

    @field_validator("header_prefix")
    @classmethod
    def _token(cls, value: str) -> str:
        if _TOKEN.fullmatch(value) is None:
            raise ValueError(
                f"bad header_prefix {value!r}: expected a non-empty HTTP header name prefix "
                "(letters, digits and !#$%&'*+-.^_`|~), e.g. 'Kafka-Header-'"
            )
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> SidecarSettings:
        if self.retry_backoff > self.retry_backoff_max:
            raise ValueError("sidecar.retry_backoff must not exceed sidecar.retry_backoff_max")
        return self

    def is_permanent(self, status: int) -> bool:
        """A non-2xx answer that retrying cannot fix: dead-letter it."""
        return status_matches(status, self.permanent_statuses) and not status_matches(
            status, self.retryable_statuses
        )


SIDECAR_CONCURRENCY = 32
"""``processing.concurrency`` in sidecar mode when no setting gives it.

The sidecar's handler is ``async def`` on an ``aiohttp`` session of ours, and
its target is an HTTP server, concurrent by nature: 32 POSTs in flight hide a
target's latency (2 ms each: room for 16,000/s, far above what one core can
POST) without flooding it. Events of one key (or, without a key, one
event ID) are still delivered in offset order (``processing.ordering = "key"``);
an explicit ``concurrency`` (file, ``DEDUPE_PROCESSING__CONCURRENCY`` or keyword),
``1`` included, is kept.
"""


class SidecarAppSettings(Settings):
    """All settings of one sidecar: the consumer's sections plus ``[sidecar]``.

    ``[sidecar]`` is optional here so that a file without it reaches the runner,
    which says what to add (:func:`dedupe_consumer.sidecar.runner.sidecar_settings`).
    ``processing.concurrency`` defaults to :data:`SIDECAR_CONCURRENCY` here, not 1.
    """

    sidecar: SidecarSettings | None = Field(
        None, description="a [sidecar] section (only `dedupe-consumer sidecar` reads it), or unset"
    )

    _other_commands_sections: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _sidecar_concurrency(cls, data: Any) -> Any:
        """Default ``processing.concurrency`` to :data:`SIDECAR_CONCURRENCY` when no source set it.

        Runs on the values merged from keywords, ``DEDUPE_*`` variables and the file,
        so a key given by any of them is in the ``processing`` table here. (A
        ``ProcessingSettings`` object passed as a keyword arrives dumped with all its
        fields, so it keeps its own ``concurrency``, 1 unless it says otherwise.)
        """
        if not isinstance(data, Mapping):
            return data
        processing = data.get("processing")
        if isinstance(processing, Mapping) and "concurrency" not in processing:
            return {**data, "processing": {**processing, "concurrency": SIDECAR_CONCURRENCY}}
        return data
