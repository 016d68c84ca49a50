"""The start-up permission check and the mapping of the brokers' authorization errors.

A fake admin client answers as a broker with ACLs does (measured on Kafka 4.1 with
the StandardAuthorizer, tests/integration/test_secured_cluster.py): a topic or group
the principal may not even describe fails with *_AUTHORIZATION_FAILED, one it may
describe lists its authorized operations, a missing topic it may describe is
UNKNOWN_TOPIC_OR_PART.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AclOperation  # type: ignore[attr-defined]  # public

from dedupe_consumer import ConfigError, NotAuthorizedError, Settings
from dedupe_consumer.kafka.permissions import (
    Right,
    check_permissions,
    consuming_refused,
    not_authorized,
    transaction_refused,
)
from dedupe_consumer.store.changelog_codec import changelog_topic

from .conftest import TOPIC, make_settings

ALL = [AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE_CONFIGS]
Answer = list[AclOperation] | int | None
"""Authorized operations, a KafkaError code, or None (the broker did not say)."""


def answered(answer: Answer) -> Future[Any]:
    future: Future[Any] = Future()
    if isinstance(answer, int):
        future.set_exception(KafkaException(KafkaError(answer)))
    else:
        future.set_result(SimpleNamespace(authorized_operations=answer))
    return future


class FakeAdmin:
    """Answers DescribeTopics / DescribeGroups / validate-only CreateTopics from tables;
    a callable answer is asked for each request (to change between attempts)."""

    def __init__(
        self,
        topics: Mapping[str, Answer | Callable[[], Answer]] | None = None,
        groups: Mapping[str, Answer | Callable[[], Answer]] | None = None,
        creatable: Iterable[str] = (),
        controller: bool = True,
        reachable: bool = True,
    ) -> None:
        self.topics = dict(topics or {})
        self.groups = dict(groups or {})
        self.creatable = set(creatable)
        self.controller = controller
        self.reachable = reachable
        self.validated: list[str] = []

    def list_topics(self, timeout: float) -> Any:
        if not self.reachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return SimpleNamespace(controller_id=1 if self.controller else 7, brokers={1: None})

    @staticmethod
    def _answer(table: Mapping[str, Any], name: str) -> Future[Any]:
        answer = table.get(name, ALL)
        return answered(answer() if callable(answer) else answer)

    def describe_topics(self, topics: Any, **_: Any) -> dict[str, Future[Any]]:
        return {name: self._answer(self.topics, name) for name in topics.topic_names}

    def describe_consumer_groups(self, groups: list[str], **_: Any) -> dict[str, Future[Any]]:
        return {name: self._answer(self.groups, name) for name in groups}

    def create_topics(self, new: list[Any], validate_only: bool, **_: Any) -> dict[str, Any]:
        assert validate_only, "the check never creates a topic"
        self.validated += [t.topic for t in new]
        return {
            t.topic: answered(
                [] if t.topic in self.creatable else KafkaError.TOPIC_AUTHORIZATION_FAILED
            )
            for t in new
        }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path,
        kafka={
            "consumer": {
                "security.protocol": "SASL_SSL",
                "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "payments-consumer",
                "sasl.password": "hunter2-not-shown",
            }
        },
        store={"changelog": True},
    )


def refusal(settings: Settings, admin: FakeAdmin) -> NotAuthorizedError:
    with pytest.raises(NotAuthorizedError) as caught:
        check_permissions(settings, admin=admin, timeout_s=2.0)
    assert "hunter2-not-shown" not in str(caught.value)
    return caught.value


def test_every_right_granted_passes(settings: Settings) -> None:
    check_permissions(settings, admin=FakeAdmin(), timeout_s=2.0)


def test_a_broker_that_does_not_say_what_is_authorized_is_not_checked(
    settings: Settings,
) -> None:
    admin = FakeAdmin(topics={TOPIC: None, "payments.dlq": None}, groups={"g": None})
    check_permissions(settings, admin=admin, timeout_s=2.0)


def test_no_read_on_the_group_names_it_and_the_acl_that_grants_it(settings: Settings) -> None:
    error = refusal(settings, FakeAdmin(groups={"g": KafkaError.GROUP_AUTHORIZATION_FAILED}))
    assert isinstance(error, ConfigError)  # exit 2 from the CLI
    assert (error.operation, error.resource_type, error.resource) == ("READ", "group", "g")
    assert "User:payments-consumer is not authorized: it lacks READ on group 'g'" in str(error)
    assert "GROUP_AUTHORIZATION_FAILED" in str(error)
    assert "--add --allow-principal User:payments-consumer --operation Read --group g" in str(error)


def test_a_group_with_members_on_topics_it_may_not_describe_is_not_refused(
    settings: Settings,
) -> None:
    """KIP-848's ConsumerGroupDescribe answers TOPIC_AUTHORIZATION_FAILED for the group
    when another member subscribes to a topic this principal may not describe
    (measured on Kafka 4.1): no right of this consumer's is missing."""
    admin = FakeAdmin(groups={"g": KafkaError.TOPIC_AUTHORIZATION_FAILED})
    check_permissions(settings, admin=admin, timeout_s=2.0)


def test_describe_without_read_on_the_group_is_refused_too(settings: Settings) -> None:
    error = refusal(settings, FakeAdmin(groups={"g": [AclOperation.DESCRIBE]}))
    assert "READ on group 'g'" in str(error)
    assert "authorized operations ['DESCRIBE']" in str(error)


def test_a_dead_letter_topic_it_may_not_write(settings: Settings) -> None:
    error = refusal(settings, FakeAdmin(topics={"payments.dlq": [AclOperation.DESCRIBE]}))
    assert "WRITE on topic 'payments.dlq'" in str(error)
    assert "--operation Write --topic payments.dlq" in str(error)


def test_a_hidden_dead_letter_topic_is_refused_as_unwritable(settings: Settings) -> None:
    error = refusal(
        settings, FakeAdmin(topics={"payments.dlq": KafkaError.TOPIC_AUTHORIZATION_FAILED})
    )
    assert "WRITE on topic 'payments.dlq'" in str(error)


def test_a_missing_changelog_topic_it_may_not_create(settings: Settings) -> None:
    changelog = changelog_topic("g", TOPIC)
    admin = FakeAdmin(topics={changelog: KafkaError.UNKNOWN_TOPIC_OR_PART})
    error = refusal(settings, admin)
    assert admin.validated == [changelog]
    assert f"CREATE on topic {changelog!r}" in str(error)
    assert "validate-only CreateTopics" in str(error)


def test_a_missing_changelog_topic_it_may_create_passes(settings: Settings) -> None:
    changelog = changelog_topic("g", TOPIC)
    admin = FakeAdmin(topics={changelog: KafkaError.UNKNOWN_TOPIC_OR_PART}, creatable=[changelog])
    check_permissions(settings, admin=admin, timeout_s=2.0)
    assert admin.validated == [changelog]


def test_a_missing_source_topic_is_not_ours_to_create(settings: Settings) -> None:
    admin = FakeAdmin(topics={TOPIC: KafkaError.UNKNOWN_TOPIC_OR_PART})
    check_permissions(settings, admin=admin, timeout_s=2.0)
    assert admin.validated == []


def test_without_a_changelog_its_topics_are_not_checked(tmp_path: Path) -> None:
    plain = make_settings(tmp_path, store={"changelog": False})
    changelog = changelog_topic("g", TOPIC)
    check_permissions(
        plain,
        admin=FakeAdmin(topics={changelog: KafkaError.TOPIC_AUTHORIZATION_FAILED}),
        timeout_s=2.0,
    )


def test_every_missing_right_is_named_at_once(settings: Settings) -> None:
    changelog = changelog_topic("g", TOPIC)
    error = refusal(
        settings,
        FakeAdmin(
            topics={TOPIC: [AclOperation.DESCRIBE], changelog: [AclOperation.READ]},
            groups={"g": KafkaError.GROUP_AUTHORIZATION_FAILED},
        ),
    )
    text = str(error)
    for lacking in (
        f"READ on topic {TOPIC!r}",
        f"WRITE on topic {changelog!r}",
        f"DESCRIBE_CONFIGS on topic {changelog!r}",
        "READ on group 'g'",
    ):
        assert lacking in text
    assert "Grant them" in text
    # One command per resource, with each operation it lacks there.
    assert (
        f"--operation Write --operation DescribeConfigs --topic {changelog}; kafka-acls.sh" in text
    )


def test_a_coordinator_still_loading_is_asked_again(settings: Settings) -> None:
    answers: Iterator[Answer] = iter([KafkaError.NOT_COORDINATOR, [AclOperation.DESCRIBE]])
    error = refusal(settings, FakeAdmin(groups={"g": lambda: next(answers)}))
    assert "READ on group 'g'" in str(error)


def test_brokers_that_do_not_answer_leave_it_unchecked_in_bounded_time(
    settings: Settings,
) -> None:
    import time

    started = time.monotonic()
    check_permissions(settings, admin=FakeAdmin(reachable=False), timeout_s=0.5)
    check_permissions(
        settings,
        admin=FakeAdmin(groups={"g": KafkaError.NOT_COORDINATOR}),
        timeout_s=0.5,
    )
    assert time.monotonic() - started < 5


def test_a_stop_during_start_up_ends_the_wait(settings: Settings) -> None:
    import time

    started = time.monotonic()
    check_permissions(
        settings, admin=FakeAdmin(reachable=False), timeout_s=30.0, stopping=lambda: True
    )
    assert time.monotonic() - started < 2


def test_a_cluster_without_a_live_controller_is_not_asked(settings: Settings) -> None:
    admin = FakeAdmin(controller=False, groups={"g": KafkaError.GROUP_AUTHORIZATION_FAILED})
    check_permissions(settings, admin=admin, timeout_s=2.0)


def test_the_transactional_id_refused_names_the_prefix(settings: Settings) -> None:
    error = transaction_refused(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
        settings.kafka.connection(),
        "dedupe-consumer.g.7f3a",
        "g",
    )
    assert (error.operation, error.resource_type, error.resource) == (
        "WRITE",
        "transactional id",
        "dedupe-consumer.g.",
    )
    assert "WRITE on transactional ids starting with 'dedupe-consumer.g.'" in str(error)
    assert (
        "--operation Write --transactional-id dedupe-consumer.g. --resource-pattern-type prefixed"
        in str(error)
    )


def test_a_transaction_refused_while_running_names_its_topics_or_the_group(
    settings: Settings,
) -> None:
    connection = settings.kafka.connection()
    topic = transaction_refused(
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        connection,
        "dedupe-consumer.g.7f3a",
        "g",
        ["g.payments.1.dedupe-changelog"],
    )
    assert "WRITE on topic 'g.payments.1.dedupe-changelog'" in str(topic)
    group = transaction_refused(
        KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED), connection, "x", "g"
    )
    assert "READ on group 'g'" in str(group)
    literal = transaction_refused(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), connection, "mine", "g"
    )
    assert "WRITE on transactional id 'mine'" in str(literal)
    assert "--transactional-id mine --" not in str(literal)  # not prefixed


def test_a_fetch_refused_while_running_names_the_topic(settings: Settings) -> None:
    error = consuming_refused(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), settings, TOPIC)
    assert f"READ on topic {TOPIC!r}" in str(error)
    group = consuming_refused(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED), settings, None)
    assert "READ on group 'g'" in str(group)


def test_without_a_sasl_user_the_principal_is_left_to_fill_in(tmp_path: Path) -> None:
    error = not_authorized([Right("READ", "topic", "t", "consume it")], None, "X")
    assert "this consumer's principal is not authorized" in str(error)
    assert "--allow-principal User:<consumer>" in str(error)
    with pytest.raises(ValueError, match="at least one"):
        not_authorized([], None, "X")
