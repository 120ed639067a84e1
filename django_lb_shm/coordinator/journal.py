"""The write journal: the record that decides every write.

A write is *decided* when its record is durable here: from then on every copy
applies it exactly once, in sequence order, whatever happens to the copy that
ran it first.  Each copy records in its ``django_lb_shm_applied`` table (in the
same transaction as the write) the sequence number and the *tag* of the last
record it applied; the tag (random, per record) lets a copy's marker be checked
against the journal, so a copy whose history is not the journal's (a missing,
older or restored journal) is recognised instead of silently caught up with a
gap.

Storage is a SQLite database in JOURNAL_DIR (``journal.sqlite3``, WAL mode,
``synchronous=FULL`` when JOURNAL_FSYNC is on): an append is one SQLite
transaction, so it happens wholly or leaves no trace (a full disk rolls it
back), recovery after a crash is SQLite's, and records are looked up by
sequence number and request id on disk.  Payloads are read back for a replay
and are not kept in memory.  Segment files of the format before version 1
(``*.journal``) are imported on open.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pickle
import secrets
import sqlite3
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from django_lb_shm.errors import JournalCorrupt, JournalError
from django_lb_shm.wire.descriptors import Result, Statement

logger = logging.getLogger("django_lb_shm.journal")

FILENAME = "journal.sqlite3"
LOCK_FILENAME = "journal.lock"
FORMAT_VERSION = 1
REPLAY_CHUNK = 256

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS entries ("
    " seq INTEGER PRIMARY KEY, tag INTEGER NOT NULL, request_id TEXT NOT NULL DEFAULT '',"
    " database TEXT NOT NULL DEFAULT '', void INTEGER NOT NULL DEFAULT 0,"
    " statements BLOB, result BLOB)",
    "CREATE INDEX IF NOT EXISTS entries_request ON entries (request_id) WHERE request_id != ''",
)


class JournalUncertain(Exception):
    """An append failed in a way that leaves unknown whether the record is durable."""


def new_tag() -> int:
    """A record's identity in the copies' markers (never 0: 0 is a marker of unknown origin)."""
    return secrets.randbits(62) or 1


@dataclass
class JournalEntry:
    seq: int
    request_id: str
    statements: list              # what every copy runs, generated keys explicit; [] for a void record
    result: Any = None            # the first copy's answer, for a repeated request id
    database: str = ""            # the copy that ran it first
    tag: int = field(default_factory=new_tag)
    void: bool = False            # decided as "nothing": the first copy refused it at COMMIT

    def voided(self) -> "JournalEntry":
        return JournalEntry(self.seq, self.request_id, [], None, self.database, self.tag, void=True)


class Journal:
    def __init__(self, directory: str | os.PathLike, fsync: bool = True,
                 import_from: Sequence[str | os.PathLike] = ()):
        self.directory = Path(directory)
        self.fsync = fsync
        self.import_from = [Path(p) for p in import_from]
        self.db: Optional[sqlite3.Connection] = None
        self.last_seq = 0                # highest sequence number decided (or the base after a rebase)
        self.base_seq = 0                # history at and before it is not (entirely) here
        self.base_tag = 0
        self.entry_count = 0
        self.is_new = False              # created by this open(): it knows nothing of the copies' past
        self.members: set[str] = set()   # aliases that share its history (see settle_members)
        self._lock = threading.Lock()
        self._lock_file: Optional[int] = None

    # -- open / close ----------------------------------------------------------
    def open(self) -> "Journal":
        self._make_private_directory()
        self._take_directory_lock()
        path = self.directory / FILENAME
        existed = path.exists()
        os.close(os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))   # -wal/-shm get its mode
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")   # takes effect on a new file only
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'OFF'}")
        self._create_schema()
        import_segments(self, self.directory)
        if not self.db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() and self._meta("base_seq") is None:
            for source in self.import_from:   # an older default JOURNAL_DIR, only into a new journal
                if import_segments(self, source):
                    break
        self._load_state()
        self.is_new = not existed and self.entry_count == 0 and not self.base_seq
        return self

    def _make_private_directory(self) -> None:
        """The records hold row values and pickles: only the coordinator's user may read them."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o077:
            logger.warning("JOURNAL_DIR %s is readable or writable by other users (mode %o): its records hold "
                           "row values and pickles; chmod 700 it", self.directory, mode)
        for name in (FILENAME, FILENAME + "-wal", FILENAME + "-shm"):
            try:
                if (self.directory / name).stat().st_mode & 0o077:
                    os.chmod(self.directory / name, 0o600)
            except FileNotFoundError:
                pass

    def _take_directory_lock(self) -> None:
        fd = os.open(str(self.directory / LOCK_FILENAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"the journal in {self.directory} is in use by another coordinator; "
                               "each set of databases needs its own LOAD_BALANCER['JOURNAL_DIR']") from None
        self._lock_file = fd

    def _create_schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > FORMAT_VERSION:
            raise JournalError(f"the journal in {self.directory} has format {version}, newer than this "
                               f"django_lb_shm understands ({FORMAT_VERSION}); upgrade django_lb_shm")
        with self._transaction():
            for sql in _SCHEMA:
                self.db.execute(sql)
            self.db.execute(f"PRAGMA user_version={FORMAT_VERSION}")

    def _load_state(self) -> None:
        self.base_seq = int(self._meta("base_seq") or 0)
        self.base_tag = int(self._meta("base_tag") or 0)
        highest = self.db.execute("SELECT MAX(seq) FROM entries").fetchone()[0] or 0
        self.last_seq = max(highest, self.base_seq, int(self._meta("trimmed_through") or 0))
        self.entry_count = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self.db is not None:
                self.db.close()
                self.db = None
            if self._lock_file is not None:
                os.close(self._lock_file)
                self._lock_file = None

    # -- writing ----------------------------------------------------------------
    def append(self, entry: JournalEntry) -> None:
        self.append_many([entry])

    def append_many(self, entries: Sequence[JournalEntry]) -> None:
        """Durably record writes, all or none (the caller holds the global write order).

        JournalError when they could not be recorded: then none of them is.
        """
        rows = [_row(e) for e in entries]
        with self._lock:
            try:
                with self._transaction():
                    self.db.executemany(
                        "INSERT INTO entries (seq, tag, request_id, database, void, statements, result) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as exc:
                held = self._holds(entries[-1])
                if held is None:
                    raise JournalUncertain(f"the write journal in {self.directory} failed ({exc}) and cannot "
                                           "say whether it recorded the write") from exc
                if not held:
                    raise JournalError(self._cannot_write(exc)) from exc
                logger.warning("journal: the append reported %s but the records are there", exc)
            self.entry_count += len(entries)
            self.last_seq = max(self.last_seq, entries[-1].seq)

    def void(self, entries: Sequence[JournalEntry]) -> None:
        """Decide recorded writes as nothing (the first copy refused them at COMMIT)."""
        with self._lock:
            try:
                with self._transaction():
                    self.db.executemany("UPDATE entries SET void = 1, statements = NULL, result = NULL "
                                        "WHERE seq = ?", [(entry.seq,) for entry in entries])
            except sqlite3.Error as exc:
                raise JournalError(self._cannot_write(exc)) from exc

    def rebase(self, seq: int, tag: int) -> None:
        """Copies have applied writes up to ``seq`` that this journal does not hold (it is new,
        older or restored): numbering goes on after ``seq``, and no copy behind it can be
        caught up from here."""
        with self._lock, self._transaction():
            self._set_meta("base_seq", seq)
            self._set_meta("base_tag", tag)
        logger.warning("journal %s ends at #%d but copies have applied writes up to #%d; "
                       "numbering continues after #%d", self.directory, self.last_seq, seq, seq)
        self.base_seq, self.base_tag = seq, tag
        self.last_seq = max(self.last_seq, seq)

    # -- members: the copies that share this history ---------------------------------------
    def settle_members(self, aliases: Sequence[str]) -> None:
        """At boot: the configured copies that share this history.  A journal that never recorded
        members (new, or of an earlier version) counts every configured copy; aliases no longer
        configured are dropped (added again later, such a copy is a newcomer)."""
        stored = self._meta("members")
        members = set(aliases) if stored is None else set(json.loads(stored)) & set(aliases)
        self._store_members(members)

    def add_member(self, alias: str) -> None:
        """``alias`` holds this history now (it caught up, or a resync filled it)."""
        if alias not in self.members:
            self._store_members(self.members | {alias})

    def _store_members(self, members: set) -> None:
        with self._lock:
            try:
                with self._transaction():
                    self._set_meta("members", json.dumps(sorted(members)))
            except sqlite3.Error as exc:
                logger.warning("journal: could not record its members (%s)", exc)
        self.members = members

    def _cannot_write(self, exc: BaseException) -> str:
        return (f"the write journal in LOAD_BALANCER['JOURNAL_DIR'] ({self.directory}) cannot record "
                f"the write ({exc}); it was applied nowhere. Free space there (or fix the disk) and retry")

    def _holds(self, entry: JournalEntry) -> Optional[bool]:
        """Whether ``entry`` is recorded; None when the journal cannot even be read."""
        try:
            row = self.db.execute("SELECT tag FROM entries WHERE seq = ?", (entry.seq,)).fetchone()
        except sqlite3.Error:
            return None
        return row is not None and row[0] == entry.tag

    # -- reading ----------------------------------------------------------------
    def entries_after(self, seq: int, limit: int = REPLAY_CHUNK, up_to: Optional[int] = None) -> list[JournalEntry]:
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, tag, request_id, database, void, statements, result FROM entries "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (seq, self.last_seq if up_to is None else up_to, limit)).fetchall()
        return [_entry(row) for row in rows]

    def iter_after(self, seq: int, up_to: Callable[[], int]) -> Iterator[JournalEntry]:
        """Every record after ``seq`` up to ``up_to()`` (read again for every chunk), read from
        disk a chunk at a time."""
        while True:
            chunk = self.entries_after(seq, up_to=up_to())
            if not chunk:
                return
            yield from chunk
            seq = chunk[-1].seq

    def covers(self, after_seq: int, up_to: int) -> bool:
        """Whether every record after ``after_seq`` up to ``up_to`` is here to replay."""
        if after_seq >= up_to:
            return True
        with self._lock:
            count = self.db.execute("SELECT COUNT(*) FROM entries WHERE seq > ? AND seq <= ?",
                                    (after_seq, up_to)).fetchone()[0]
        return count == up_to - after_seq

    def tag_at(self, seq: int) -> Optional[int]:
        """The tag a copy that applied up to ``seq`` must have; None when the journal cannot say."""
        if seq == 0:
            return 0
        with self._lock:
            row = self.db.execute("SELECT tag FROM entries WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return row[0]
        return self.base_tag if seq == self.base_seq else None

    def find_request(self, request_id: str) -> Optional[JournalEntry]:
        with self._lock:
            row = self.db.execute(
                "SELECT seq, tag, request_id, database, void, statements, result FROM entries "
                "WHERE request_id = ? AND request_id != '' ORDER BY void, seq DESC LIMIT 1", (request_id,)).fetchone()
        return _entry(row) if row is not None else None

    @property
    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += (self.directory / (FILENAME + suffix)).stat().st_size
            except OSError:
                pass
        return total

    # -- trimming ----------------------------------------------------------------
    def trim(self, applied_everywhere: int) -> int:
        """Forget records every copy has applied, keeping the last of them (its tag checks markers)."""
        with self._lock:
            try:
                with self._transaction():
                    removed = self.db.execute("DELETE FROM entries WHERE seq < ?", (applied_everywhere,)).rowcount
                    if removed:
                        self._set_meta("trimmed_through", applied_everywhere - 1)
            except sqlite3.Error as exc:
                logger.warning("journal: trimming failed (%s); retried later", exc)
                return 0
            self.entry_count -= removed
            if removed:
                self._give_space_back()
        return removed

    def _give_space_back(self) -> None:
        """After a trim: the freed pages go back to the file system, and the WAL is emptied."""
        try:
            self.db.executescript("PRAGMA incremental_vacuum;")   # (execute() would free one page)
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            logger.debug("journal: could not give space back yet (%s)", exc)

    # -- helpers ------------------------------------------------------------------
    def _transaction(self) -> "_Transaction":
        return _Transaction(self.db)

    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (a full disk included)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


# -- the stored form: plain tuples, readable whatever this package's classes become ----------
def _row(entry: JournalEntry) -> tuple:
    statements = None if entry.void else _dumps([(s.sql, s.params, s.many) for s in entry.statements])
    result = None
    if entry.result is not None and not entry.void:
        r = entry.result
        result = _dumps((r.rows, r.description, r.rowcount, r.lastrowid, r.database))
    return (entry.seq, entry.tag, entry.request_id or "", entry.database or "", int(entry.void), statements, result)


def _entry(row: tuple) -> JournalEntry:
    seq, tag, request_id, database, void, statements, result = row
    loaded = [Statement(sql, params, many) for sql, params, many in pickle.loads(statements)] if statements else []
    answer = Result(*pickle.loads(result)) if result else (None if void else Result())
    return JournalEntry(seq, request_id, loaded, answer, database, tag, bool(void))


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=4)


# -- the segment files of format 0, imported once -----------------------------------------
_HEADER = struct.Struct("<II")
SEGMENT_SUFFIX = ".journal"


def import_segments(journal: Journal, directory: Path) -> int:
    """Move the records of ``*.journal`` segment files (format 0) into ``journal``; the files are
    renamed ``*.journal.imported``.  JournalCorrupt when a damaged record is followed by valid ones."""
    paths = sorted(directory.glob("*" + SEGMENT_SUFFIX)) if directory.is_dir() else []
    if not paths:
        return 0
    entries: dict[int, JournalEntry] = {}
    for path in paths:
        for kind, value in read_segment(path):
            if kind == "E":
                entries[value.seq] = JournalEntry(value.seq, value.request_id, value.statements,
                                                  value.result, value.database, tag=0)
            elif kind == "A" and value in entries:
                entries[value] = entries[value].voided()
    present = {row[0] for row in journal.db.execute("SELECT seq FROM entries")}
    fresh = [entries[s] for s in sorted(entries) if s not in present]
    if fresh:
        journal.append_many(fresh)
    for path in paths:
        path.rename(path.with_name(path.name + ".imported"))
    logger.info("journal: imported %d records from %d segment files in %s", len(fresh), len(paths), directory)
    return len(fresh)


def read_segment(path: Path) -> Iterable[tuple]:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        record = _read_record(data, offset)
        if record is None:
            if _valid_record_after(data, offset + 1):
                raise JournalCorrupt(
                    f"journal segment {path}: a damaged record at byte {offset} is followed by valid ones; "
                    "refusing to drop them. Move the file away to start without it (the copies' markers then "
                    "show what is missing), or restore it from a backup")
            logger.warning("journal %s: ignoring a torn record at its end (byte %d)", path, offset)
            return
        payload, offset = record
        yield payload


def _read_record(data: bytes, offset: int) -> Optional[tuple[Any, int]]:
    if offset + _HEADER.size > len(data):
        return None
    length, crc = _HEADER.unpack_from(data, offset)
    start, end = offset + _HEADER.size, offset + _HEADER.size + length
    if length == 0 or end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None
    try:
        return _SegmentUnpickler(io.BytesIO(data[start:end])).load(), end
    except Exception:
        return None


class _SegmentUnpickler(pickle.Unpickler):
    """Format-0 records pickle classes by module path: those of 0.1 name the modules before
    they moved into folders (``django_lb_shm.journal``, ``django_lb_shm.descriptors``).  The
    stored form of format 1 (``_row``) holds plain tuples and needs no such map."""

    MOVED = {"django_lb_shm.journal": "django_lb_shm.coordinator.journal",
             "django_lb_shm.descriptors": "django_lb_shm.wire.descriptors"}

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(self.MOVED.get(module, module), name)


def _valid_record_after(data: bytes, offset: int) -> bool:
    return any(_read_record(data, at) is not None for at in range(offset, len(data) - _HEADER.size))
