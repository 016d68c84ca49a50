"""``dedupe_duplicate_age_seconds``: how old the record a duplicate matched was."""

from __future__ import annotations

from collections.abc import Callable

from .conftest import TOPIC, Rig, rec


def sample(rig: Rig, name: str) -> float:
    value = rig.engine.metrics.registry.get_sample_value(name, {"topic": TOPIC})
    return value or 0.0


def test_a_duplicate_records_the_age_of_what_it_matched(rig: Callable[..., Rig]) -> None:
    r = rig(dedupe={"retention": "7d"})
    r.engine.process([rec(0, "a"), rec(1, "a")])  # a copy in the same batch: age 0
    assert sample(r, "dedupe_duplicate_age_seconds_count") == 1
    assert sample(r, "dedupe_duplicate_age_seconds_sum") == 0
    r.clock.now += 2 * 3600
    r.engine.process([rec(2, "a"), rec(3, "b")])  # two hours after "a" was decided
    assert sample(r, "dedupe_duplicate_age_seconds_count") == 2
    assert sample(r, "dedupe_duplicate_age_seconds_sum") == 7200
    registry = r.engine.metrics.registry
    assert registry.get_sample_value("dedupe_retention_seconds") == 7 * 86400
    bucket = {"topic": TOPIC, "le": "14400.0"}
    assert registry.get_sample_value("dedupe_duplicate_age_seconds_bucket", bucket) == 2
    bucket["le"] = "3600.0"
    assert registry.get_sample_value("dedupe_duplicate_age_seconds_bucket", bucket) == 1
