"""The write journal: every acknowledged write, on disk, until every database has it.

Records are appended to segment files (``<first seq>.journal``) as
``<length:u32><crc32:u32><pickle>``.  A write is in the journal before the
first database commits it and before the caller's acknowledgement, so a
database that is down, or a coordinator that crashes, loses nothing: on start
the coordinator replays to each database the entries after the sequence
number that database recorded (in the same transaction as each write) in its
``django_lb_shm_applied`` table.  A torn record at the tail (crash mid-append)
is cut off on open.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("django_lb_shm.journal")

_HEADER = struct.Struct("<II")
SEGMENT_SUFFIX = ".journal"


@dataclass
class JournalEntry:
    seq: int
    request_id: str
    statements: list              # follower form, applied as one transaction
    result: Any = None            # the first database's result, for a repeated request id
    database: str = ""            # which database applied it first


@dataclass
class _Segment:
    path: Path
    first_seq: int
    last_seq: int = 0
    size: int = 0
    seqs: list = field(default_factory=list)


class Journal:
    def __init__(self, directory: str | os.PathLike, fsync: bool = True, segment_entries: int = 10_000):
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_entries = segment_entries
        self.entries: dict[int, JournalEntry] = {}
        self.by_request: dict[str, int] = {}
        self.aborted: set[int] = set()
        self.segments: list[_Segment] = []
        self._file = None
        self._lock = threading.Lock()

    # -- open / close ----------------------------------------------------------
    def open(self) -> "Journal":
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.directory.glob("*" + SEGMENT_SUFFIX))
        for n, path in enumerate(paths):
            self._load_segment(path, is_last=(n == len(paths) - 1))
        return self

    def _load_segment(self, path: Path, is_last: bool) -> None:
        segment = _Segment(path, first_seq=int(path.stem))
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            record = self._read_record(data, offset)
            if record is None:
                if is_last:
                    logger.warning("journal %s: cutting a torn record at byte %d", path, offset)
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                else:
                    logger.error("journal %s: corrupt record at byte %d; later records in it are ignored", path, offset)
                break
            payload, offset = record
            self._apply_record(payload, segment)
        segment.size = offset
        self.segments.append(segment)

    @staticmethod
    def _read_record(data: bytes, offset: int) -> Optional[tuple[Any, int]]:
        if offset + _HEADER.size > len(data):
            return None
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            return None
        try:
            return pickle.loads(data[start:end]), end
        except Exception:
            return None

    def _apply_record(self, payload: Any, segment: _Segment) -> None:
        kind, value = payload
        if kind == "E":
            self._remember(value, segment)
        elif kind == "A":
            self._forget(value)
            self.aborted.add(value)

    def _remember(self, entry: JournalEntry, segment: _Segment) -> None:
        self.entries[entry.seq] = entry
        if entry.request_id:
            self.by_request[entry.request_id] = entry.seq
        segment.last_seq = max(segment.last_seq, entry.seq)
        segment.seqs.append(entry.seq)

    def _forget(self, seq: int) -> None:
        entry = self.entries.pop(seq, None)
        if entry is not None and entry.request_id:
            self.by_request.pop(entry.request_id, None)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._file = None

    # -- writing ----------------------------------------------------------------
    def append(self, entry: JournalEntry) -> None:
        """Durably record a write (the caller holds the global write order)."""
        with self._lock:
            segment = self._active_segment(entry.seq)
            self._write(("E", entry))
            self._remember(entry, segment)

    def abort(self, seq: int) -> None:
        """Record that a journaled write was not committed by the first database after all."""
        with self._lock:
            self._write(("A", seq))
            self._forget(seq)
            self.aborted.add(seq)

    def _active_segment(self, seq: int) -> _Segment:
        current = self.segments[-1] if self.segments else None
        if current is None or len(current.seqs) >= self.segment_entries:
            current = _Segment(self.directory / f"{seq:020d}{SEGMENT_SUFFIX}", first_seq=seq)
            self.segments.append(current)
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._file is None:
            self._file = open(current.path, "ab")
        return current

    def _write(self, record: Any) -> None:
        payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        if self._file is None:
            self._active_segment(self.last_seq + 1)
        data = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.segments[-1].size += len(data)

    # -- reading ----------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        last = max(self.entries) if self.entries else 0
        return max([last] + [s.last_seq for s in self.segments] + list(self.aborted or [0]))

    def entries_after(self, seq: int) -> list[JournalEntry]:
        with self._lock:
            return [self.entries[s] for s in sorted(self.entries) if s > seq]

    def covers(self, seq: int) -> bool:
        """Whether every write after ``seq`` is still here to replay."""
        with self._lock:
            wanted = range(seq + 1, self.last_seq + 1)
            return all(s in self.entries or s in self.aborted for s in wanted)

    def find_request(self, request_id: str) -> Optional[JournalEntry]:
        seq = self.by_request.get(request_id)
        return self.entries.get(seq) if seq is not None else None

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    # -- trimming ----------------------------------------------------------------
    def trim(self, applied_everywhere: int) -> int:
        """Delete whole segments whose writes every database has applied; keep the active one."""
        removed = 0
        with self._lock:
            while len(self.segments) > 1 and self.segments[0].last_seq <= applied_everywhere:
                segment = self.segments.pop(0)
                for seq in segment.seqs:
                    self._forget(seq)
                self.aborted = {s for s in self.aborted if s > segment.last_seq}
                try:
                    segment.path.unlink()
                except FileNotFoundError:
                    pass
                removed += 1
        return removed
