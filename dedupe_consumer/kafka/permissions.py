"""Does this consumer's principal have the rights it needs? Asked once, at start-up.

On a cluster with ACLs, a missing right otherwise shows late and unclearly: a
consumer without READ on its group retries its JoinGroup forever, a dead-letter
topic it may not write fails the first poison event hours later, a changelog
topic it may not create fails the first assignment. So before anything is
opened, :func:`check_permissions` asks the brokers (DescribeTopics and
DescribeGroups with their authorized operations; a validate-only CreateTopics
for topics still to be made) and raises :class:`NotAuthorizedError` naming each
missing right, its resource and the ``kafka-acls`` command that grants it.
Two or three requests, answered in well under a second.

What these requests cannot ask (WRITE on the transactional id) is found by the
changelog producer's ``init_transactions`` at start-up; a right taken away
while running is found by the consumer's poll. Both map the broker's answer
with :func:`not_authorized`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Final

import structlog
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # admin re-exports it without __all__

from dedupe_consumer.config import KafkaConnection, Settings
from dedupe_consumer.errors import ConfigError, NotAuthorizedError
from dedupe_consumer.kafka.logs import kafka_error_fields, kafka_log_config
from dedupe_consumer.kafka.topics import controller_known
from dedupe_consumer.redaction import HIDDEN, is_secret_key, redact
from dedupe_consumer.scope import stage_settings
from dedupe_consumer.store.changelog_codec import changelog_topic

log = structlog.get_logger("dedupe_consumer.permissions")

AUTHORIZATION_FAILED: Final = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)
"""The broker's answers that mean "an ACL is missing": waiting does not change them."""

_TRANSIENT: Final = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.REQUEST_TIMED_OUT,
    }
)
"""Answers worth asking again (a coordinator moving or loading, a broker starting)."""

_ACL_OPERATION: Final = {
    "READ": "Read",
    "WRITE": "Write",
    "CREATE": "Create",
    "DESCRIBE": "Describe",
    "DESCRIBE_CONFIGS": "DescribeConfigs",
    "ALTER_CONFIGS": "AlterConfigs",
    "IDEMPOTENT_WRITE": "IdempotentWrite",
}
"""Kafka's operation names (as in the broker's answers) → ``kafka-acls --operation``."""

_ACL_RESOURCE: Final = {
    "topic": "--topic",
    "group": "--group",
    "transactional id": "--transactional-id",
    "cluster": "--cluster",
}


_CONSUME: Final = "consume it (kafka.topics)"
"""A source topic's purpose: one that does not exist is not ours to create."""


@dataclass(frozen=True)
class Right:
    """One ACL operation on one resource, and what the consumer needs it for."""

    operation: str
    resource_type: str
    name: str
    purpose: str
    prefixed: bool = False
    """``name`` is a prefix (the changelog producer's transactional ids)."""

    def resource(self) -> str:
        if self.resource_type == "cluster":
            return "the cluster"
        if self.prefixed:
            return f"{self.resource_type}s starting with {self.name!r}"
        return f"{self.resource_type} {self.name!r}"

    def acl_target(self) -> str:
        """The resource as ``kafka-acls.sh`` options (``--topic NAME``...)."""
        target = _ACL_RESOURCE[self.resource_type]
        if self.resource_type != "cluster":
            target += f" {self.name}"
        if self.prefixed:
            target += " --resource-pattern-type prefixed"
        return target


def acl_commands(rights: Iterable[Right], principal: str | None) -> list[str]:
    """The ``kafka-acls.sh`` commands granting ``rights``: one per resource (run with an
    admin's credentials)."""
    operations: dict[str, list[str]] = {}
    for right in rights:
        operation = _ACL_OPERATION.get(right.operation, right.operation)
        operations.setdefault(right.acl_target(), []).append(f"--operation {operation}")
    return [
        "kafka-acls.sh --bootstrap-server <brokers> --command-config <admin.properties> "
        f"--add --allow-principal {principal or 'User:<consumer>'} "
        f"{' '.join(dict.fromkeys(ops))} {target}"
        for target, ops in operations.items()
    ]


def principal_of(properties: Mapping[str, object]) -> str | None:
    """``User:<sasl.username>`` of a connection's properties; None without SASL user."""
    name = properties.get("sasl.username")
    return f"User:{name}" if name else None


def not_authorized(
    missing: Iterable[Right], principal: str | None, answer: str
) -> NotAuthorizedError:
    """The error naming every missing right, its resource and the command that grants it.

    ``answer`` is what the broker said (an error name); the first right is the
    error's ``operation`` / ``resource_type`` / ``resource``.
    """
    rights = list(dict.fromkeys(missing))
    if not rights:
        raise ValueError("not_authorized needs at least one missing right")
    who = principal or "this consumer's principal"
    lacks = "; ".join(f"{r.operation} on {r.resource()}, to {r.purpose}" for r in rights)
    grants = "; ".join(acl_commands(rights, principal))
    first = rights[0]
    return NotAuthorizedError(
        f"{who} is not authorized: it lacks {lacks}. The broker answered {answer}. "
        f"Grant {'it' if len(rights) == 1 else 'them'} (docs/operations.md, "
        f"'Secured clusters'): {grants}",
        operation=first.operation,
        resource_type=first.resource_type,
        resource=first.name,
    )


def _answers(futures: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Each future's result, or the KafkaError it failed with (``_TIMED_OUT`` if none came)."""
    answers: dict[str, Any] = {}
    for name, future in futures.items():
        try:
            answers[name] = future.result(timeout=timeout_s)
        except KafkaException as exc:
            answers[name] = exc.args[0] if exc.args else KafkaError(KafkaError._FAIL)
        except FutureTimeout:
            answers[name] = KafkaError(KafkaError._TIMED_OUT)
    return answers


def _operations(answer: Any) -> set[str] | None:
    operations = getattr(answer, "authorized_operations", None)
    if operations is None:
        return None  # the broker did not say (too old): not checked
    return {op.name for op in operations}


def required_rights(settings: Settings) -> tuple[dict[str, list[Right]], dict[str, list[Right]]]:
    """``(topics, groups)``: the rights the consumer needs on each, by resource name.

    The transactional id's (``WRITE``, prefixed ``dedupe-consumer.<group>.``) is not
    among them: no admin request can ask for it (see the module's docstring).
    """
    stage = stage_settings(settings) if settings.dedupe.scope == "topic" else settings
    topics: dict[str, list[Right]] = {}
    groups: dict[str, list[Right]] = {}

    def need(table: dict[str, list[Right]], right: Right) -> None:
        table.setdefault(right.name, []).append(right)

    for kafka in {id(k): k for k in (settings.kafka, stage.kafka)}.values():
        for topic in kafka.topics:
            need(topics, Right("READ", "topic", topic, _CONSUME))
        need(groups, Right("READ", "group", kafka.group_id, "join the group (kafka.group_id)"))
    dead_letters = settings.processing.dead_letter_topic
    need(
        topics,
        Right(
            "WRITE",
            "topic",
            dead_letters,
            "write dead letters to it (processing.dead_letter_topic)",
        ),
    )
    if settings.store.changelog:
        for topic in stage.kafka.topics:
            name = changelog_topic(stage.kafka.group_id, topic)
            purpose = f"keep the changelog of {topic!r} (store.changelog)"
            for operation in ("READ", "WRITE", "DESCRIBE_CONFIGS"):
                need(topics, Right(operation, "topic", name, purpose))
    return topics, groups


_CONNECTION_REFUSALS: Final = {
    KafkaError._AUTHENTICATION: (
        "sasl.username / sasl.password / sasl.mechanism",
        "check the user, its password and the mechanism the listener takes",
    ),
    KafkaError._SSL: (
        "ssl.ca.location (or security.protocol)",
        "point ssl.ca.location at the CA that signed the brokers' certificates, and check "
        "that the listener speaks TLS",
    ),
}
"""librdkafka's connection errors that retrying does not cure: the setting to look at."""


def _admin_client(settings: Settings, refusals: list[KafkaError]) -> AdminClient:
    """The check's admin client. Its error callback keeps authentication and TLS
    failures, which librdkafka otherwise retries silently for ever. A setting
    librdkafka refuses outright (an ``ssl.ca.location`` file that does not exist)
    is a configuration error naming it, not a traceback."""

    def on_error(error: KafkaError) -> None:
        if error.code() in _CONNECTION_REFUSALS:
            refusals.append(error)

    try:
        return AdminClient(
            {
                **settings.kafka.connection().config("admin"),
                **kafka_log_config(),
                "error_cb": on_error,  # type: ignore[dict-item]  # a callable, as librdkafka takes
            }
        )
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        reason = _scrub(error.str() if error is not None else str(exc), settings)
        raise ConfigError(
            f"kafka: librdkafka refused the connection settings: {reason}. Fix the "
            "property it names in [kafka] (a file path that must exist, say)"
        ) from None


def _raise_refused_connection(refusals: list[KafkaError], settings: Settings) -> None:
    """The brokers could not be asked because they refused the connection: say why."""
    if not refusals:
        return
    error = refusals[-1]
    setting, fix = _CONNECTION_REFUSALS[error.code()]
    who = principal_of(settings.kafka.connection().properties)
    raise ConfigError(
        f"kafka: the brokers refused the connection of {who} ({error.name()}: "
        f"{_scrub(error.str(), settings)}). Look at {setting}: {fix}"
    )


def _scrub(text: str, settings: Settings) -> str:
    """``text`` (librdkafka's) with every secret of the connection's settings hidden."""
    for name, value in settings.kafka.connection().config("admin").items():
        if is_secret_key(str(name)) and str(value) and str(value) in text:
            text = text.replace(str(value), HIDDEN)
    return str(redact(text))


def check_permissions(
    settings: Settings,
    *,
    timeout_s: float = 5.0,
    admin: Any = None,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Raise :class:`NotAuthorizedError` when the principal lacks a right it needs.

    Checked: READ on the source topics and the group, WRITE on
    ``processing.dead_letter_topic``, READ/WRITE/DESCRIBE_CONFIGS on the changelog
    topics (``store.changelog``), and CREATE for those of them that do not exist
    yet. What the brokers do not answer within ``timeout_s`` (or before
    ``stopping()``) is logged as unchecked and left to the clients, which report
    their own errors.
    """
    topics, groups = required_rights(settings)
    principal = principal_of(settings.kafka.connection().properties)
    refusals: list[KafkaError] = []  # the brokers' refusals of the connection itself
    if admin is None:
        admin = _admin_client(settings, refusals)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            break
        except KafkaException as exc:
            with contextlib.suppress(AttributeError):  # a test's stand-in has no poll
                admin.poll(0)  # serves the error callback (authentication, TLS)
            if time.monotonic() >= deadline or (stopping is not None and stopping()):
                _raise_refused_connection(refusals, settings)
                log.warning(
                    "permissions_unchecked",
                    **kafka_error_fields(exc),
                    consequence="a missing right shows when the consumer first uses it",
                )
                return
    if not controller_known(metadata):
        return  # no admin request would be answered (librdkafka's mock cluster, for one)
    missing: list[Right] = []
    answers: list[str] = []
    to_create: dict[str, list[Right]] = {}
    open_topics, open_groups = list(topics), list(groups)
    while open_topics or open_groups:
        wait = max(0.2, min(2.0, deadline - time.monotonic()))
        described = (
            admin.describe_topics(
                TopicCollection(open_topics),
                include_authorized_operations=True,
                request_timeout=wait,
            )
            if open_topics
            else {}
        )
        members = (
            admin.describe_consumer_groups(
                open_groups, include_authorized_operations=True, request_timeout=wait
            )
            if open_groups
            else {}
        )
        topic_answers = _answers(described, wait + 1)
        group_answers = _answers(members, wait + 1)
        open_topics, open_groups = [], []
        for table, found, still in (
            (topics, topic_answers, open_topics),
            (groups, group_answers, open_groups),
        ):
            for name, answer in found.items():
                rights = table[name]
                if isinstance(answer, KafkaError):
                    code = answer.code()
                    if table is groups and code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                        # KIP-848's ConsumerGroupDescribe: another member subscribes to
                        # a topic this principal may not describe. Not a right of ours
                        # missing: the group's own answer (its join) decides.
                        log.warning("permissions_unchecked", resource=name, error=answer.str())
                    elif code in AUTHORIZATION_FAILED:
                        missing.extend(rights)
                        answers.append(answer.name())
                    elif code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        # Ours to create (a dead-letter or changelog topic): may we?
                        if all(r.purpose != _CONSUME for r in rights):
                            to_create[name] = rights
                    elif code in _TRANSIENT:
                        still.append(name)
                    else:
                        log.warning("permissions_unchecked", resource=name, error=answer.str())
                    continue
                operations = _operations(answer)
                if operations is None:
                    continue
                lacking = [r for r in rights if r.operation not in operations]
                if lacking:
                    missing.extend(lacking)
                    answers.append(f"authorized operations {sorted(operations)}")
        if (open_topics or open_groups) and (
            time.monotonic() >= deadline or (stopping is not None and stopping())
        ):
            log.warning(
                "permissions_unchecked",
                resources=open_topics + open_groups,
                error="the brokers did not answer in time",
                consequence="a missing right shows when the consumer first uses it",
            )
            break
        if open_topics or open_groups:
            time.sleep(0.2)
    if to_create:
        missing.extend(_creatable(admin, to_create, answers))
    if missing:
        raise not_authorized(missing, principal, ", ".join(dict.fromkeys(answers)))


def _creatable(admin: Any, topics: Mapping[str, list[Right]], answers: list[str]) -> list[Right]:
    """CREATE rights missing for ``topics`` (they do not exist): a validate-only create."""
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=-1, replication_factor=-1) for name in topics],
        validate_only=True,
        request_timeout=5.0,
    )
    missing: list[Right] = []
    for name, answer in _answers(futures, 6.0).items():
        if isinstance(answer, KafkaError) and answer.code() in AUTHORIZATION_FAILED:
            purpose = topics[name][0].purpose
            missing.append(Right("CREATE", "topic", name, f"{purpose}; it does not exist yet"))
            answers.append(f"{answer.name()} to a validate-only CreateTopics")
    return missing


def _answer(error: KafkaError) -> str:
    return f"{error.name()} ({error.str()})"


def transaction_refused(
    error: KafkaError,
    connection: KafkaConnection,
    transactional_id: str,
    group_id: str,
    topics: Sequence[str] = (),
) -> NotAuthorizedError:
    """The changelog producer's ``init_transactions`` or a transaction was refused.

    The library's transactional ids are ``dedupe-consumer.<group>.<instance>``, one
    per store: the right to grant is on their prefix. ``topics``: what the refused
    transaction wrote to (its changelog topics and outputs), for a refused topic.
    """
    prefix = f"dedupe-consumer.{group_id}."
    prefixed = transactional_id.startswith(prefix)
    purpose = "run the changelog's transactions (store.changelog)"
    code = error.code()
    if code == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        rights = [Right("IDEMPOTENT_WRITE", "cluster", "kafka-cluster", purpose)]
    elif code == KafkaError.GROUP_AUTHORIZATION_FAILED:
        rights = [
            Right("READ", "group", group_id, "commit offsets in the changelog's transactions")
        ]
    elif code == KafkaError.TOPIC_AUTHORIZATION_FAILED and topics:
        why = "write the batch in one transaction (one of these topics refused it)"
        rights = [Right("WRITE", "topic", topic, why) for topic in topics]
    else:
        name = prefix if prefixed else transactional_id
        rights = [Right("WRITE", "transactional id", name, purpose, prefixed=prefixed)]
    return not_authorized(rights, principal_of(connection.properties), _answer(error))


def consuming_refused(
    error: KafkaError, settings: Settings, topic: str | None
) -> NotAuthorizedError:
    """The consumer was refused while subscribing or fetching (an ACL missing or removed).

    librdkafka reports these as errors of a poll and keeps retrying; the consumer
    stops instead, as the Java consumer's ``poll()`` throws.
    """
    kafka = settings.kafka
    code = error.code()
    if code == KafkaError.GROUP_AUTHORIZATION_FAILED:
        rights = [Right("READ", "group", kafka.group_id, "join the group (kafka.group_id)")]
    elif code == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        rights = [Right("DESCRIBE", "cluster", "kafka-cluster", "consume")]
    else:
        rights = [Right("READ", "topic", t, _CONSUME) for t in ([topic] if topic else kafka.topics)]
    return not_authorized(rights, principal_of(kafka.connection().properties), _answer(error))
