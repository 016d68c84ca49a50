"""The store directory: tighten only what the library creates, refuse a shared one.

``store.path = "/tmp"`` used to make /tmp itself 0700. Now a directory that
exists is never chmod-ed; one that others can write to is refused (they could
replace the store's files); one the library creates is 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dedupe_consumer.errors import StoreError
from dedupe_consumer.store import RocksStore


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def open_close(path: Path) -> None:
    RocksStore(path, retention_ms=1000).close()


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    existing = tmp_path / "state"
    existing.mkdir()
    existing.chmod(0o755)
    open_close(existing)
    assert mode(existing) == 0o755
    assert (existing / "CURRENT").exists()  # the store is there, the mode untouched


@pytest.mark.parametrize("shared", [0o777, 0o1777, 0o770, 0o775, 0o757])
def test_a_group_or_world_writable_directory_is_refused(tmp_path: Path, shared: int) -> None:
    existing = tmp_path / "shared"
    existing.mkdir()
    existing.chmod(shared)
    with pytest.raises(StoreError) as info:
        open_close(existing)
    message = str(info.value)
    assert "store.path" in message and str(existing) in message
    assert "writable by other users" in message
    assert "chmod go-w" in message and str(existing / "dedupe-state") in message  # the fixes
    assert mode(existing) == shared  # refused, not changed
    assert not (existing / "CURRENT").exists()  # and nothing written


def test_a_new_directory_inside_a_shared_parent_is_created_private(tmp_path: Path) -> None:
    public = tmp_path / "tmp"
    public.mkdir()
    public.chmod(0o1777)  # like /tmp
    store = public / "app" / "state"
    open_close(store)
    assert mode(store) == 0o700
    assert mode(public) == 0o1777  # the parent is not the library's to change
    open_close(store)  # reopening the directory it created works
    assert mode(store) == 0o700


def test_a_file_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"store\.path .* is not a directory"):
        open_close(blocker)
