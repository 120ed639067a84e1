"""Resync: refill one copy from another while the coordinator runs (``djangoloadbalancer resync``).

The copy is made by the command's own process, on direct connections, so that a long copy
costs the coordinator nothing; the coordinator owns the copy's state (``ResyncDesk``):

1. ``resync_begin``: under the write order (no write half done on the copy, which may be the
   leader) the copy becomes RESYNCING -- no reads, its writes wait in the journal -- and its
   journal floor is pinned at the source's applied sequence, which no later snapshot of the
   source can be behind: the journal keeps every record the copy will need.  The copy's marker
   gets the resync's *mark* (a negative tag): from now until a resync completes, a coordinator
   that restarts keeps the copy out (state NEW).
2. The command takes a consistent snapshot of the source that also reads the source's marker,
   ``(S, tag)``: PostgreSQL, a REPEATABLE READ transaction; SQLite, a read transaction on the
   file in WAL mode, or else an online backup of it into a file next to the copy.  The write
   order is never held: writes go on everywhere else meanwhile.
3. In ONE transaction on the copy: every load-balanced table emptied and refilled in chunks
   (bounded memory; PostgreSQL COPY streams, SQLite ``INSERT ... SELECT`` from the attached
   snapshot), foreign keys checked at COMMIT only, PostgreSQL sequences reset past the copied
   keys (as ``sqlsequencereset``), SQLite's ``sqlite_sequence`` taken from the source, and the
   marker set to ``(S, mark)``.  Either all of it is there or none of it.
4. ``resync_done``: the copy's thread turns the marker into ``(S, tag)`` -- only if it is the one
   this resync committed -- and replays the journal after S, as after an outage; then RUNNING.
5. The command compares the copy with the source (``verify``) and ends the resync
   (``resync_end``); on any failure it aborts it (``resync_abort``): the copy stays NEW.

The command tells the coordinator it is alive every ``HEARTBEAT`` seconds
(``resync_progress``); a resync not heard of for ``LEASE`` seconds is abandoned (the copy
becomes NEW, the pin is dropped).  A second ``resync`` of the same copy takes over from a
command that is gone (its pid no longer runs on this host, or its lease ran out).
"""
from __future__ import annotations

import glob
import io
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

from django_lb_shm import apps
from django_lb_shm.coordinator.db_thread import (
    MARKER_CREATE,
    MARKER_ROW,
    MARKER_TABLE,
)
from django_lb_shm.coordinator.resync import HEARTBEAT
from django_lb_shm.databases.ownership import sqlite_path
from django_lb_shm.errors import LoadBalancerError, ResyncError
from django_lb_shm.ops.verify import compare_tables, format_report, table_spec
from django_lb_shm.routers import is_load_balanced
from django_lb_shm.settings.config import LoadBalancerConfig, get_config
from django_lb_shm.shm.state import pid_alive
from django_lb_shm.wire.exit_codes import (
    EXIT_RESYNC_FAILED,
    EXIT_RESYNC_USAGE,
    EXIT_RESYNCED,
)

logger = logging.getLogger("django_lb_shm.resync")


REPLAY_STALL = 60.0     # the replay must make progress within this, or the command gives up waiting
VERIFY_ATTEMPTS = 5     # the apps keep writing: a row may differ for a moment while a write is on its way
SOURCE_ALIAS = "lb_source"
MAX_ROWID = 2 ** 63 - 1


def resync(alias: str, source: Optional[str] = None, chunk_size: int = 10000, max_rate: float = 0.0,
           migrate: bool = True, verify: bool = True, stream: Optional[TextIO] = None) -> int:
    """``djangoloadbalancer resync``: refill ``alias`` from ``source`` while the coordinator runs.

    0 when ``alias`` is RUNNING again and (unless ``verify`` is off) identical to the source;
    1 when it failed (the copy is left out of reads, or untouched); 2 for bad arguments.
    """
    # not at module top: the coordinator imports this module (ResyncDesk), and the client side
    # (client/reads.py, the drivers' type modules) has no business in the supervisor or coordinator
    from django_lb_shm.client.connection import ClientConnection

    stream = stream if stream is not None else sys.stdout
    config = get_config()
    problem = _argument_problem(config, alias, source, chunk_size, max_rate)
    if problem:
        stream.write(f"resync: {problem}\n")
        return EXIT_RESYNC_USAGE
    client = ClientConnection(config)
    show = Progress(stream)
    try:
        began = client.call("resync_begin", alias, source, os.getpid(), socket.gethostname())
    except LoadBalancerError as exc:
        client.forget_connection()
        show.say(f"resync of {alias} not started: {exc}")
        return EXIT_RESYNC_FAILED
    run = ResyncRun(client, alias, began["source"], began["nonce"], began["pin"], show, chunk_size, max_rate)
    try:
        return run.execute(migrate=migrate, verify=verify)
    finally:
        client.forget_connection()


def _argument_problem(config: LoadBalancerConfig, alias: str, source: Optional[str], chunk_size: int, max_rate: float) -> str:
    names = ", ".join(config.databases)
    if alias not in config.databases:
        return f"{alias!r} is not in LOAD_BALANCER['DATABASES'] ({names})"
    if source is not None and source not in config.databases:
        return f"--from {source!r} is not in LOAD_BALANCER['DATABASES'] ({names})"
    if source == alias:
        return f"{alias!r} cannot be resynced from itself"
    if chunk_size < 1:
        return f"--chunk-size must be at least 1, got {chunk_size}"
    if max_rate < 0:
        return f"--max-rate must not be negative, got {max_rate:g}"
    return ""


class ResyncRun:
    """One run of the command, from the coordinator's go-ahead to the end (or the abort)."""

    def __init__(self, client: Any, alias: str, source: str, nonce: int, pin: int, show: "Progress",
                 chunk_size: int, max_rate: float):
        self.client = client
        self.alias = alias
        self.source = source
        self.nonce = nonce
        self.pin = pin
        self.show = show
        self.chunk_size = chunk_size
        self.max_rate = max_rate
        self.counts: dict[str, int] = {}
        self.copied = 0
        self.seq = 0
        self.timings: dict[str, float] = {}
        self.copy_started = 0.0
        self.heartbeat = Heartbeat(client, alias, nonce, self.describe)

    def describe(self) -> dict:
        return {"copied_rows": self.copied, "tables": dict(self.counts), "at": self.seq}

    def execute(self, migrate: bool, verify: bool) -> int:
        self.show.say(f"resync of {self.alias} from {self.source}: {self.alias} is RESYNCING (no reads; its "
                      f"writes wait in the journal, kept from #{self.pin})")
        self.heartbeat.start()
        started = time.monotonic()
        try:
            if migrate:
                self._migrate()
            tag = self._copy()
            self._hand_over(tag)
            self._wait_running()
            differences = self._verify() if verify else []
            if differences:
                raise ResyncError(f"{self.alias} differs from {self.source} after the resync: "
                                  + "; ".join(differences))
            self.client.call("resync_end", self.alias, self.nonce)
        except BaseException as exc:
            self._abort(exc)
            return EXIT_RESYNC_FAILED
        finally:
            self.heartbeat.stop()
            _close_django_connections(self.alias, self.source)
        self._summary(time.monotonic() - started, verified=verify)
        return EXIT_RESYNCED

    # -- the steps -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        from django.core.management import call_command

        apps.migrating_every_database = True   # (no "only this copy was migrated" warning)
        out = io.StringIO()
        t0 = time.monotonic()
        call_command("migrate", database=self.alias, interactive=False, verbosity=1, stdout=out)
        _close_django_connections(self.alias)
        applied = out.getvalue().count("... OK")
        self.timings["migrate"] = time.monotonic() - t0
        self.show.say(f"migrate {self.alias}: {applied or 'no'} migration{'' if applied == 1 else 's'} applied")

    def _copy(self) -> int:
        """The copy, committed on ``alias`` at the source's marker; the source's tag at that marker."""
        specs, models = copy_plan(self.source)
        t0 = time.monotonic()
        with open_copier(self.source, self.alias, models) as copier:
            self.seq, tag = copier.snapshot()
            self.timings["snapshot"] = time.monotonic() - t0
            self.show.say(f"snapshot of {self.source} at write #{self.seq}" + copier.snapshot_note())
            if self.seq < self.pin:
                raise ResyncError(f"the snapshot of {self.source} is at #{self.seq}, before the journal's pin "
                                  f"#{self.pin}: {self.source} went back in time?")
            totals = {spec.table: copier.count(spec) for spec in specs}
            copier.clear(specs)
            t1 = self.copy_started = time.monotonic()
            for spec in specs:
                self._copy_table(copier, spec, totals[spec.table])
            copier.finish(self.seq, -self.nonce)
            self._still_held()    # not committed into a copy whose resync the coordinator no longer holds
            copier.commit()
            self.timings["copy"] = time.monotonic() - t1   # (COMMIT included: foreign keys, the disk)
        return tag

    def _copy_table(self, copier: Any, spec: Any, total: int) -> None:
        self.show.table(spec.table, total)
        done = 0
        for rows in copier.copy_table(spec, self.chunk_size):
            done += rows
            self.copied += rows
            self.counts[spec.table] = done
            self.show.advance(rows)
            self.heartbeat.check()
            _pace(self.copied, self.copy_started, self.max_rate)
        self.counts[spec.table] = done
        self.show.table_done()

    def _still_held(self) -> None:
        self.heartbeat.check()
        self.client.call("resync_progress", self.alias, self.nonce, self.describe())

    def _hand_over(self, tag: int) -> None:
        self.client.call("resync_done", self.alias, self.nonce, self.seq, tag)

    def _wait_running(self) -> None:
        """Until the coordinator has replayed the writes after the copy; 'replay left' on the way."""
        t0 = time.monotonic()
        last_left, moved = None, time.monotonic()
        while True:
            self.heartbeat.check()
            answer = self.heartbeat.poll()
            state, left = answer["state"], max(0, answer["last_seq"] - answer["applied_seq"])
            if state == "RUNNING":
                break
            if state != "RECOVERING":
                raise ResyncError(f"{self.alias} became {state} while replaying the journal after the copy; "
                                  "see `djangoloadbalancer status`")
            if left != last_left:
                last_left, moved = left, time.monotonic()
                self.show.live(f"replay: {left} journaled write{'' if left == 1 else 's'} left")
            elif time.monotonic() - moved > REPLAY_STALL:
                raise ResyncError(f"the replay of {self.alias} made no progress for {REPLAY_STALL:.0f} s")
            time.sleep(0.1)
        self.timings["replay"] = time.monotonic() - t0
        self.show.say(f"replay: done, {self.alias} is RUNNING "
                      f"({answer['applied_seq'] - self.seq} journaled writes applied after #{self.seq})")

    def _verify(self) -> list[str]:
        """What still differs between the copy and its source after a few tries (the apps write on)."""
        specs, _models = copy_plan(self.source)
        t0 = time.monotonic()
        for attempt in range(VERIFY_ATTEMPTS):
            reports = compare_tables([self.source, self.alias], specs, chunk_size=2000, show=5)
            specs = [spec for spec, report in zip(specs, reports) if not report.ok]
            if not specs:
                self.timings["verify"] = time.monotonic() - t0
                self.show.say(f"verify: {self.alias} and {self.source} are identical ({len(reports)} table(s) "
                              "compared, the last ones again)" if attempt else
                              f"verify: {self.alias} and {self.source} are identical")
                return []
            self.heartbeat.check()
            time.sleep(0.5 * (attempt + 1))
        return [line.strip() for report in reports if not report.ok for line in format_report(report)[:3]]

    def _abort(self, exc: BaseException) -> None:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (LoadBalancerError, KeyboardInterrupt)):
            logger.debug("resync failed", exc_info=exc)
        try:
            self.client.call("resync_abort", self.alias, self.nonce, reason)
            where = f"{self.alias} is left out of reads (state NEW) until a resync completes"
        except Exception as lost:
            told = "" if isinstance(lost, ResyncError) else f"the coordinator could not be told ({lost}); "
            where = (f"{told}{self.alias} stays out of reads: its marker carries the resync's mark until a "
                     "resync completes")
        self.show.say(f"resync of {self.alias} FAILED: {reason}\n{where}; run `djangoloadbalancer resync "
                      f"{self.alias}` again")

    def _summary(self, elapsed: float, verified: bool) -> None:
        copy_time = self.timings.get("copy", 0.0)
        rate = self.copied / copy_time if copy_time > 0 else 0.0
        lines = [f"resync of {self.alias} from {self.source}: done in {elapsed:.1f} s"]
        for table, rows in self.counts.items():
            lines.append(f"  {table:<32} {rows:>12,} rows")
        lines.append(f"  copied {self.copied:,} rows in {copy_time:.1f} s ({rate:,.0f} rows/s) at write #{self.seq}")
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
        lines.append(f"  {steps}")
        lines.append(f"  {self.alias} is RUNNING" + (f" and identical to {self.source}" if verified else
                                                     " (not verified: --no-verify)"))
        self.show.say("\n".join(lines))


def _pace(done: int, started: float, max_rate: float) -> None:
    """--max-rate: sleep as long as the copy is ahead of ``max_rate`` rows per second."""
    if max_rate > 0:
        ahead = done / max_rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


class Heartbeat(threading.Thread):
    """Gives the coordinator word every HEARTBEAT seconds; a refusal (the resync is no longer held)
    stops the command at its next check."""

    def __init__(self, client: Any, alias: str, nonce: int, describe: Callable[[], dict]):
        super().__init__(name="resync-heartbeat", daemon=True)
        self.client, self.alias, self.nonce, self.describe = client, alias, nonce, describe
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT):
            try:
                self.poll()
            except Exception as exc:
                self.error = exc
                return

    def poll(self) -> dict:
        return self.client.call("resync_progress", self.alias, self.nonce, self.describe())

    def check(self) -> None:
        if isinstance(self.error, ResyncError):
            raise self.error
        if self.error is not None:
            raise ResyncError(f"lost the coordinator during the resync ({type(self.error).__name__}: {self.error})")

    def stop(self) -> None:
        self.stopped.set()


class Progress:
    """What the command prints: a line redrawn in place on a terminal, whole lines otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = _isatty(stream)
        self.live_line = False
        self.name, self.total, self.done, self.table_started, self.drawn = "", 0, 0, 0.0, 0.0

    def say(self, text: str) -> None:
        self._end_live()
        self.stream.write(text + "\n")
        self.stream.flush()

    def live(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text[:200] + "\x1b[K")
            self.stream.flush()
            self.live_line = True

    def table(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.table_started, self.drawn = name, total, 0, time.monotonic(), 0.0
        self.live(f"{name}: 0 / {total:,} rows")

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.drawn >= 0.1:
            self.drawn = now
            rate = self.done / max(now - self.table_started, 1e-6)
            self.live(f"{self.name}: {self.done:,} / {self.total:,} rows  {rate:,.0f} rows/s")

    def table_done(self) -> None:
        seconds = time.monotonic() - self.table_started
        self.say(f"  {self.name:<32} {self.done:>12,} rows in {seconds:6.1f} s "
                 f"({self.done / max(seconds, 1e-6):,.0f} rows/s)")

    def _end_live(self) -> None:
        if self.live_line:
            self.stream.write("\r\x1b[K")
            self.live_line = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _close_django_connections(*aliases: str) -> None:
    from django.db import connections

    for alias in aliases:
        try:
            connections[alias].close()
        except Exception:
            pass


# -- what is copied ----------------------------------------------------------------------------
def copy_plan(alias: str) -> tuple[list, list]:
    """(TableSpec per load-balanced table, the models) -- tables referenced by others first."""
    from django.apps import apps

    models: dict[str, Any] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.abstract or meta.proxy or meta.swapped or not meta.managed or not is_load_balanced(model):
            continue
        models.setdefault(meta.db_table, model)
    ordered = _parents_first(list(models.values()))
    return [table_spec(model, alias) for model in ordered], ordered


def _parents_first(models: list) -> list:
    """Referenced tables before the tables that reference them (cycles: as they come)."""
    tables = {m._meta.db_table: m for m in models}
    parents = {table: {f.related_model._meta.db_table for f in m._meta.local_concrete_fields
                       if f.is_relation and f.related_model is not None
                       and f.related_model._meta.db_table in tables and f.related_model._meta.db_table != table}
               for table, m in tables.items()}
    ordered: list = []
    placed: set = set()

    def place(table: str, path: tuple) -> None:
        if table in placed or table in path:
            return
        for parent in sorted(parents[table]):
            place(parent, path + (table,))
        placed.add(table)
        ordered.append(tables[table])

    for table in sorted(tables):
        place(table, ())
    return ordered


# -- the copiers: one snapshot of the source, one transaction on the copy -----------------------------
def open_copier(source: str, alias: str, models: list) -> Any:
    from django.db import connections

    vendor = connections[alias].vendor
    if vendor == "sqlite":
        return SqliteCopier(source, alias)
    if vendor == "postgresql":
        return PostgresCopier(source, alias, models)
    raise ResyncError(f"resync supports SQLite and PostgreSQL, not {vendor}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _marker_statements(seq: int, mark: int) -> list[str]:
    return [MARKER_CREATE, MARKER_ROW, f"UPDATE {MARKER_TABLE} SET seq = {int(seq)}, tag = {int(mark)} WHERE id = 1"]


class SqliteCopier:
    """SQLite: the source's snapshot is ATTACHed to one connection to the copy, and each table is
    copied by ``INSERT ... SELECT`` in rowid ranges inside the copy's one transaction.

    The snapshot is a read transaction on the source file when it is in WAL mode (writers go on);
    otherwise (a rollback journal: a reader would hold off the source's writers for the whole copy)
    an online backup of the source into a file next to the copy, taken in one step -- writes to the
    source wait for that step only -- and read from there.
    """

    def __init__(self, source: str, alias: str):
        from django.db import connections

        self.source_path = sqlite_path(connections.settings[source])
        self.target_path = sqlite_path(connections.settings[alias])
        self.snapshot_file = ""
        self.note = ""
        self.db: Any = None

    def __enter__(self) -> "SqliteCopier":
        for path in (self.source_path, self.target_path):
            if not os.path.exists(path):
                raise ResyncError(f"the SQLite file {path} does not exist")
        self.db = sqlite3.connect(self.target_path, isolation_level=None, timeout=60, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except Exception:
            pass
        self.db.close()
        if self.snapshot_file:
            for suffix in ("", "-journal", "-wal", "-shm"):
                try:
                    os.unlink(self.snapshot_file + suffix)
                except FileNotFoundError:
                    pass

    def snapshot(self) -> tuple[int, int]:
        path = self.source_path
        if _journal_mode(path) != "wal":
            path = self.snapshot_file = self._backup()
        self.db.execute(f"ATTACH DATABASE ? AS {SOURCE_ALIAS}", (path,))
        self.db.execute("BEGIN")    # deferred: a write lock is taken on the copy only, when it writes
        try:
            row = self.db.execute(f"SELECT seq, tag FROM {SOURCE_ALIAS}.{MARKER_TABLE} WHERE id = 1").fetchone()
        except sqlite3.OperationalError as exc:
            raise ResyncError(f"the source has no {MARKER_TABLE} table ({exc}): is it served by this "
                              "coordinator?") from None
        self.db.execute("PRAGMA defer_foreign_keys = ON")   # foreign keys are checked at COMMIT
        if row is None or row[1] < 0:
            raise ResyncError("the source's marker is missing or carries a resync's mark: it is not a whole copy")
        return int(row[0]), int(row[1])

    def _backup(self) -> str:
        _remove_stale_snapshots(self.target_path)
        target = f"{self.target_path}.resync-{os.getpid()}.tmp"
        t0 = time.monotonic()
        source = sqlite3.connect(self.source_path, timeout=60)
        snapshot = sqlite3.connect(target)
        try:
            source.backup(snapshot)     # one step: a consistent image, under one read lock
        finally:
            snapshot.close()
            source.close()
        size = os.path.getsize(target) / 1e6
        self.note = (f" (the source is not in WAL mode: online backup of {size:.1f} MB in "
                     f"{time.monotonic() - t0:.2f} s; writes to it waited meanwhile)")
        return target

    def snapshot_note(self) -> str:
        return self.note or " (a read transaction on the source's WAL: writers go on)"

    def count(self, spec: Any) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {SOURCE_ALIAS}.{_quote(spec.table)}").fetchone()[0]

    def clear(self, specs: Sequence[Any]) -> None:
        self.tables = [spec.table for spec in specs]
        for spec in reversed(specs):
            self.db.execute(f"DELETE FROM main.{_quote(spec.table)}")

    def copy_table(self, spec: Any, chunk_size: int) -> Iterator[int]:
        """In rowid ranges of ``chunk_size`` rows (an index range each: bounded work per chunk)."""
        table = _quote(spec.table)
        columns = ", ".join(_quote(c) for c in spec.columns)
        insert = (f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM {SOURCE_ALIAS}.{table} "
                  "WHERE rowid >= ? AND rowid <= ?")
        low = self.db.execute(f"SELECT MIN(rowid) FROM {SOURCE_ALIAS}.{table}").fetchone()[0]
        while low is not None:
            bound = self.db.execute(f"SELECT rowid FROM {SOURCE_ALIAS}.{table} WHERE rowid >= ? ORDER BY rowid "
                                    "LIMIT 1 OFFSET ?", (low, chunk_size - 1)).fetchone()
            high = bound[0] if bound is not None else MAX_ROWID
            yield self.db.execute(insert, (low, high)).rowcount
            low = high + 1 if high < MAX_ROWID else None

    def finish(self, seq: int, mark: int) -> None:
        """``sqlite_sequence`` as the source's (where AUTOINCREMENT keys go on), and the marker."""
        if self._has_sequences(SOURCE_ALIAS) and self._has_sequences("main"):
            marks = ", ".join("?" * len(self.tables))
            self.db.execute(f"DELETE FROM main.sqlite_sequence WHERE name IN ({marks})", self.tables)
            self.db.execute(f"INSERT INTO main.sqlite_sequence (name, seq) SELECT name, seq FROM "
                            f"{SOURCE_ALIAS}.sqlite_sequence WHERE name IN ({marks})", self.tables)
        for sql in _marker_statements(seq, mark):
            self.db.execute(sql)

    def _has_sequences(self, schema: str) -> bool:
        return self.db.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE name = 'sqlite_sequence'").fetchone() \
            is not None

    def commit(self) -> None:
        self.db.execute("COMMIT")   # deferred foreign keys are checked here: a violation refuses it


def _journal_mode(path: str) -> str:
    db = sqlite3.connect(path, timeout=60)
    try:
        return str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    finally:
        db.close()


def _remove_stale_snapshots(target_path: str) -> None:
    """Snapshot files left by a resync command that was killed (its pid no longer runs)."""
    for path in glob.glob(glob.escape(target_path) + ".resync-*.tmp"):
        try:
            pid = int(path.rsplit(".resync-", 1)[1].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            for suffix in ("", "-journal"):
                try:
                    os.unlink(path + suffix)
                except FileNotFoundError:
                    pass


class PostgresCopier:
    """PostgreSQL: a REPEATABLE READ, READ ONLY transaction on the source (its first statement reads
    the marker, so every table is read in the snapshot of that marker), and one transaction on the
    copy: constraints deferred, the tables truncated, each table streamed ``COPY ... TO STDOUT`` ->
    ``COPY ... FROM STDIN`` in blocks, sequences reset, the marker set."""

    FLUSH_BYTES = 1 << 20

    def __init__(self, source: str, alias: str, models: list):
        self.source, self.alias, self.models = source, alias, models
        self.wrappers: list = []

    def __enter__(self) -> "PostgresCopier":
        self.src = self._connect(self.source)
        self.dst = self._connect(self.alias)
        return self

    def _connect(self, alias: str) -> Any:
        from django.db import connections

        wrapper = connections.create_connection(alias)
        wrapper.ensure_connection()
        self.wrappers.append(wrapper)
        raw = wrapper.connection
        raw.autocommit = True   # transactions are begun and ended here, by SQL
        return raw

    def __exit__(self, *exc: Any) -> None:
        for wrapper in self.wrappers:
            try:
                wrapper.connection.execute("ROLLBACK")
            except Exception:
                pass
            try:
                wrapper.close()
            except Exception:
                pass

    def snapshot(self) -> tuple[int, int]:
        import psycopg

        self.src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        self.src.execute("SET LOCAL statement_timeout = 0")
        self.src.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        try:
            row = self.src.execute(f"SELECT seq, tag FROM {MARKER_TABLE} WHERE id = 1").fetchone()
        except psycopg.errors.UndefinedTable:
            raise ResyncError(f"the source has no {MARKER_TABLE} table: is it served by this coordinator?") from None
        if row is None or row[1] < 0:
            raise ResyncError("the source's marker is missing or carries a resync's mark: it is not a whole copy")
        self.dst.execute("BEGIN")
        self.dst.execute("SET LOCAL statement_timeout = 0")
        self.dst.execute("SET CONSTRAINTS ALL DEFERRED")   # Django's foreign keys are DEFERRABLE: checked at COMMIT
        return int(row[0]), int(row[1])

    def snapshot_note(self) -> str:
        return " (a REPEATABLE READ snapshot: writers go on)"

    def count(self, spec: Any) -> int:
        return self.src.execute(f"SELECT COUNT(*) FROM {_quote(spec.table)}").fetchone()[0]

    def clear(self, specs: Sequence[Any]) -> None:
        self.dst.execute("TRUNCATE " + ", ".join(_quote(spec.table) for spec in specs))

    def copy_table(self, spec: Any, chunk_size: int) -> Iterator[int]:
        """Streamed in blocks of ``chunk_size`` rows (or FLUSH_BYTES, whichever comes first)."""
        table, columns = _quote(spec.table), ", ".join(_quote(c) for c in spec.columns)
        with self.src.cursor() as out_cursor, self.dst.cursor() as in_cursor:
            with out_cursor.copy(f"COPY (SELECT {columns} FROM {table}) TO STDOUT") as out, \
                    in_cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as into:
                block, rows = bytearray(), 0
                for data in out:
                    block += data
                    rows += block.count(b"\n", len(block) - len(data))   # one line per row (text format)
                    if rows >= chunk_size or len(block) >= self.FLUSH_BYTES:
                        into.write(bytes(block))
                        yield rows
                        block, rows = bytearray(), 0
                if block:
                    into.write(bytes(block))
                    yield rows

    def finish(self, seq: int, mark: int) -> None:
        from django.core.management.color import no_style
        from django.db import connections

        for sql in connections[self.alias].ops.sequence_reset_sql(no_style(), self.models):
            self.dst.execute(sql)
        for sql in _marker_statements(seq, mark):
            self.dst.execute(sql)

    def commit(self) -> None:
        self.dst.execute("COMMIT")   # deferred foreign keys are checked here
        self.src.execute("COMMIT")
