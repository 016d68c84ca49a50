"""Without a changelog, a revoked partition's state is kept (it is all there is), but swept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rocksdict import Rdict

from dedupe_consumer.engine import Engine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import EPOCH, IdRecord, RecordStatus, RocksStore, WriteSet

from .conftest import TOPIC, Rig, rec

TP = TopicPartition(TOPIC, 0)


def deleted(r: Rig) -> float:
    value = r.engine.metrics.registry.get_sample_value("dedupe_expired_records_deleted_total")
    return value or 0.0


def test_revoked_partition_without_changelog_is_swept_not_dropped(
    rig: Callable[..., Rig],
) -> None:
    r = rig(dedupe={"retention": "1h"}, store={"changelog": False, "revoked_state_grace": "1s"})
    r.engine.process([rec(i, f"id-{i}") for i in range(50)])
    r.engine.release([TP])
    r.clock.now += 2  # past the grace: still nothing may be dropped without a changelog
    r.engine.idle()
    assert TP in r.engine.store.partitions()
    assert deleted(r) == 0  # nothing expired yet

    r.clock.now += 3600
    r.engine.idle()
    assert deleted(r) == 50  # expired records of a partition we do not own are gone
    assert r.engine.store.watermark(TP) == 49  # the watermark never expires
    assert r.engine.assign([TP]) == {TP: 50}


def test_a_busy_consumer_sweeps_revoked_partitions_without_idling(
    rig: Callable[..., Rig],
) -> None:
    r = rig(dedupe={"retention": "1h"}, store={"changelog": False})
    r.engine.process([rec(i, f"id-{i}") for i in range(300)])
    r.engine.release([TP])
    r.clock.now += 3601
    for batch in range(3):  # partition 1 keeps the consumer busy: no idle poll
        r.engine.process([rec(batch, f"p1-{batch}", partition=1)])
    assert deleted(r) == 300


def test_a_partition_found_in_the_store_at_start_up_is_swept_too(
    rig: Callable[..., Rig],
) -> None:
    r = rig(dedupe={"retention": "1h"})
    r.engine.process([rec(i, f"id-{i}") for i in range(20)])
    assert r.store is not None
    r.store.close()
    # Restarted, and the partitions went to other instances meanwhile: never assigned.
    r.store = RocksStore(r.settings.store.path, retention_ms=3_600_000)
    engine = Engine(
        r.handler,
        r.settings.dedupe,
        r.settings.processing,
        r.store,
        r.dead,
        sweep_keys=r.settings.store.sweep_keys,
        revoked_state_grace=r.settings.store.revoked_state_grace,
        clock=r.clock,
    )
    r.clock.now += 3601
    engine.idle()
    value = engine.metrics.registry.get_sample_value("dedupe_expired_records_deleted_total")
    assert value == 20


def test_drop_partition_forgets_records_effects_and_meta_of_that_partition_only(
    tmp_path: Path,
) -> None:
    other = TopicPartition(TOPIC, 1)
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        for tp in (TP, other):
            store.persist(
                WriteSet(
                    {tp: [("a", IdRecord(RecordStatus.HANDLED, 3, 10**12, bytes(8)))]},
                    effects={tp: [(b"k", b"v")]},
                    watermarks={tp: 3},
                    changelog_positions={tp: 9},
                )
            )
            store.set_epoch(tp, EPOCH.pack(bytes(16), 0), reset_watermark=False)
        store.drop_partition(TP)
        names = Rdict.list_cf(str(tmp_path / "s"))
        assert f"p:{TOPIC}:0" not in names and f"e:{TOPIC}:0" not in names
        assert (store.watermark(TP), store.changelog_position(TP), store.epoch(TP)) == (
            None,
            None,
            None,
        )
        assert store.partitions() == [other]
        assert store.lookup(TP, ["a"], 10**12) == [None]  # (re-creates an empty family)
        assert store.effect(TP, b"k") is None
        assert store.watermark(other) == 3 and store.effect(other, b"k") == b"v"
    finally:
        store.close()
