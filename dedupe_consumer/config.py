"""Settings: a TOML file, overridden by ``DEDUPE_*`` environment variables.

``Settings.from_toml(path)`` is the one way in. Each layer reads its own
sections: the engine ``[dedupe]`` and ``[processing]``, the Kafka edge
``[kafka]`` (every client connects through one :class:`KafkaConnection`), and
the sidecar adds ``[sidecar]`` in its own settings type
(:class:`dedupe_consumer.sidecar.settings.SidecarAppSettings`), which this
module does not import. Every section forbids unknown
keys, because a misspelt key that is silently ignored is how a consumer ends up
with a 1-day retention nobody asked for. Errors are collected into a single
:class:`~dedupe_consumer.errors.ConfigError` that names each key, the bad value
and what is accepted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from dedupe_consumer._durations import ACCEPTED as DURATION_FORMS
from dedupe_consumer._durations import Duration
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.ids import ID_SOURCE_FORMS, parse_id_source
from dedupe_consumer.librdkafka import CONSUMER_ONLY, PRODUCER_ONLY, weakened_durability
from dedupe_consumer.redaction import HIDDEN, is_secret_key, redact

LibrdkafkaValue = str | int | float | bool

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")

_toml_file: ContextVar[Path | None] = ContextVar("dedupe_toml_file", default=None)


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError printed as it is never echoes a value;
    # explain() below shows the values that are not secrets.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


ClientRole = Literal["consumer", "producer", "admin"]
"""The kind of librdkafka client a configuration is for."""

_NOT_FOR_ROLE: dict[str, frozenset[str]] = {
    "consumer": PRODUCER_ONLY,
    "producer": CONSUMER_ONLY,
    "admin": CONSUMER_ONLY | PRODUCER_ONLY,
}


def _broker_list(value: str) -> str:
    entries = value.split(",")
    if any(not e or e != e.strip() or any(c.isspace() for c in e) for e in entries):
        raise ValueError(
            f"{value!r} is not a broker list: expected host:port[,host:port...] with no "
            "empty entries or spaces"
        )
    return value


def _misplaced(properties: Iterable[str], role: ClientRole) -> list[str]:
    """The ``properties`` librdkafka scopes to another kind of client than ``role``."""
    return [
        f"{key} (a {'producer' if key in PRODUCER_ONLY else 'consumer'}-only property)"
        for key in sorted(properties)
        if key in _NOT_FOR_ROLE[role]
    ]


class KafkaConnection(_Section):
    """How every Kafka client reaches and authenticates to the brokers.

    ``properties`` are librdkafka's *global* properties: ``security.protocol``,
    ``sasl.*``, ``ssl.*``, ``https.*``, ``client.id``, ``client.dns.lookup``,
    ``socket.*``... (never a consumer-only or producer-only one). Secret values
    are hidden in ``repr``. :meth:`config` gives the configuration of one client.
    """

    bootstrap_servers: str = Field(description="host:port[,host:port...]")
    properties: dict[str, LibrdkafkaValue] = Field(
        default_factory=dict,
        description="librdkafka global properties shared by every client (TLS, SASL, client id)",
    )

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value) if name == "properties" else value

    @field_validator("bootstrap_servers")
    @classmethod
    def _server_list(cls, value: str) -> str:
        return _broker_list(value)

    @field_validator("properties")
    @classmethod
    def _global_only(cls, value: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
        wrong = _misplaced(value, "admin")
        if "bootstrap.servers" in value:
            wrong.insert(0, "bootstrap.servers (give it as bootstrap_servers)")
        if wrong:
            raise ValueError(
                f"not connection properties: {', '.join(wrong)}; give them to the one client "
                "they are for (KafkaConnection.config(role, own))"
            )
        return value

    def config(
        self, role: ClientRole, own: Mapping[str, LibrdkafkaValue] | None = None
    ) -> dict[str, LibrdkafkaValue]:
        """The librdkafka configuration of one client of ``role``.

        ``bootstrap.servers`` and the connection properties, then the client's
        ``own`` properties over them. ``own`` may not hold ``bootstrap.servers`` or a
        property librdkafka scopes to another kind of client (librdkafka would only
        warn and ignore it): ValueError names it.
        """
        own = dict(own or {})
        wrong = _misplaced(own, role)
        if "bootstrap.servers" in own:
            wrong.insert(0, "bootstrap.servers (it comes from the connection)")
        if wrong:
            raise ValueError(f"not for a Kafka {role} client: {', '.join(wrong)}")
        return {**self.properties, **own, "bootstrap.servers": self.bootstrap_servers}


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(description="host:port[,host:port...]")
    group_id: str = Field(min_length=1, description="the consumer group id")
    topics: list[str] = Field(min_length=1, description="a non-empty list of topic names")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="'earliest' or 'latest' (where a group with no commit starts)"
    )
    consumer: dict[str, LibrdkafkaValue] = Field(
        default_factory=dict, description="extra librdkafka consumer properties"
    )
    producer: dict[str, LibrdkafkaValue] = Field(
        default_factory=dict, description="extra librdkafka properties for the dead-letter producer"
    )

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value) if name in ("consumer", "producer") else value

    def connection(self) -> KafkaConnection:
        """How to reach and authenticate to the brokers, for every client we create.

        Connection settings live in ``[kafka.consumer]`` (``security.protocol``,
        ``sasl.*``, ``ssl.*``, ``https.*``, ``client.dns.lookup``...). The main
        consumer, the dead-letter and changelog producers, the restore consumer and
        the admin clients all build their configuration from this one connection
        (:meth:`KafkaConnection.config`): every property set there except the
        consumer-only and producer-only ones (a deny-list, so a global property
        added to librdkafka is carried too).
        """
        shared = {
            k: v
            for k, v in self.consumer.items()
            if k not in CONSUMER_ONLY and k not in PRODUCER_ONLY
        }
        return KafkaConnection(bootstrap_servers=self.bootstrap_servers, properties=shared)

    @field_validator("bootstrap_servers")
    @classmethod
    def _server_list(cls, value: str) -> str:
        return _broker_list(value)

    @field_validator("consumer")
    @classmethod
    def _owned_properties(cls, value: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
        owned = {"enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"}
        clash = sorted(owned & value.keys())
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set here: dedupe_consumer owns offset commits "
                "(commit after persist) and takes group.id/bootstrap.servers from [kafka]"
            )
        return value

    @field_validator("consumer")
    @classmethod
    def _no_producer_properties(
        cls, value: dict[str, LibrdkafkaValue]
    ) -> dict[str, LibrdkafkaValue]:
        wrong = _misplaced(value, "consumer")
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: a consumer ignores it; move it to [kafka.producer] "
                "(the dead-letter and changelog producers)"
            )
        return value

    @field_validator("producer")
    @classmethod
    def _no_consumer_properties(
        cls, value: dict[str, LibrdkafkaValue]
    ) -> dict[str, LibrdkafkaValue]:
        wrong = _misplaced(value, "producer")
        if "bootstrap.servers" in value:
            wrong.insert(0, "bootstrap.servers (set kafka.bootstrap_servers)")
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} cannot be set here: a producer ignores consumer "
                "properties (set them in [kafka.consumer]) and connects to "
                "kafka.bootstrap_servers"
            )
        return value

    @field_validator("producer")
    @classmethod
    def _durable_producer(cls, value: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
        weak = weakened_durability(value)
        if weak:
            raise ValueError(
                f"{', '.join(weak)} cannot be set: the dead-letter and changelog producers "
                "write with acks=all and enable.idempotence=true (a record acknowledged by "
                "the partition leader alone is lost if that broker dies before a follower "
                "copied it); remove it"
            )
        return value

    @field_validator("producer")
    @classmethod
    def _no_transactional_id(cls, value: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
        if "transactional.id" in value:
            raise ValueError(
                "transactional.id cannot be set: the dead-letter producer is not transactional "
                "(its first dead letter would fail outside a transaction) and each changelog "
                "producer gets an id of its own per store; remove it"
            )
        return value

    @field_validator("consumer")
    @classmethod
    def _consumer_protocol(cls, value: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
        # KIP-848: the broker owns these; librdkafka refuses them only when the consumer
        # starts. Refuse them here, with the broker-side setting that replaces each.
        if str(value.get("group.protocol", "classic")).lower() != "consumer":
            return value
        broker_side = {
            "session.timeout.ms": "the broker's group.consumer.session.timeout.ms",
            "heartbeat.interval.ms": "the broker's group.consumer.heartbeat.interval.ms",
            "partition.assignment.strategy": "group.remote.assignor ('uniform' or 'range')",
        }
        clash = [f"{key} (use {broker_side[key]})" for key in broker_side if key in value]
        if clash:
            raise ValueError(
                "with group.protocol = 'consumer' (KIP-848) the group is run by the broker, "
                f"so remove {'; '.join(clash)}, or set group.protocol = 'classic'"
            )
        return value

    @property
    def max_poll_interval_ms(self) -> int:
        """``[kafka.consumer]``'s ``max.poll.interval.ms`` (librdkafka's default: 300000)."""
        return int(self.consumer.get("max.poll.interval.ms", 300_000))

    @property
    def max_message_bytes(self) -> int:
        """``message.max.bytes`` of the producers: ``[kafka.producer]``'s, else the one the
        connection carries from ``[kafka.consumer]``, else librdkafka's 1000000."""
        shared = self.consumer.get("message.max.bytes", 1_000_000)
        return int(self.producer.get("message.max.bytes", shared))


_INTERNAL_SUFFIXES = (".dedupe-changelog", ".dedupe-by-id")
"""Topics of this library's own (a changelog, a by-id topic): no output goes there."""


class DedupeSettings(_Section):
    id_source: str = Field("header:event-id", description=f"one of {ID_SOURCE_FORMS}")
    on_missing_id: Literal["dead-letter", "fail", "hash"] = Field(
        "dead-letter", description="'dead-letter', 'fail' or 'hash'"
    )
    on_conflict: Literal["skip", "dead-letter"] = Field(
        "dead-letter",
        description="'dead-letter' or 'skip' (same ID, different payload: a changed request "
        "goes to a person by default, never silently dropped nor handled twice)",
    )
    retention: Duration = Field(
        timedelta(days=7), description=f"how long an ID is remembered: {DURATION_FORMS}"
    )
    scope: Literal["partition", "topic"] = Field(
        "partition",
        description="'partition' or 'topic': where one success per ID holds. 'partition' "
        "relies on every producer putting an ID on one partition; 'topic' holds across all "
        "partitions of a topic, whatever the producers did, through a by-id topic "
        "(see docs/scope.md)",
    )
    scope_partitions: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="an integer 1..10000: partitions of each by-id topic (scope 'topic'); "
        "unset: as many as the source topic has when the by-id topic is created. Fixed "
        "afterwards: an ID's partition must never move",
    )

    store_responses: bool = Field(
        False,
        description="true or false: keep what handle returns (its response) with the "
        "event's ID record and send it as the reply (see processing.reply_topic); on by "
        "itself with processing.reply_on_duplicate or processing.reply_topic. Off (the "
        "default): return values are ignored and ID records keep their 25-byte format, "
        "which earlier versions read",
    )
    max_response_bytes: int = Field(
        1024,
        ge=0,
        le=512 * 1024,
        description="an integer 0..524288: the largest response a handler may return (its "
        "value, reply topic and key), kept with the event's ID record; a larger one is "
        "refused (the event is dead-lettered, reason 'response-too-large'), never truncated",
    )

    @field_validator("id_source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        parse_id_source(value)
        return value

    @field_validator("retention")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be longer than zero: {DURATION_FORMS}")
        return value

    @model_validator(mode="after")
    def _partitions_with_topic_scope(self) -> DedupeSettings:
        if self.scope_partitions is not None and self.scope != "topic":
            raise ValueError(
                "dedupe.scope_partitions applies only with dedupe.scope = 'topic' (it sizes "
                "the by-id topics): set the scope or remove scope_partitions"
            )
        return self


class PayloadSettings(_Section):
    """What the message values are: raw bytes (the handler's ``parse`` reads them), or
    Confluent Schema Registry wire format decoded once per event."""

    format: Literal["raw", "avro", "protobuf", "json-schema"] = Field(
        "raw",
        description="'raw', 'avro', 'protobuf' or 'json-schema': 'raw' gives the handler the "
        "bytes (its payload_model parses JSON); the others decode Confluent's wire format "
        "(magic byte, schema ID) with the schema from payload.schema_registry_url",
    )
    schema_registry_url: str | None = Field(
        None,
        description="the Schema Registry's URL, e.g. 'http://127.0.0.1:8081' (needed by every "
        "format but 'raw'); credentials go in schema_registry_basic_auth, not in the URL",
    )
    schema_registry_basic_auth: SecretStr | None = Field(
        None, description="'user:password' for the registry's HTTP basic auth (a secret)"
    )
    schema_registry_ca_location: str | None = Field(
        None, description="a CA certificate file (PEM) to verify an https registry with"
    )
    protobuf_message: str | None = Field(
        None,
        description="format 'protobuf': the generated message class, as "
        "'package.module:Message' (importable by the consumer)",
    )
    registry_retry_for: Duration = Field(
        timedelta(seconds=30),
        description=f"{DURATION_FORMS}; how long an unreachable registry (or its 5xx, 408, "
        "429) is retried with backoff before the consumer stops with an error; records are "
        "never dead-lettered because the registry blinked",
    )

    @field_validator("schema_registry_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(  # the value is not repeated: it may hold a token
                "is not an http(s) URL: write it as 'http://host:8081' (or https)"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not carry credentials (user:password@): put them in "
                "payload.schema_registry_basic_auth, which is kept secret"
            )
        return value

    @model_validator(mode="after")
    def _registry_for_formats(self) -> PayloadSettings:
        if self.format != "raw" and self.schema_registry_url is None:
            raise ValueError(
                f"payload.format = {self.format!r} needs payload.schema_registry_url (the "
                "registry that holds the schemas), e.g. 'http://127.0.0.1:8081'"
            )
        if self.format == "protobuf" and self.protobuf_message is None:
            raise ValueError(
                "payload.format = 'protobuf' needs payload.protobuf_message = "
                "'package.module:Message' (the class protoc generated for the topic)"
            )
        if self.format != "protobuf" and self.protobuf_message is not None:
            raise ValueError(
                "payload.protobuf_message applies only with payload.format = 'protobuf': "
                "set the format or remove it"
            )
        if self.format == "raw" and self.schema_registry_url is not None:
            raise ValueError(
                "payload.schema_registry_url is set but payload.format is 'raw': set "
                "payload.format ('avro', 'protobuf' or 'json-schema') or remove the URL"
            )
        return self


class StoreSettings(_Section):
    path: Path = Field(Path("./state"), description="a directory for the RocksDB store")
    block_cache_mb: int = Field(64, ge=1, le=65536, description="an integer 1..65536 (MiB)")
    changelog: bool = Field(
        True,
        description="true or false: mirror decisions to a compacted Kafka topic so partition "
        "state moves with the partition in a consumer group",
    )
    sweep_keys: int = Field(
        2000,
        ge=1,
        description="records the retention sweep examines per idle poll (an integer >= 1)",
    )
    revoked_state_grace: Duration = Field(
        timedelta(hours=1),
        description=f"{DURATION_FORMS}; how long a revoked partition's local state is kept "
        "in case it comes back, before it is dropped (the changelog keeps it; without a "
        "changelog it is kept and swept instead)",
    )


class ProcessingSettings(_Section):
    batch_size: int = Field(500, ge=1, le=100_000, description="an integer 1..100000")
    poll_timeout: Duration = Field(timedelta(seconds=1), description=DURATION_FORMS)
    max_retries: int = Field(3, ge=0, le=100, description="an integer 0..100")
    retry_backoff: Duration = Field(timedelta(milliseconds=200), description=DURATION_FORMS)
    retry_backoff_max: Duration = Field(timedelta(seconds=10), description=DURATION_FORMS)
    dead_letter_topic: str = Field(min_length=1, description="a topic name for dead letters")
    mode: Literal["plain", "claim"] = Field(
        "plain",
        description="'plain' (one synced write per batch) or 'claim' (two; see Concepts, "
        "docs/concepts.md)",
    )
    on_uncertain: Literal["retry", "skip", "dead-letter", "reconcile"] = Field(
        "dead-letter",
        description="'retry', 'skip', 'dead-letter' or 'reconcile' (claim mode: a claim "
        "found in progress after a crash)",
    )
    claim_lease: Duration = Field(
        timedelta(0),
        description=f"{DURATION_FORMS}; an in-progress claim younger than this is waited "
        "out before it is treated as uncertain (fences a zombie previous owner)",
    )
    concurrency: int = Field(
        1,
        ge=1,
        le=1024,
        description="an integer 1..1024: handler calls in flight at once. 1 (the default) "
        "calls the handler for one event at a time, always from the same thread; above 1, "
        "sync handlers are called from that many threads (they must be thread-safe) and "
        "`async def` handlers have that many calls in flight on one event loop",
    )
    ordering: Literal["key", "partition"] = Field(
        "key",
        description="'key' or 'partition': with concurrency above 1, events with the same key "
        "(or, without a key, the same event ID) are handled strictly in offset order and "
        "different keys in parallel ('key'), or each partition strictly in order ('partition')",
    )
    max_unpersisted: int = Field(
        2000,
        ge=1,
        le=1_000_000,
        description="an integer 1..1000000: events decided while the previous write is being "
        "made durable are gathered into the next write (one changelog transaction and one "
        "synced write for all of them); past this many, the consumer waits for the "
        "persister. In plain mode, a kill repeats at most 2 x (max_unpersisted - 1 + "
        "batch_size) handler calls (the write being made durable and the one gathered); 1 "
        "gathers nothing: at most two batches",
    )
    reply_on_duplicate: bool = Field(
        False,
        description="true or false: a duplicate request is answered with its first "
        "response again (byte-identical), sent to the reply topic in the transaction that "
        "commits the duplicate's offset",
    )
    reply_topic: str | None = Field(
        None,
        min_length=1,
        description="a topic name: where a response is sent when the request has no "
        "reply-to header (processing.reply_to_header) and the handler named no topic; "
        "unset: such a response is stored, not sent",
    )
    reply_to_header: str = Field(
        "reply-to",
        min_length=1,
        description="the request header naming the topic its response is sent to",
    )
    correlation_header: str = Field(
        "correlation-id",
        min_length=1,
        description="a request header copied onto its reply (absent: not copied)",
    )
    max_outputs_per_event: int = Field(
        100,
        ge=1,
        le=100_000,
        description="an integer 1..100000: messages one handler call may emit (event.emit); "
        "one more fails the attempt (retried, then dead-lettered as 'output-failed')",
    )
    create_output_topics: bool = Field(
        False,
        description="true or false: an output (event.emit or a reply) to a topic that does "
        "not exist creates it with the broker's default partitions and replication; false "
        "(the default): the attempt fails, then the event is dead-lettered ('output-failed')",
    )
    on_offset_regression: Literal["fail", "reset"] = Field(
        "fail",
        description="'fail' or 'reset': what to do when a partition's offsets went back below "
        "its stored watermark (the topic was recreated or truncated); 'reset' starts the "
        "partition's watermark over and keeps decided IDs",
    )


class ObservabilitySettings(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="'debug', 'info', 'warning' or 'error'"
    )
    log_format: Literal["console", "json"] = Field("console", description="'console' or 'json'")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a TCP port 0..65535 for /metrics on metrics_host (0: any free port), or "
        "unset: no endpoint (the default; `dedupe-consumer sidecar` serves /metrics with its "
        "probes instead)",
    )
    progress_interval: Duration = Field(
        timedelta(seconds=60),
        description=f"{DURATION_FORMS}; how often `run` and the sidecar log a 'progress' line "
        "with the totals and rates since the last one; '0s' turns it off",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="an IP address or host name to serve /metrics on: '127.0.0.1' (default) "
        "for this machine only, '0.0.0.0' to let Prometheus scrape a pod",
    )

    @field_validator("metrics_host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOST_NAME.fullmatch(value):
                raise ValueError(
                    f"{value!r} is not an IP address or host name (no scheme, no port): "
                    "e.g. '127.0.0.1' or '0.0.0.0'"
                ) from None
        return value


_TRACING_ENDPOINT = re.compile(
    r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/\S*)?"
)
"""``http(s)://host[:port][/path]``: what the OTLP/HTTP exporter can post to."""


def _valid_endpoint(url: str) -> bool:
    if not _TRACING_ENDPOINT.fullmatch(url):
        return False
    try:
        return (urlsplit(url).port or 1) <= 65535
    except ValueError:  # a port over 65535
        return False


class TracingSettings(_Section):
    """``[tracing]``: OpenTelemetry spans, one per decided event (the ``otel`` extra)."""

    enabled: bool = Field(
        False,
        description="true or false (default); true needs the otel extra: "
        "pip install 'dedupe-consumer[otel]'",
    )
    exporter: Literal["otlp", "console", "none"] = Field(
        "otlp",
        description="'otlp' (OTLP over HTTP/protobuf, the default), 'console' (spans as "
        "JSON on stdout) or 'none' (spans made and propagated, not exported); ignored when "
        "the process already set a global TracerProvider, which is used instead",
    )
    endpoint: str | None = Field(
        None,
        description="the OTLP/HTTP traces URL, e.g. 'http://127.0.0.1:4318/v1/traces'; unset: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + '/v1/traces', "
        "else 'http://localhost:4318/v1/traces'",
    )
    service_name: str | None = Field(
        None,
        min_length=1,
        description="the service.name resource attribute; unset: OTEL_SERVICE_NAME, else "
        "'dedupe-consumer'",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="a number 0..1: the share of traces started here that are recorded (a "
        "traceparent from the producer decides for its own trace)",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not _valid_endpoint(value):
            raise ValueError(
                f"{redact(value)!r} is not an http:// or https:// URL: set tracing.endpoint to the "
                "collector's OTLP/HTTP traces URL, e.g. 'http://127.0.0.1:4318/v1/traces' "
                "(the OTLP/HTTP port is 4318; 4317 is gRPC, which is not supported)"
            )
        return value


class Settings(BaseSettings):
    """All settings of one consumer. Build it with :meth:`from_toml` or keyword arguments.

    A command that reads more sections subclasses it (the sidecar's
    ``SidecarAppSettings`` adds ``[sidecar]``); ``from_toml`` and ``load`` then
    return that type.
    """

    model_config = SettingsConfigDict(
        env_prefix="DEDUPE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)  # type: ignore[arg-type]
    store: StoreSettings = Field(default_factory=StoreSettings)  # type: ignore[arg-type]
    payload: PayloadSettings = Field(default_factory=PayloadSettings)  # type: ignore[arg-type]
    processing: ProcessingSettings
    observability: ObservabilitySettings = Field(
        default_factory=ObservabilitySettings  # type: ignore[arg-type]
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings  # type: ignore[arg-type]
    )

    # Sections this type refuses, and the command whose settings read them (for the error).
    _other_commands_sections: ClassVar[Mapping[str, str]] = {
        "sidecar": "`dedupe-consumer sidecar` and `run` read it; in Python, load the file with "
        "dedupe_consumer.sidecar.settings.SidecarAppSettings"
    }

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.processing.retry_backoff > self.processing.retry_backoff_max:
            raise ValueError(
                "processing.retry_backoff must not exceed processing.retry_backoff_max"
            )
        if self.processing.dead_letter_topic in self.kafka.topics:
            raise ValueError(
                "processing.dead_letter_topic must differ from every kafka.topics entry, "
                "or dead letters would be consumed again"
            )
        return self

    @model_validator(mode="after")
    def _field_ids_need_records(self) -> Self:
        spec = self.dedupe.id_source
        if spec.startswith("field:") and self.payload.format == "raw":
            raise ValueError(
                f"dedupe.id_source = {spec!r} reads a field of the decoded record: set "
                "payload.format ('avro', 'protobuf' or 'json-schema'); for a plain JSON value "
                f"use 'json:{spec.removeprefix('field:')}'"
            )
        return self

    @model_validator(mode="after")
    def _replies_are_outputs(self) -> Self:
        processing = self.processing
        asked = [
            name
            for name, on in (
                ("processing.reply_on_duplicate = true", processing.reply_on_duplicate),
                ("processing.reply_topic", processing.reply_topic is not None),
            )
            if on
        ]
        if asked and not self.store.changelog:
            raise ValueError(
                f"{' and '.join(asked)} need store.changelog = true: a reply is produced in "
                "the Kafka transaction that persists its event's decision, which is the "
                "changelog's. Set store.changelog = true or remove them"
            )
        reply_topic = processing.reply_topic
        if reply_topic is not None and (
            reply_topic == processing.dead_letter_topic or reply_topic in self.kafka.topics
        ):
            raise ValueError(
                f"processing.reply_topic {reply_topic!r} is a topic this consumer reads or "
                "dead-letters to: replies would be consumed again; name another topic"
            )
        if reply_topic is not None and (
            reply_topic.startswith("__") or reply_topic.endswith(_INTERNAL_SUFFIXES)
        ):
            raise ValueError(
                f"processing.reply_topic {reply_topic!r} is an internal topic (Kafka's own, "
                "'__...', or a changelog or by-id topic of this library): no output may go "
                "there; name another topic"
            )
        return self

    @model_validator(mode="after")
    def _no_partition_order_in_topic_scope(self) -> Self:
        if self.dedupe.scope == "topic" and self.processing.ordering == "partition":
            raise ValueError(
                "processing.ordering = 'partition' cannot hold with dedupe.scope = 'topic': "
                "the hop spreads each source partition over the by-id topic by event ID, so "
                "events are in order per ID only (docs/scope.md). Use ordering = 'key' (the "
                "default) or dedupe.scope = 'partition'"
            )
        return self

    @model_validator(mode="after")
    def _claim_lease_within_poll_interval(self) -> Self:
        # A young claim is waited out on the polling thread; a lease as long as the poll
        # interval could never be waited out in one batch (the walk is cut at its budget).
        if self.processing.mode != "claim":
            return self
        try:
            interval_ms = self.kafka.max_poll_interval_ms
        except ValueError:
            return self  # librdkafka names the bad value itself
        lease_ms = self.processing.claim_lease.total_seconds() * 1000
        if lease_ms >= interval_ms:
            raise ValueError(
                f"processing.claim_lease ({lease_ms / 1000:g}s) must be shorter than "
                f"kafka.consumer.'max.poll.interval.ms' ({interval_ms} ms): the lease is waited "
                "out between two polls; lower processing.claim_lease or raise "
                "max.poll.interval.ms"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _toml_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Self:
        """Load ``path``, apply ``DEDUPE_*`` env overrides, then keyword ``overrides``.

        Raises :class:`ConfigError` with one line per problem.
        """
        toml_path = Path(path)
        if not toml_path.is_file():
            raise ConfigError(f"config file {str(toml_path)!r} does not exist or is not a file")
        try:
            with toml_path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_path}: not valid TOML: {exc}") from exc
        token = _toml_file.set(toml_path)
        try:
            return cls.load(where=str(toml_path), **overrides)
        finally:
            _toml_file.reset(token)

    @classmethod
    def load(cls, *, where: str = "settings", **values: Any) -> Self:
        """Build from keyword values plus env, turning validation errors into ConfigError."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(explain(exc, where, cls)) from None
        except SettingsError as exc:  # a DEDUPE_* variable for a table that is not JSON
            raise ConfigError(_explain_env(exc, where)) from None


def _explain_env(exc: SettingsError, where: str) -> str:
    """Name the ``DEDUPE_*`` variables that should hold JSON and do not (values not shown)."""
    broken = []
    for name, text in sorted(os.environ.items()):
        if name.upper().startswith("DEDUPE_") and text.lstrip().startswith(("{", "[")):
            try:
                json.loads(text)
            except ValueError as error:
                broken.append(f"  - {name}: not valid JSON ({error})")
    lines = [f"invalid configuration in {where} (DEDUPE_* environment variables included):"]
    lines += broken or [f"  - {exc}"]
    lines.append(
        "  a DEDUPE_* variable that sets a whole table must hold a JSON object, e.g. "
        'DEDUPE_KAFKA__CONSUMER=\'{"sasl.username": "alice"}\''
    )
    return "\n".join(lines)


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The settings model behind a field's annotation, looking through ``X | None``."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_help(loc: tuple[int | str, ...], root: type[BaseModel]) -> str | None:
    model: type[BaseModel] | None = root
    description = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        description = info.description
        model = _section_model(info.annotation)
    return description


def _section_keys(loc: tuple[int | str, ...], root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        info = model.model_fields.get(str(part)) if model is not None else None
        model = _section_model(info.annotation) if info is not None else None
    return sorted(model.model_fields) if model is not None else []


def explain(exc: ValidationError, where: str, root: type[Settings] | None = None) -> str:
    """One line per error: key, bad value, what is accepted (keys of ``root``, or Settings)."""
    root = root or Settings
    lines = [f"invalid configuration in {where} (DEDUPE_* environment variables included):"]
    seen: set[str] = set()
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if p not in ("function-after",))
        kind = error["type"]
        if _is_librdkafka_value(loc):  # one line, not one per member of the value union
            loc, kind = loc[:-1], "librdkafka_value"
        key = ".".join(str(p) for p in loc) or "(top level)"
        secret = any(is_secret_key(str(p)) for p in loc)
        value = HIDDEN if secret else redact(error.get("input"))
        value_text = value if secret else repr(value)
        if kind == "librdkafka_value":
            if key not in seen:
                seen.add(key)
                lines.append(
                    f"  - {key} = {value_text}: expected a string, number or boolean "
                    "(a librdkafka property value)"
                )
            continue
        if kind == "extra_forbidden":
            accepted = ", ".join(_section_keys(loc, root)) or "none"
            # No value: a mis-spelt key may be a secret's ("bearer_tokn").
            line = f"  - {key}: unknown key; accepted keys here: {accepted}"
            command = root._other_commands_sections.get(key)
            if command is not None:
                line += f" ([{key}]: {command}; or remove the section)"
            lines.append(line)
            continue
        if kind == "missing":
            help_text = _field_help(loc, root)
            hint = f": set it to {help_text}" if help_text else ""
            lines.append(f"  - {key}: required but missing{hint}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        raw = error.get("input")
        if secret and isinstance(raw, str) and len(raw) >= 4:
            message = message.replace(raw, HIDDEN)  # a message that quotes its input
        help_text = _field_help(loc, root)
        own_words = kind == "value_error"  # our validators already say what is accepted
        accepted = f" (accepted: {help_text})" if help_text and not own_words else ""
        shown = "" if isinstance(value, dict) else f" = {value_text}"
        lines.append(f"  - {key}{shown}: {message}{accepted}")
    return "\n".join(lines)


def _is_librdkafka_value(loc: tuple[int | str, ...]) -> bool:
    """``kafka.consumer.<property>.<str|int|float|bool>``: one member of LibrdkafkaValue."""
    return (
        len(loc) == 4
        and loc[:2] in (("kafka", "consumer"), ("kafka", "producer"))
        and loc[3] in ("str", "int", "float", "bool")
    )
