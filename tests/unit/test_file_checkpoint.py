"""Unit tests of ``worker.checkpoint``: the JSON record and the atomic ``FileCheckpointStore``."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.checkpoint import FileCheckpointStore, decode_checkpoint, encode_checkpoint
from worker.errors import CheckpointError
from worker.events import Position

POSITION = Position(1234567890123, {"file": "mysql-bin.000042", "pos": 4711, "gtid": "0-1-99"})


def test_missing_file_loads_as_none(tmp_path: Path) -> None:
    assert FileCheckpointStore(tmp_path / "checkpoint.json").load() is None


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "checkpoint.json")
    store.save(POSITION)
    loaded = store.load()
    assert loaded == POSITION
    assert loaded is not None and loaded.coords == POSITION.coords
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint.saved_at is not None
    assert abs((datetime.now(UTC) - checkpoint.saved_at).total_seconds()) < 60


def test_file_is_position_json_plus_saved_at(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    FileCheckpointStore(path).save(POSITION)
    data = json.loads(path.read_text())
    saved_at = data.pop("saved_at")
    assert data == POSITION.to_dict()
    assert datetime.fromisoformat(saved_at).tzinfo is not None


def test_save_replaces_the_previous_checkpoint_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = FileCheckpointStore(path)
    store.save(Position(1, {"pos": 1}))
    inode = path.stat().st_ino
    store.save(Position(2, {"pos": 2}))
    assert store.load() == Position(2)
    assert store.load().coords == {"pos": 2}  # type: ignore[union-attr]
    # A new file renamed over the old one, not the old one rewritten in place.
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


def test_failed_save_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.json"
    store = FileCheckpointStore(path)
    store.save(Position(1, {"pos": 1}))
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError, match=r"checkpoint\.json"):
        store.save(Position(2, {"pos": 2}))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


def test_failed_rename_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.json"
    store = FileCheckpointStore(path)
    store.save(Position(1, {"pos": 1}))

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError):
        store.save(Position(2, {"pos": 2}))
    monkeypatch.undo()
    assert store.load() == Position(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[1, 2]", b'{"pos": 1}', b'{"version": "x"}', b"\xff\xfe", b"null"],
)
def test_corrupt_file_raises_checkpoint_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "checkpoint.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        FileCheckpointStore(path).load()


def test_missing_directory_raises_checkpoint_error(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "absent" / "checkpoint.json")
    with pytest.raises(CheckpointError, match="absent"):
        store.save(POSITION)


def test_delete(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = FileCheckpointStore(path)
    store.save(POSITION)
    store.delete()
    assert not path.exists()
    assert store.load() is None
    store.delete()  # nothing to delete is fine


def test_record_without_saved_at_is_accepted() -> None:
    checkpoint = decode_checkpoint('{"version": 7, "lsn": "0/16B3748"}', "test")
    assert checkpoint.position == Position(7)
    assert checkpoint.position.coords == {"lsn": "0/16B3748"}
    assert checkpoint.saved_at is None


def test_encode_uses_the_given_time() -> None:
    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    text = encode_checkpoint(Position(3, {"a": 1}), stamp)
    assert json.loads(text) == {"version": 3, "a": 1, "saved_at": "2024-05-01T12:00:00+00:00"}
    assert decode_checkpoint(text, "test").saved_at == stamp
