"""Fault injection against real coordinators and real databases (issue 13): the journal decides.

Each scenario starts its own coordinator (lb_factory), writes through the ORM while
recording every operation and what the app was told (tests/support/history.py),
injects one fault -- a COMMIT whose answer is lost (tests/support/fault_proxy.py in
front of the leader's PostgreSQL server), a refused commit before a restart, a full
journal disk, a missing journal, kill -9 of the coordinator or of the leader's
postmaster -- heals, waits until every copy is RUNNING with nothing pending, then
checks the history against what every copy holds and runs `verify`.

The randomized part runs LB_FAULT_SCHEDULES schedules (default 4) seeded by
LB_FAULT_SEED (default: random, printed).
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from django.db import IntegrityError, connections, transaction

import django_lb_shm
from django_lb_shm.errors import JournalError
from django_lb_shm.ops.verify import EXIT_DIFFERENT, EXIT_IDENTICAL, verify
from tests.support.fault_proxy import FaultProxy
from tests.support.history import History, Write
from tests.support.lb import ALIASES, BACKEND, REPO, clear_tables
from tests.support.pg_cluster import PgCommandError
from tests.support.waiting import NOT_ANSWERING, pid_gone, wait_pid_gone, wait_until
from tests.testapp.models import Author, Book, Note, Review, Tag

# The first database other than 'default' takes the writes (Sequencer.leader_preference).
LEADER = [a for a in ALIASES if a != "default"][0]
FOLLOWER = "DB2"
MARKER_TABLE = "django_lb_shm_applied"

postgres_only = pytest.mark.postgres_only


# -- helpers -----------------------------------------------------------------------------------
def pg_server(alias: str):
    return pytest.lb_pg_cluster.servers[ALIASES.index(alias)]


def close_connections() -> None:
    for alias in ALIASES:
        connections[alias].close()


def crash_pg(server) -> int:
    """kill -9 of the postmaster; waits until it is gone."""
    pid = server.postmaster_pid()
    assert pid, f"{server!r} has no postmaster"
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid, 15, "postmaster (after SIGKILL)")
    return pid


def ensure_pg_up(server, timeout: float = 40) -> None:
    """Accepting connections (pg_ctl status can be fooled by a killed postmaster's pid file)."""
    try:
        server.psql("SELECT 1", timeout=10)
        return
    except PgCommandError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        pid = server.postmaster_pid()
        if pid and pid_gone(pid):
            try:
                os.unlink(os.path.join(server.datadir, "postmaster.pid"))   # a stale pid file
            except OSError:
                pass
        try:
            server.start(timeout=20)
            server.psql("SELECT 1", timeout=10)
            return
        except PgCommandError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Diverged(AssertionError):
    """A copy went DIVERGED while the test waited for it to settle: no use waiting on."""


def settle(handle, aliases=ALIASES, timeout: float = 60) -> dict:
    """Every copy in ``aliases`` RUNNING and every write applied; fails at once on a DIVERGED copy."""
    handle.wait_ready(timeout)

    def states() -> dict[str, str]:
        return {d["name"]: d["state"] for d in handle.status()["databases"]}

    def running() -> bool:
        now = states()
        diverged = [a for a in aliases if now[a] == "DIVERGED"]
        if diverged:
            raise Diverged(f"{', '.join(diverged)} DIVERGED ({now}):\n{handle.log()}")
        return all(now[a] == "RUNNING" for a in aliases)

    try:
        wait_until(running, timeout, f"every copy of {list(aliases)} RUNNING", describe=states)
    except Diverged:
        raise
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{handle.log()}") from None
    return handle.wait_drained(min(timeout, 30))


def markers() -> dict:
    close_connections()
    out = {}
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"SELECT seq FROM {MARKER_TABLE} WHERE id = 1")
            out[alias] = int(cursor.fetchone()[0])
    return out


def run_verify() -> tuple[int, str]:
    close_connections()
    out = io.StringIO()
    code = verify(stream=out, progress=False)
    return code, out.getvalue()


def check_everything(handle, history: History, aliases=ALIASES) -> None:
    """Settle, then: the history holds on every copy, the markers agree, verify says identical."""
    status = settle(handle, aliases)
    close_connections()
    history.check(aliases)
    last = status["coordinator"]["last_seq"]
    seen = markers()
    assert all(seen[a] == last for a in aliases), f"markers {seen} vs the coordinator's last_seq {last}"
    code, out = run_verify()
    assert code == EXIT_IDENTICAL, out


def wait_restarted(handle, old_pid: int, timeout: float = 60) -> None:
    """The supervisor started a new coordinator after ``old_pid`` died."""
    def restarted() -> bool:
        status = handle.status(timeout=2)
        return status["coordinator"]["pid"] not in (0, old_pid) and status["coordinator"]["state"] == "READY"

    try:
        wait_until(restarted, timeout, f"a new coordinator after kill -9 of {old_pid}", every=0.1,
                   ignoring=NOT_ANSWERING)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{handle.log()}") from None


def kill9_coordinator(handle) -> int:
    pid = handle.coordinator_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def create_author(rec, token: str, rating: int = 0):
    return rec.run("create", [Write("author", "create", token, rating)],
                   lambda: {token: Author.objects.create(name=token, rating=rating).pk})


def refused_deferred_commit() -> None:
    """A block whose deferred foreign key is refused at COMMIT: IntegrityError, nothing applied."""
    with pytest.raises(IntegrityError):
        with django_lb_shm.atomic():
            Book.objects.create(author_id=10**9, title="orphan")


class Faults:
    """What a test broke, undone in teardown whatever happened (servers, files, mounts, processes)."""

    def __init__(self, lb_factory, tmp: Path):
        self.lb_factory = lb_factory
        self.tmp = tmp
        self.handles: list = []
        self.proxies: list[FaultProxy] = []
        self.moved: list[str] = []
        self.mounts: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.history = History(tmp / "history")

    # coordinators
    def coordinator(self, **kwargs):
        kwargs.setdefault("CLIENT_TIMEOUT", 10)
        # A journal of the test's own: a test that breaks one (the pre-fix code did) breaks no other test.
        kwargs.setdefault("JOURNAL_DIR", str(self.tmp / "journal"))
        handle = self.lb_factory("faults", **kwargs)
        self.handles.append(handle)
        return handle

    def proxy_for(self, alias: str) -> FaultProxy:
        proxy = FaultProxy(pg_server(alias).port)
        self.proxies.append(proxy)
        return proxy

    # a copy unreachable: PostgreSQL server stopped, SQLite file moved away
    def copy_down(self, alias: str) -> None:
        if BACKEND == "postgres":
            pg_server(alias).stop(mode="immediate")
            return
        path = str(connections[alias].settings_dict["NAME"])
        connections[alias].close()
        os.rename(path, path + ".away")
        self.moved.append(path)

    def copy_up(self, alias: str) -> None:
        if BACKEND == "postgres":
            ensure_pg_up(pg_server(alias))
            return
        path = str(connections[alias].settings_dict["NAME"])
        self._put_back(path)

    @staticmethod
    def _put_back(path: str) -> None:
        if os.path.exists(path + ".away"):
            if os.path.exists(path):
                os.unlink(path)
            os.rename(path + ".away", path)

    def mount_tmpfs(self, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a tmpfs JOURNAL_DIR needs root (mount -t tmpfs)")
        target = Path(tempfile.mkdtemp(prefix="lb_fault_tmpfs_"))
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            target.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        self.mounts.append(str(target))
        return target

    def remount(self, target: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(target)], check=True, timeout=30,
                       capture_output=True)

    def teardown(self) -> None:
        """Every step runs even when an earlier one fails (a mount must never be left behind)."""
        errors: list[BaseException] = []

        def step(action, *args) -> None:
            try:
                action(*args)
            except BaseException as exc:   # noqa: BLE001 - reported after the other steps
                errors.append(exc)

        for proc in self.procs:
            if proc.poll() is None:
                step(proc.kill)
                step(proc.wait, 10)
        for handle in self.handles:
            step(handle.stop)
        for proxy in self.proxies:
            step(proxy.close)
        for path in self.moved:
            step(self._put_back, path)
        if BACKEND == "postgres":
            for alias in ALIASES:
                step(ensure_pg_up, pg_server(alias))
        close_connections()
        for target in self.mounts:
            step(_umount, target)
        step(repair_copies)
        if errors:
            raise errors[0]


def _umount(target: str) -> None:
    subprocess.run(["umount", target], capture_output=True, timeout=30)
    if subprocess.run(["mountpoint", "-q", target], timeout=10).returncode == 0:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
    try:
        os.rmdir(target)
    except OSError:
        pass


def repair_copies() -> None:
    """What an operator does to a diverged copy: the same (empty) rows and the same marker everywhere."""
    close_connections()
    clear_tables()
    rows = {}
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"SELECT * FROM {MARKER_TABLE} WHERE id = 1")
            columns = [c[0] for c in cursor.description]
            rows[alias] = cursor.fetchone()
    best = max(rows.values(), key=lambda r: r[columns.index("seq")])
    for alias, row in rows.items():
        if row != best:
            sets = ", ".join(f"{c} = %s" for c in columns if c != "id")
            with connections[alias].cursor() as cursor:
                cursor.execute(f"UPDATE {MARKER_TABLE} SET {sets} WHERE id = 1",
                               [v for c, v in zip(columns, best) if c != "id"])
    close_connections()


@pytest.fixture
def faults(lb_factory, tmp_path):
    env = Faults(lb_factory, tmp_path)
    try:
        yield env
    finally:
        env.teardown()


# -- a. the leader's COMMIT answer is lost -------------------------------------------------------
@postgres_only
def test_lost_commit_answer_on_autocommit_create_is_success_everywhere(faults):
    proxy = faults.proxy_for(LEADER)
    handle = faults.coordinator(databases={LEADER: {"PORT": proxy.port}})
    rec = faults.history.recorder("main")
    assert create_author(rec, "a-before")[0] == "ok"
    settle(handle)

    proxy.cut_after_commit(1)
    outcome, told = create_author(rec, "a-cut", 1)
    assert proxy.cuts == 1, f"no COMMIT was cut (armed {proxy.armed}): the leader is not {LEADER}?"
    assert outcome == "ok", f"the app was told {told!r} for a write whose record is durable"
    assert isinstance(told["a-cut"], int)

    # the next write gets a new sequence number and works
    assert create_author(rec, "a-after", 2)[0] == "ok"
    check_everything(handle, faults.history)


# -- b. the same inside atomic() -----------------------------------------------------------------
@postgres_only
def test_lost_commit_answer_of_an_atomic_block_is_success_everywhere(faults):
    proxy = faults.proxy_for(LEADER)
    handle = faults.coordinator(databases={LEADER: {"PORT": proxy.port}})
    rec = faults.history.recorder("main")
    assert create_author(rec, "b-before")[0] == "ok"
    settle(handle)

    proxy.cut_after_commit(1)

    def block():
        with django_lb_shm.atomic():
            author = Author.objects.create(name="b-author", rating=5)
            tag = Tag.objects.create(label="b-tag")
        return {"b-author": author.pk, "b-tag": tag.pk}

    outcome, told = rec.run("atomic", [Write("author", "create", "b-author", 5), Write("tag", "create", "b-tag")],
                            block)
    assert proxy.cuts == 1, f"no COMMIT was cut (armed {proxy.armed})"
    assert outcome == "ok", f"the app was told {type(told).__name__}: {told}"
    assert create_author(rec, "b-after", 3)[0] == "ok"
    check_everything(handle, faults.history)


# -- b2. the same inside a plain transaction.atomic() (its load-balanced twin commits first) ------
def plain_block_with_note(author: str, tag: str, note: str, rating: int = 0) -> dict:
    """Load-balanced writes and a plain model's write on 'default', in one plain block."""
    with transaction.atomic():
        a = Author.objects.create(name=author, rating=rating)
        t = Tag.objects.create(label=tag)
        Note.objects.create(author_id=a.pk, text=note)
    return {author: a.pk, tag: t.pk}


@pytest.fixture
def no_notes():
    Note.objects.all().delete()   # on 'default' only: not a load-balanced table
    yield
    close_connections()
    Note.objects.all().delete()


@postgres_only
def test_lost_commit_answer_of_a_plain_atomic_block_is_success_everywhere(faults, no_notes):
    proxy = faults.proxy_for(LEADER)
    handle = faults.coordinator(databases={LEADER: {"PORT": proxy.port}})
    rec = faults.history.recorder("main")
    assert create_author(rec, "p-before")[0] == "ok"
    settle(handle)

    proxy.cut_after_commit(1)
    outcome, told = rec.run("plain", [Write("author", "create", "p-author", 5), Write("tag", "create", "p-tag")],
                            lambda: plain_block_with_note("p-author", "p-tag", "p-note", 5))
    assert proxy.cuts == 1, f"no COMMIT was cut (armed {proxy.armed}): the twin's commit did not reach {LEADER}?"
    # The journal holds the commit: the truth is "committed", and 'default' committed after it.
    assert outcome == "ok", f"the app was told {type(told).__name__}: {told}"
    assert list(Note.objects.values_list("text", flat=True)) == ["p-note"]
    assert create_author(rec, "p-after", 3)[0] == "ok"
    check_everything(handle, faults.history)


def test_coordinator_killed_inside_a_plain_block_is_told_and_applied_nowhere(faults, no_notes):
    """kill -9 between two load-balanced writes of a plain block: the block's next statement
    says the transaction was lost and nothing applied; 'default' rolls back with it."""
    from django_lb_shm.errors import TransactionError

    handle = faults.coordinator()
    rec = faults.history.recorder("main")
    assert create_author(rec, "k-before")[0] == "ok"

    def block():
        with transaction.atomic():
            author = Author.objects.create(name="k-author", rating=1)
            wait_restarted(handle, kill9_coordinator(handle))
            # (after the restart: on SQLite this write locks 'default', a copy the coordinator opens)
            Note.objects.create(author_id=author.pk, text="k-note")
            Tag.objects.create(label="k-tag")
        return {}

    outcome, told = rec.run("plain", [Write("author", "create", "k-author", 1), Write("tag", "create", "k-tag")],
                            block)
    assert isinstance(told, TransactionError) and outcome == "fail", f"the app was told {told!r}"
    assert not Note.objects.filter(text="k-note").exists(), "'default' committed a block told as rolled back"
    assert create_author(rec, "k-after", 2)[0] == "ok"
    check_everything(handle, faults.history)


class _Undo(Exception):
    pass


@pytest.mark.parametrize("kind", ["plain", "explicit"])
def test_savepoint_rollback_lost_with_the_coordinator_is_not_a_silent_commit(faults, kind):
    """The app catches an exception outside an inner atomic block (Django's documented pattern); the
    coordinator died just before, so the inner savepoint cannot be rolled back. Django then rolls the
    outer block back when it ends -- without an exception: the app must be told, not left to believe
    its block committed (the kill -9 test caught this as an acknowledged block on no copy)."""
    from django_lb_shm.errors import TransactionError

    handle = faults.coordinator()
    rec = faults.history.recorder("main")
    outer = transaction.atomic if kind == "plain" else django_lb_shm.atomic

    def block():
        with outer():
            author = Author.objects.create(name=f"s-{kind}", rating=1)
            try:
                with outer():
                    Tag.objects.create(label=f"s-{kind}-dropped")
                    wait_restarted(handle, kill9_coordinator(handle))
                    raise _Undo
            except _Undo:
                pass
        return {f"s-{kind}": author.pk}

    outcome, told = rec.run(kind, [Write("author", "create", f"s-{kind}", 1)], block)
    assert isinstance(told, TransactionError) and outcome == "fail", f"the app was told {told!r}"
    assert "none of its writes were applied" in str(told), told
    assert create_author(rec, f"s-{kind}-after", 2)[0] == "ok"
    check_everything(handle, faults.history)


# -- c. issue case 2: a refused duplicate, then a lost COMMIT answer -----------------------------
@postgres_only
def test_lost_commit_after_a_refused_duplicate_keeps_the_told_key(faults):
    proxy = faults.proxy_for(LEADER)
    handle = faults.coordinator(databases={LEADER: {"PORT": proxy.port}})
    rec = faults.history.recorder("main")
    assert create_author(rec, "c-one")[0] == "ok"
    outcome, exc = create_author(rec, "c-one")
    assert outcome == "fail" and isinstance(exc, IntegrityError), exc
    settle(handle)

    proxy.cut_after_commit(1)
    outcome, told = create_author(rec, "c-cut", 7)
    assert proxy.cuts == 1
    assert outcome == "ok", f"the app was told {told!r}"
    pk = told["c-cut"]
    assert create_author(rec, "c-after", 8)[0] == "ok"
    check_everything(handle, faults.history)
    close_connections()
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT id FROM testapp_author WHERE name = %s", ["c-cut"])
            assert cursor.fetchall() == [(pk,)], f"{alias}: the app was told pk {pk}"


# -- d. issue case 5: a refused commit is the journal's last record, then restarts ---------------
def test_refused_commit_as_last_record_does_not_block_writes_after_restarts(faults):
    handle = faults.coordinator(CLIENT_TIMEOUT=8)
    rec = faults.history.recorder("main")
    assert create_author(rec, "d-before")[0] == "ok"

    refused_deferred_commit()
    handle.stop()                                  # SIGTERM, then start again
    handle.start()
    started = time.monotonic()
    outcome, told = create_author(rec, "d-after-stop")
    assert outcome == "ok", f"after a SIGTERM restart, {told!r} ({time.monotonic() - started:.1f}s)"

    refused_deferred_commit()
    old = kill9_coordinator(handle)                # kill -9: the supervisor starts a new one
    wait_restarted(handle, old)
    outcome, told = create_author(rec, "d-after-kill")
    assert outcome == "ok", f"after kill -9 of the coordinator, {told!r}"

    refused_deferred_commit()
    old = handle.coordinator_pid()
    os.kill(handle.supervisor_pid, signal.SIGHUP)  # the supervisor restarts the coordinator gracefully
    wait_restarted(handle, old)
    outcome, told = create_author(rec, "d-after-sighup")
    assert outcome == "ok", f"after SIGHUP, {told!r}"

    check_everything(handle, faults.history)
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM testapp_book")
            assert cursor.fetchone()[0] == 0, f"a refused block left a book on {alias}"


# -- e. issue case 3: the journal disk fills up, then a restart with a copy away -----------------
def test_full_journal_disk_fails_cleanly_and_a_restart_keeps_later_records(faults):
    mount = faults.mount_tmpfs("1m")
    journal_dir = mount / "journal"
    handle = faults.coordinator(JOURNAL_DIR=str(journal_dir))
    rec = faults.history.recorder("main")
    assert create_author(rec, "e-owner")[0] == "ok"
    book = Book.objects.create(title="big", author=Author.objects.get(name="e-owner"))
    big = "x" * 30_000

    acked, failure = 0, None
    for i in range(80):
        try:
            Review.objects.create(book=book, stars=i, text=big)
            acked += 1
        except JournalError as exc:   # README "Errors": the journal could not record it, applied nowhere
            failure = exc
            break
    assert failure is not None, "80 writes of 30 KB fitted in a 1 MiB JOURNAL_DIR"
    problems = []
    if "JOURNAL_DIR" not in str(failure) and str(journal_dir) not in str(failure):
        problems.append(f"the error does not name JOURNAL_DIR: {type(failure).__name__}: {failure}")
    # the coordinator keeps serving reads; the failed write is applied nowhere
    assert Review.objects.count() == acked
    handle.wait_drained()
    close_connections()
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM testapp_review WHERE stars >= %s", [acked])
            assert cursor.fetchone()[0] == 0, f"the write refused for a full journal is on {alias}"

    faults.remount(mount, "8m")
    Review.objects.filter(book=book).delete()
    assert Review.objects.count() == 0
    assert create_author(rec, "e-small")[0] == "ok"

    faults.copy_down(FOLLOWER)
    for i in range(10):
        outcome, told = create_author(rec, f"e-away-{i}", i)
        assert outcome == "ok", told
    handle.wait_state(FOLLOWER, "DOWN", timeout=15)
    handle.stop()
    handle.start()
    faults.copy_up(FOLLOWER)
    handle.wait_state(FOLLOWER, "RUNNING", timeout=30)
    # no read may see the copy with a gap (round robin: every copy is read)
    counts = [Author.objects.filter(name__startswith="e-").count() for _ in range(9)]
    if set(counts) != {12}:
        problems.append(f"reads after the restart saw {counts} (12 rows acknowledged)")
    try:
        settle(handle, timeout=30)
    except AssertionError as exc:
        problems.append(str(exc)[:600])
    close_connections()
    problems += faults.history.check(ALIASES, raise_on_failure=False)
    assert not problems, "\n".join(problems)
    check_everything(handle, faults.history)


# -- f. issue case 4: the journal is missing at a restart while a copy has pending writes -------
def test_missing_journal_makes_the_behind_copy_diverged_never_running(faults):
    journal_dir = faults.tmp / "journal-f"
    handle = faults.coordinator(JOURNAL_DIR=str(journal_dir))
    rec = faults.history.recorder("main")
    for i in range(3):
        assert create_author(rec, f"f-before-{i}")[0] == "ok"
    settle(handle)

    faults.copy_down(FOLLOWER)
    for i in range(5):
        assert create_author(rec, f"f-missed-{i}", i)[0] == "ok"
    handle.wait_state(FOLLOWER, "DOWN", timeout=15)
    handle.stop()
    journal_dir.rename(journal_dir.with_name("journal-f.moved"))
    handle.start()
    faults.copy_up(FOLLOWER)

    deadline, seen = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        state = next(d for d in handle.status()["databases"] if d["name"] == FOLLOWER)["state"]
        seen.append(state)
        if state in ("RUNNING", "DIVERGED"):
            break
        time.sleep(0.1)
    others = [a for a in ALIASES if a != FOLLOWER]
    for alias in others:
        handle.wait_state(alias, "RUNNING", timeout=15)
    counts = [Author.objects.filter(name__startswith="f-").count() for _ in range(9)]
    # it must stay out of RUNNING: watch it a little longer
    for _ in range(20):
        seen.append(next(d for d in handle.status()["databases"] if d["name"] == FOLLOWER)["state"])
        time.sleep(0.1)
    assert "RUNNING" not in seen and seen[-1] == "DIVERGED", f"{FOLLOWER} went through {sorted(set(seen))}"
    assert set(counts) == {8}, f"reads saw {counts}: a copy with a gap served reads"
    log = handle.log()
    assert "DIVERGED" in log and FOLLOWER in log, log

    # the other copies keep working
    assert create_author(rec, "f-after", 9)[0] == "ok"
    settle(handle, others)
    faults.history.check(others)
    code, out = run_verify()
    assert code == EXIT_DIFFERENT and FOLLOWER in out, out


def test_new_journal_with_the_most_advanced_copies_away_holds_every_copy_until_all_are_seen(faults):
    """The journal is lost while the copies that hold the latest writes are unreachable: the copy
    that is reachable may miss acknowledged writes, and nothing at boot can tell. It serves no
    read and takes no write until every copy has been seen; then the history is settled."""
    from django_lb_shm.errors import NoDatabaseAvailable

    journal_dir = faults.tmp / "journal-h"
    handle = faults.coordinator(JOURNAL_DIR=str(journal_dir), CLIENT_TIMEOUT=3)
    rec = faults.history.recorder("main")
    for i in range(3):
        assert create_author(rec, f"h-before-{i}")[0] == "ok"
    settle(handle)
    faults.copy_down(FOLLOWER)                       # FOLLOWER stops at #3...
    for i in range(5):
        assert create_author(rec, f"h-missed-{i}", i)[0] == "ok"   # ...the others go on to #8
    handle.wait_state(FOLLOWER, "DOWN", timeout=15)
    handle.stop()
    journal_dir.rename(journal_dir.with_name("journal-h.moved"))
    advanced = [a for a in ALIASES if a != FOLLOWER]
    for alias in advanced:
        faults.copy_down(alias)
    faults.copy_up(FOLLOWER)
    handle.start()

    time.sleep(2.5)   # several probes of the reachable copy
    status = handle.status()
    states = {d["name"]: d["state"] for d in status["databases"]}
    assert states[FOLLOWER] != "RUNNING", states
    with pytest.raises(NoDatabaseAvailable):
        Author.objects.filter(name__startswith="h-").count()
    assert "waiting for" in handle.log() and all(a in handle.log() for a in advanced), handle.log()

    for alias in advanced:
        faults.copy_up(alias)
    for alias in advanced:
        handle.wait_state(alias, "RUNNING", timeout=30)
    handle.wait_state(FOLLOWER, "DIVERGED", timeout=30)
    assert Author.objects.filter(name__startswith="h-").count() == 8
    assert create_author(rec, "h-after", 9)[0] == "ok"
    settle(handle, advanced)
    faults.history.check(advanced)


# -- g. randomized schedules ----------------------------------------------------------------------
LOAD_SECONDS = 6.0
FAULT_KINDS_PG = ("kill9_coordinator", "kill9_leader_postmaster", "cut_leader_commit", "kill9_worker")
FAULT_KINDS_SQLITE = ("kill9_coordinator", "kill9_worker")
PLAIN_SHARE = 0.25   # of the workers' operations: plain transaction.atomic() blocks (fault_workers.plain_op)


def start_worker(faults, handle, name: str, seed: int, ops: int, seconds: float,
                 plain: float = 0.0) -> subprocess.Popen:
    """An app process running ``fault_workers``; ``plain``: the share of plain atomic blocks."""
    args = {"settings_json": os.environ["LB_TEST_CONFIG"], "lb": handle.lb,
            "history": faults.history.path_for(name), "process": name, "seed": seed, "ops": ops,
            "seconds": seconds, "pause": 0.02, "plain": plain}
    args_path = faults.tmp / f"{name}.args.json"
    args_path.write_text(json.dumps(args))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = open(faults.tmp / f"{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fault_workers", str(args_path)], cwd=str(REPO),
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    faults.procs.append(proc)
    return proc


def test_randomized_fault_schedules(faults):
    schedules = int(os.environ.get("LB_FAULT_SCHEDULES", "4"))
    seed = int(os.environ.get("LB_FAULT_SEED", str(random.randrange(10**6))))
    print(f"\nfault schedules: {schedules}, seed {seed} (LB_FAULT_SEED={seed} to replay)")
    rng = random.Random(seed)
    proxy = faults.proxy_for(LEADER) if BACKEND == "postgres" else None
    databases = {LEADER: {"PORT": proxy.port}} if proxy else None
    handle = faults.coordinator(databases=databases)
    kinds = FAULT_KINDS_PG if BACKEND == "postgres" else FAULT_KINDS_SQLITE
    ran, log = 0, []
    for n in range(schedules):
        workers = [start_worker(faults, handle, f"s{n}w{w}", rng.randrange(10**9), ops=2000, seconds=LOAD_SECONDS,
                                plain=PLAIN_SHARE)
                   for w in range(rng.choice((2, 3)))]
        plan = sorted((rng.uniform(0.5, LOAD_SECONDS - 1.0), rng.choice(kinds)) for _ in range(rng.randint(1, 3)))
        log.append(f"schedule {n}: {len(workers)} workers, faults {[(round(t, 2), k) for t, k in plan]}")
        started = time.monotonic()
        for at, kind in plan:
            time.sleep(max(0.0, started + at - time.monotonic()))
            if kind == "kill9_coordinator":
                try:
                    wait_restarted(handle, kill9_coordinator(handle))
                except (AssertionError, *NOT_ANSWERING) as exc:   # still restarting from the previous fault
                    log.append(f"  {kind}: {exc!r:.200}")
            elif kind == "kill9_leader_postmaster":
                server = pg_server(LEADER)
                crash_pg(server)
                time.sleep(rng.uniform(0.2, 1.5))
                ensure_pg_up(server)
            elif kind == "cut_leader_commit":
                proxy.cut_after_commit(1)
            elif kind == "kill9_worker":
                live = [p for p in workers if p.poll() is None]
                if live:
                    rng.choice(live).kill()
            log.append(f"  {kind} at {time.monotonic() - started:.2f}s")
        for proc in workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proxy:
            log.append(f"  cuts so far: {proxy.cuts}")
            proxy.heal()
        if BACKEND == "postgres":
            for alias in ALIASES:
                ensure_pg_up(pg_server(alias))
        log.append(f"  history so far: {faults.history.summary()}")
        try:
            check_everything(handle, faults.history)
        finally:
            print("\n".join(log))
            log.clear()
        ran += 1
    print(f"fault schedules run: {ran} (seed {seed})")
    assert ran == schedules
    assert faults.history.summary().get("ok", 0) > 0


def wait_workers(workers: list, timeout: float = 60) -> None:
    for proc in workers:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"worker {proc.pid} still running {timeout}s after its deadline") from None


def test_kill9_coordinator_while_processes_run_plain_atomic_blocks(faults):
    """Three app processes run only plain transaction.atomic() blocks (flat, nested with a
    savepoint rolled back, raising); the coordinator is killed -9 twice by pid and restarted by
    its supervisor.  Nothing acknowledged is lost, nothing told as rolled back is on a copy, the
    copies are identical, and no worker died of an error it was not told about."""
    handle = faults.coordinator()
    kills = int(os.environ.get("LB_PLAIN_KILLS", "2"))   # more to hunt a rare interleaving
    seconds = 3.0 + 2.5 * kills
    workers = [start_worker(faults, handle, f"pw{w}", 1000 + w, ops=300 * (kills + 1), seconds=seconds, plain=1.0)
               for w in range(3)]
    started = time.monotonic()
    for n in range(kills):
        time.sleep(max(0.0, started + 1.5 + 2.5 * n - time.monotonic()))
        wait_restarted(handle, kill9_coordinator(handle))
    wait_workers(workers, timeout=seconds + 60)
    logs = {p.pid: (faults.tmp / f"pw{w}.log").read_text()[-2000:] for w, p in enumerate(workers)}
    assert all(p.returncode == 0 for p in workers), f"a worker failed: {logs}"
    leaks = [line for log in logs.values() for line in log.splitlines() if line.startswith("LEFT OPEN")]
    assert not leaks, "a block left the load-balanced connection in a transaction:\n" + "\n".join(leaks)
    ops = faults.history.ops()
    kinds = {op.kind for op in ops if op.outcome == "ok"}
    assert {"plain", "plain_nested"} <= kinds, f"no plain block was acknowledged: {faults.history.summary()}"
    assert any(op.kind == "plain_raise" and op.error == "BlockAborted" for op in ops), "no block was aborted"
    # Most blocks in flight then are still told "committed" (an opening write is sent again, a
    # commit settled from the journal); the check below decides whether that was the truth.
    hit = [op for op in ops if not op.finished or op.finished - op.started > 1.0
           or op.outcome != "ok" and op.error != "BlockAborted"]
    assert hit, f"no operation was in flight at a kill -9 ({faults.history.summary()}): the fault tested nothing"
    print(f"\nplain blocks: {faults.history.summary()}; in flight at a kill -9: "
          f"{[(op.kind, op.outcome, op.error) for op in hit]}")
    check_everything(handle, faults.history)


# -- the harness itself ---------------------------------------------------------------------------
@postgres_only
def test_fault_proxy_cuts_after_commit_black_holes_and_refuses():
    import threading

    import psycopg

    server = pg_server("DB2")
    direct = psycopg.connect(server.conninfo("postgres"), autocommit=True)
    direct.execute("DROP TABLE IF EXISTS fault_proxy_probe")
    direct.execute("CREATE TABLE fault_proxy_probe (x int)")
    proxy = FaultProxy(server.port)
    try:
        via = f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres connect_timeout=5"
        conn = psycopg.connect(via)   # sslmode=prefer: the proxy answers the SSLRequest 'N'
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()

        proxy.cut_after_commit(1)
        conn.execute("INSERT INTO fault_proxy_probe VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()             # the COMMIT reached the server; its answer did not come back
        assert proxy.cuts == 1 and proxy.armed == 0
        assert direct.execute("SELECT count(*) FROM fault_proxy_probe").fetchone() == (1,)
        conn.close()

        conn = psycopg.connect(via, autocommit=True)
        proxy.black_hole()
        answer: list = []
        worker = threading.Thread(target=lambda: answer.append(conn.execute("SELECT 2").fetchone()), daemon=True)
        worker.start()
        worker.join(1.0)
        assert answer == [], "an answer crossed the black hole"
        proxy.heal()
        worker.join(10)
        assert answer == [(2,)]

        proxy.refuse()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 3")  # its connection was closed
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(via)
        proxy.heal()
        with psycopg.connect(via) as again:
            assert again.execute("SELECT 4").fetchone() == (4,)
    finally:
        proxy.close()
        direct.execute("DROP TABLE IF EXISTS fault_proxy_probe")
        direct.close()


def test_history_check_reports_lost_forbidden_and_stray_writes(coordinator, tmp_path):
    history = History(tmp_path / "h")
    rec = history.recorder("main")
    assert create_author(rec, "h-kept", 1)[0] == "ok"
    assert create_author(rec, "h-lost", 2)[0] == "ok"
    outcome, exc = create_author(rec, "h-kept", 3)          # a duplicate: IntegrityError, applied nowhere
    assert outcome == "fail" and isinstance(exc, IntegrityError)
    op_id = rec.invoke("create", [Write("author", "create", "h-unknown", 4)])   # as if killed here
    assert op_id and create_author(rec, "h-forbidden", 5)[0] == "ok"
    coordinator.wait_drained()
    history.check(ALIASES)                                   # all is well so far
    close_connections()
    with connections["DB2"].cursor() as cursor:              # behind the coordinator's back
        cursor.execute("DELETE FROM testapp_author WHERE name = 'h-lost'")
        cursor.execute("UPDATE testapp_author SET name = 'h-stray' WHERE name = 'h-forbidden'")
    with connections["DB1"].cursor() as cursor:
        cursor.execute("UPDATE testapp_author SET rating = 99 WHERE name = 'h-kept'")
    close_connections()
    problems = history.check(ALIASES, raise_on_failure=False)
    text = "\n".join(problems)
    assert "'h-lost' on DB2: absent" in text, text
    assert "'h-forbidden' on DB2: absent" in text, text
    assert "'h-kept' on DB1: present(pk=" in text and "value=99" in text, text
    assert "no recorded operation wrote: ['h-stray']" in text, text
    assert "testapp_author: DB1 differs from default" in text, text
    with pytest.raises(AssertionError, match="history check failed"):
        history.check(ALIASES)
