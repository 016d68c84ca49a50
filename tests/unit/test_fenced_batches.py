"""A batch whose changelog transaction the group fenced: nothing persisted, kept for later."""

from __future__ import annotations

from pathlib import Path

from dedupe_consumer.engine import Engine
from dedupe_consumer.errors import NotOwnerError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import ProcessedStore, RecordStatus, RocksStore, WriteSet

from .changelog_rig import TP0, RecordingChangelog, changelog_engine
from .conftest import Recorder, rec


class FencingChangelog(RecordingChangelog):
    """Fences the next ``fence`` transactions, as the group coordinator would a zombie's."""

    def __init__(self) -> None:
        super().__init__()
        self.fence = 0
        self.restored_records = 0

    def restore(self, tp: TopicPartition, store: ProcessedStore, *, stopping: object = None) -> int:
        return self.restored_records

    def before_write(self, write: WriteSet) -> None:
        if self.fence:
            self.fence -= 1
            raise NotOwnerError("UNKNOWN_MEMBER_ID")


def rig(tmp_path: Path) -> tuple[Engine, RocksStore, Recorder, FencingChangelog]:
    handler = Recorder()
    changelog = FencingChangelog()
    e, store = changelog_engine(tmp_path, handler, changelog)
    return e, store, handler, changelog


def test_a_fenced_batch_persists_nothing_and_is_read_again(tmp_path: Path) -> None:
    e, store, _handler, changelog = rig(tmp_path)
    try:
        changelog.fence = 1
        result = e.process([rec(i, f"id{i}") for i in range(5)])
        assert result.commits == {} and result.rewind == {TP0: 0}
        assert store.watermark(TP0) is None
        assert store.lookup(TP0, ["id0"], 0) == [None]
    finally:
        store.close()


def test_a_fenced_batch_is_persisted_when_the_partition_comes_back_untouched(
    tmp_path: Path,
) -> None:
    e, store, handler, changelog = rig(tmp_path)
    try:
        changelog.fence = 1
        e.process([rec(i, f"id{i}") for i in range(5)])
        e.release([TP0], lost=True)  # the lost callback in the next poll
        changelog.restored_records = 0  # nobody wrote the changelog meanwhile
        starts = e.assign([TP0])
        assert starts == {TP0: 5}  # resumes after the kept batch
        assert changelog.writes[-1].watermarks == {TP0: 4}
        assert changelog.offsets[-1] == {TP0: 5}
        again = e.process([rec(i, f"id{i}") for i in range(5)])  # redelivered
        assert again.stats.replays == 5
        assert handler.ids == [f"id{i}" for i in range(5)]  # each handled once
    finally:
        store.close()


def test_a_fenced_batch_is_dropped_when_another_owner_wrote_meanwhile(tmp_path: Path) -> None:
    e, store, handler, changelog = rig(tmp_path)
    try:
        changelog.fence = 1
        e.process([rec(i, f"id{i}") for i in range(5)])
        e.release([TP0], lost=True)
        changelog.restored_records = 3  # another owner's writes came in with the restore
        assert e.assign([TP0]) == {TP0: None}
        assert changelog.writes == []  # the stale batch was not written
        e.process([rec(i, f"id{i}") for i in range(5)])
        assert len(handler.ids) == 10  # read and handled again (plain mode's window)
    finally:
        store.close()


def test_a_batch_fenced_by_a_moving_generation_is_persisted_in_the_revoke_callback(
    tmp_path: Path,
) -> None:
    """CI found it (a cooperative rebalance, 181 events handled twice): the generation
    moved while a write was in flight, the write was refused as fenced, and the
    partition was then revoked. In the revoke callback this instance still owns it, so
    the kept batch is persisted there, not left for the next owner to handle again."""
    handler = Recorder()
    changelog = FencingChangelog()
    e, store = changelog_engine(tmp_path, handler, changelog)
    try:
        changelog.fence = 1  # ILLEGAL_GENERATION on the persister
        e.process([rec(i, f"id{i}") for i in range(5)])
        assert store.watermark(TP0) is None
        e.release([TP0])  # revoked: the callback runs while the partition is still ours
        assert store.watermark(TP0) == 4
        assert changelog.writes[-1].watermarks == {TP0: 4}
        assert changelog.offsets[-1] == {TP0: 5}  # the source offset goes with it
        assert changelog.live[-1] is True  # in the generation of now, not of the poll
        found = store.lookup(TP0, [f"id{i}" for i in range(5)], 0)
        assert all(r is not None and r.status is RecordStatus.HANDLED for r in found)
    finally:
        store.close()


def test_a_lost_partition_s_fenced_batch_is_not_persisted_in_the_callback(
    tmp_path: Path,
) -> None:
    e, store, _handler, changelog = rig(tmp_path)
    try:
        changelog.fence = 1
        e.process([rec(i, f"id{i}") for i in range(5)])
        e.release([TP0], lost=True)  # someone else's already: nothing may be written
        assert changelog.writes == [] and store.watermark(TP0) is None
    finally:
        store.close()


def test_a_revoke_whose_adoption_is_fenced_again_drops_the_batch_quietly(
    tmp_path: Path,
) -> None:
    e, store, _handler, changelog = rig(tmp_path)
    try:
        changelog.fence = 2  # the write, then its adoption in the revoke callback
        e.process([rec(i, f"id{i}") for i in range(5)])
        assert e.release([TP0]) == {}  # never raises out of a rebalance callback
        assert changelog.writes == [] and store.watermark(TP0) is None
        changelog.restored_records = 0
        assert e.assign([TP0]) == {TP0: None}  # dropped, not revived: read again
    finally:
        store.close()
