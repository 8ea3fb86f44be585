"""The checkpoint record (``Checkpoint``), its JSON form, and ``FileCheckpointStore``.

A checkpoint is the JSON object of ``Position.to_dict()`` plus ``saved_at`` (ISO 8601, UTC); every
store writes the same form (``connectors.redis.RedisCheckpointStore`` keeps it in a Redis key), so
ops can read and move it by hand. ``FileCheckpointStore`` keeps it in a local file for
deployments that want the checkpoint beside the worker rather than in the cache it feeds; it
replaces the file atomically, so a crash leaves either the old or the new checkpoint, never a torn
one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from worker.errors import CheckpointError
from worker.events import Position

log = structlog.get_logger(__name__)

SAVED_AT = "saved_at"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A saved position and when it was saved (``None`` when the record does not say)."""

    position: Position
    saved_at: datetime | None = None


def encode_checkpoint(position: Position, saved_at: datetime | None = None) -> str:
    """The stored JSON text of ``position``, stamped with ``saved_at`` (default: now)."""
    stamp = (saved_at or datetime.now(UTC)).astimezone(UTC).isoformat()
    record: dict[str, Any] = {**position.to_dict(), SAVED_AT: stamp}
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def decode_checkpoint(text: str | bytes, where: str) -> Checkpoint:
    """Parse a stored checkpoint; ``where`` names its location in the error message."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "version" not in data:
            raise ValueError("no version")
        stamp = data.pop(SAVED_AT, None)
        saved_at = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
        return Checkpoint(Position.from_dict(data), saved_at)
    except (ValueError, TypeError) as exc:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; int() of a bad version
        # raises ValueError or TypeError.
        raise CheckpointError(f"checkpoint {where} is unreadable: {exc}") from exc


class FileCheckpointStore:
    """Keeps one source's checkpoint in a JSON file (implements ``CheckpointStore``).

    The directory must exist; the file is created on the first save.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> Position | None:
        checkpoint = self.load_checkpoint()
        return checkpoint.position if checkpoint is not None else None

    def load_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint with its timestamp, or ``None`` when there is no file yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint file {self.path}: {exc}") from exc
        return decode_checkpoint(data, f"file {self.path}")

    def save(self, position: Position) -> None:
        data = encode_checkpoint(position).encode()
        directory = self.path.parent
        tmp_name: str | None = None
        try:
            # The temporary file lives in the target's directory so the rename stays within one
            # file system and is atomic.
            fd, tmp_name = tempfile.mkstemp(
                dir=directory, prefix=f".{self.path.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
            tmp_name = None
            _fsync_directory(directory)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint file {self.path}: {exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        log.debug("checkpoint_saved", store="file", path=str(self.path), version=position.version)

    def delete(self) -> None:
        """Forget the checkpoint (``cache-worker reset-checkpoint``); no file is fine."""
        try:
            self.path.unlink(missing_ok=True)
            _fsync_directory(self.path.parent)
        except OSError as exc:
            raise CheckpointError(f"cannot delete checkpoint file {self.path}: {exc}") from exc
        log.info("checkpoint_deleted", store="file", path=str(self.path))


def _fsync_directory(directory: Path) -> None:
    # A rename or unlink is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
