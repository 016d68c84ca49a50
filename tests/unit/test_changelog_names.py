"""Changelog topic names: one per (group, source topic), always a legal topic name."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from dedupe_consumer.store.changelog_codec import changelog_topic, legacy_changelog_topic

LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Topic names: Kafka's alphabet, biased to the characters that make names ambiguous.
topics = st.text(alphabet="ab._-19", min_size=1, max_size=12) | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=200, max_size=249
)
# Group ids: anything, including what a topic name cannot hold, and long ones.
groups = (
    st.text(alphabet="ab._-19", min_size=1, max_size=12)
    | st.text(min_size=1, max_size=12)
    | st.text(alphabet="ab.", min_size=150, max_size=300)
)


def test_the_reported_collision_is_gone() -> None:
    assert legacy_changelog_topic("payments", "orders.v1") == legacy_changelog_topic(
        "payments.orders", "v1"
    )
    assert changelog_topic("payments", "orders.v1") != changelog_topic("payments.orders", "v1")
    assert changelog_topic("payments", "orders.v1") == "payments.orders.v1.8.dedupe-changelog"


@given(groups, topics)
@example("payments", "orders.v1")
@example("group with spaces/ü", "t")
def test_every_name_is_a_legal_topic_name(group: str, topic: str) -> None:
    name = changelog_topic(group, topic)
    assert LEGAL.fullmatch(name), name
    assert name not in {".", ".."}


@given(st.lists(st.tuples(groups, topics), min_size=2, max_size=30, unique=True))
@example([("payments", "orders.v1"), ("payments.orders", "v1")])
@example([("a.1", "b"), ("a", "1.b"), ("a.1.b.3", "x"), ("a", "1.b.3.x")])
@example([("a", "h" + "0" * 32), ("x", "y")])
def test_names_are_injective(pairs: list[tuple[str, str]]) -> None:
    names = [changelog_topic(g, t) for g, t in pairs]
    assert len(set(names)) == len(pairs), dict(zip(names, pairs, strict=True))


def test_a_group_a_topic_name_cannot_hold_gets_a_hashed_but_readable_name() -> None:
    name = changelog_topic("team/payments ü", "orders")
    assert name.startswith("team-payments--.orders.h") and name.endswith(".dedupe-changelog")
    assert changelog_topic("team/payments ü", "orders") == name  # stable across restarts
    long = changelog_topic("g" * 240, "orders")
    assert len(long) <= 249 and long != changelog_topic("g" * 241, "orders")
