"""Crash-safe files: atomic writes and an append-only, checksummed JSONL log."""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CRC_FIELD = "_crc"


class CorruptFileError(RuntimeError):
    """A file is damaged somewhere other than its (recoverable) last line."""


def fsync_dir(path: Path) -> None:
    """Persist a rename or a new file's directory entry (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (read from /proc, where
    changing the umask to read it would race other threads); 0o644 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename: readers see old or new, never half.

    The file gets the mode a plain ``open()`` would give it (the temp file's own is 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _crc(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return format(zlib.crc32(canonical.encode("utf-8")), "08x")


def encode_line(record: dict[str, Any]) -> str:
    """One JSONL line carrying a CRC-32 of the record's canonical JSON."""
    payload = {k: v for k, v in record.items() if k != CRC_FIELD}
    payload[CRC_FIELD] = _crc(payload)
    return json.dumps(payload, ensure_ascii=False, sort_keys=True) + "\n"


def decode_line(line: str) -> dict[str, Any] | None:
    """The record of a line, or ``None`` when the line is torn or fails its checksum."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or CRC_FIELD not in record:
        return None
    crc = record.pop(CRC_FIELD)
    return record if crc == _crc(record) else None


class JsonlLog:
    """Append-only JSONL with a per-record checksum.

    Every append is flushed and fsynced. On open, a torn or corrupt *last* line
    (a crash mid-write) is dropped and the file truncated back to the last good
    record; damage anywhere else raises :class:`CorruptFileError` naming the line,
    because silently skipping it would lose data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.recovered_torn_line = False
        self._records: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        segments = self.path.read_bytes().split(b"\n")
        tail = segments.pop()  # b"" when the last append completed, else a torn partial line
        good_end = 0
        for index, raw in enumerate(segments):
            try:
                record = decode_line(raw.decode("utf-8"))
            except UnicodeDecodeError:
                record = None
            if record is None:
                if index == len(segments) - 1 and not tail:
                    tail = raw  # a damaged final line is what an interrupted write leaves: drop it
                    break
                raise CorruptFileError(
                    f"{self.path}: line {index + 1} is corrupt (bad JSON or checksum) and is not the last line. "
                    "The file was edited or damaged; restore it from a backup or delete that line by hand."
                )
            self._records.append(record)
            good_end += len(raw) + 1
        if tail:
            logger.warning("%s: dropping a torn last record left by an interrupted write (%d bytes)",
                           self.path, len(tail))
            self.recovered_torn_line = True
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records))

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append records durably (one write + fsync for the whole batch)."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(encode_line(r) for r in records).encode("utf-8")
        with open(self.path, "ab") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        self._records.extend({k: v for k, v in r.items() if k != CRC_FIELD} for r in records)

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])
