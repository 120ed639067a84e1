"""Shared memory: per-database state, counters and latency, and the coordinator's vitals.

One named ``multiprocessing.shared_memory`` segment per coordinator address,
created and unlinked by the supervisor, written by the coordinator process and
read without any round trip by the supervisor, the read algorithms and ``status``.
A field set by one thread (``set``, ``set_header``) takes no lock; a counter bumped
by several threads of the coordinator (``add``, ``add_header``: a read and a write)
takes ``SharedState._add_lock``, a lock of that process only.
The layout is a flat array of float64 (exact for integers below 2**53):

    header (HEADER_SIZE) | one Slot per database (SLOT_SIZE each) | READER_SLOTS reader slots

A reader slot belongs to one thread of one app process that runs reads itself
(zero-hop reads, ``client/reads.py``): it claims the slot with an ``flock`` on a lock
file of its own (released by the kernel when the thread's state is dropped or the
process dies) and is then the only writer of the slot's fields: its per-database
read count, in-flight reads, latency sums, and the connection failures and
timeouts it saw (which the coordinator's ``ReaderWatch`` acts on).  Readers sum
the slots; no reader takes a lock to count.  ``LAYOUT_VERSION`` is checked on attach
(``LayoutMismatch``, naming both versions): an app process that finds another layout
keeps the coordinator path.

The segment's name carries the OS user's uid (``segment_name``), and a segment is only
created over, attached or reclaimed when that user owns it and no other user may write
it (``check_owner``): /dev/shm is writable by everyone, so a file under that name may
have been planted by another user.
"""
from __future__ import annotations

import enum
import mmap
import os
import pwd
import stat
import threading
import time
import zlib
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Optional

from django_lb_shm.errors import SharedMemoryNotOwned

MAGIC = 0x4C42_5348  # "LBSH"
LAYOUT_VERSION = 2


class DbState(enum.IntEnum):
    STARTING = 0
    RUNNING = 1        # serves reads, applies writes
    DOWN = 2           # connection-level failure: no reads; writes wait in the journal
    RECOVERING = 3     # back up, applying the writes it missed; no reads yet
    DIVERGED = 4       # a write failed here but not on the first database: needs a resync (ops/resync.py)
    STOPPED = 5
    UNRESPONSIVE = 6   # does not answer probes (hung, cut off): no reads; writes still go to it
    SCHEMA_BEHIND = 9  # lacks migrations another copy has applied: no reads; writes wait in the journal
    RESYNCING = 7      # being refilled from another copy (ops/resync.py): no reads; its writes wait in the journal
    NEW = 8            # empty, or its resync did not finish: no reads, no writes until a resync fills it


_DB_STATES = {int(s): s for s in DbState}  # a dict lookup: DbState(n) costs microseconds per read


class CoordinatorState(enum.IntEnum):
    STARTING = 0
    READY = 1
    STOPPING = 2
    STOPPED = 3


class Header(enum.IntEnum):
    MAGIC = 0
    VERSION = 1
    N_DATABASES = 2
    SUPERVISOR_PID = 3
    COORDINATOR_PID = 4
    COORDINATOR_STATE = 5
    RESTARTS = 6
    STARTED_AT = 7          # wall clock of the current coordinator's start
    HEARTBEAT = 8           # monotonic clock, written by the coordinator's main loop
    LAST_SEQ = 9            # last write sequence number handed out
    JOURNAL_ENTRIES = 10
    JOURNAL_BYTES = 11
    SUPERVISOR_STARTED_AT = 12
    REQUESTS = 13
    ACTIVE_REQUESTS = 14
    READER_SLOTS = 15       # number of reader slots after the database slots
    READERS_HIGH = 16       # one past the highest reader slot claimed so far (scan bound)
    DATABASES_KEY = 17      # databases_key() of the aliases the slots are laid out for


HEADER_SIZE = 24


class Slot(enum.IntEnum):
    STATE = 0
    READS = 1
    WRITES = 2
    APPLIED_SEQ = 3
    LATENCY_MS = 4          # exponentially weighted read/probe latency
    LAST_PROBE_AT = 5       # monotonic: the copy last answered a probe (zero-hop reads compare it to a cut)
    HEARTBEAT = 6           # monotonic, written by the database thread
    INFLIGHT = 7            # reads queued or running on this database
    ERRORS = 8
    STATE_SINCE = 9         # monotonic
    LAST_LATENCY_MS = 10
    THREAD_RESTARTS = 11


SLOT_SIZE = 12


class Reader(enum.IntEnum):
    """Per database, in each reader slot (one writer: the thread that holds the slot)."""
    READS = 0
    INFLIGHT = 1
    LATENCY_SUM_MS = 2
    LATENCY_COUNT = 3
    FAILURES = 4            # connection-level failures on the app's own connection
    TIMEOUTS = 5            # reads cut after READ_TIMEOUT


READER_FIELDS = 6
READER_HEAD = 2             # PID, CLAIMS (how many times the slot was claimed)
READER_SLOTS = 128


class LayoutMismatch(RuntimeError):
    """The segment was laid out by another version of the package."""


def layout_mismatch_message(name: str, version: int) -> str:
    return (f"shared memory segment {name!r} has layout version {version}, this django_lb_shm reads "
            f"version {LAYOUT_VERSION}: the coordinator and this process run different django_lb_shm "
            "versions; install one version everywhere, then restart the coordinator (djangoloadbalancer) "
            "and the app processes (until then their reads go through the coordinator)")


SHM_DIR = "/dev/shm"   # where Linux keeps POSIX shared memory segments


def databases_key(aliases: Any) -> int:
    """The aliases of LOAD_BALANCER['DATABASES'], in order, as one number (slot i is alias i)."""
    return zlib.crc32("\0".join(aliases).encode())


def segment_name(address: Any) -> str:
    """One segment per OS user and coordinator address: django_lb_shm_<uid>_<port>
    (or django_lb_shm_<uid>_u<hash of the socket path>)."""
    return f"django_lb_shm_{os.getuid()}_{address_key(address)}"


def address_key(address: Any) -> str:
    """A short name for a settings.config.Address (shared memory segment, default journal directory)."""
    if address.path:
        return f"u{zlib.crc32(address.path.encode()):08x}"
    return str(address.port)


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def check_owner(st: os.stat_result, name: str) -> None:
    """SharedMemoryNotOwned unless the segment is a regular file of this user that no other user may write."""
    problem = _ownership_problem(st)
    if problem:
        raise SharedMemoryNotOwned(
            f"shared memory segment {segment_path(name)} {problem}: it was not made by this user's "
            "django_lb_shm and is neither used nor removed; remove it (as its owner or root) once you know "
            "who made it, or give LOAD_BALANCER['ADDRESS'] another PORT"
        )


def _ownership_problem(st: os.stat_result) -> str:
    uid = os.getuid()
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (owner {user_name(st.st_uid)})"
    if st.st_uid != uid:
        return f"belongs to {user_name(st.st_uid)}, not to this user, {user_name(uid)}"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {st.st_mode & 0o777:04o}, owner {user_name(st.st_uid)})"
    return ""


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _existing_segment_stat(name: str) -> Optional[os.stat_result]:
    """The segment file's own status, a symbolic link not followed (None: it is gone)."""
    try:
        if os.path.isdir(SHM_DIR):
            return os.lstat(segment_path(name))
        import _posixshmem  # no /dev/shm (not Linux): ask the segment itself

        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None


class SharedState:
    """Typed access to the shared segment; the same object layout in every process."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self.shm = shm
        self.owner = owner
        self.values = shm.buf.cast("d")
        self._layout()
        # Counters are bumped by many threads of the coordinator (server threads run
        # reads): "+=" on the buffer is a read and a write, so it takes a lock.
        self._add_lock = threading.Lock()

    # -- life cycle --------------------------------------------------------
    def _layout(self) -> None:
        values = self.values
        n = int(values[Header.N_DATABASES]) if len(values) > Header.N_DATABASES else 0
        self.reader_base = HEADER_SIZE + SLOT_SIZE * n
        self.reader_size = READER_HEAD + READER_FIELDS * n
        slots = int(values[Header.READER_SLOTS]) if len(values) > Header.READER_SLOTS else 0
        # never past the end of the mapping, whatever the header says
        fits = (len(values) - self.reader_base) // self.reader_size if self.reader_size else 0
        self.reader_slots = max(0, min(slots, fits))

    @staticmethod
    def size_for(n_databases: int, reader_slots: int = READER_SLOTS) -> int:
        return 8 * (HEADER_SIZE + SLOT_SIZE * n_databases + reader_slots * (READER_HEAD + READER_FIELDS * n_databases))

    @classmethod
    def create(cls, name: str, n_databases: int, reader_slots: int = READER_SLOTS,
               aliases: Any = ()) -> "SharedState":
        """Create the segment, reclaiming one a dead supervisor left behind (or this very process
        before it started over: see ``hand_over``)."""
        size = cls.size_for(n_databases, reader_slots)
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except FileExistsError:
            existing = _existing_segment_stat(name)
            if existing is not None:
                check_owner(existing, name)   # another user's file: never reclaimed
            pid = _owner_pid(name)
            if pid and pid != os.getpid() and pid_alive(pid):
                raise RuntimeError(
                    f"another djangoloadbalancer supervisor (pid {pid}) already serves this address "
                    f"(shared memory segment {name!r})"
                ) from None
            _unlink(name)
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        state = cls(shm, owner=True)
        for i in range(len(state.values)):
            state.values[i] = 0.0
        state.set_header(Header.MAGIC, MAGIC)
        state.set_header(Header.VERSION, LAYOUT_VERSION)
        state.set_header(Header.N_DATABASES, n_databases)
        state.set_header(Header.READER_SLOTS, reader_slots)
        state.set_header(Header.DATABASES_KEY, databases_key(aliases))
        state._layout()
        state.set_header(Header.SUPERVISOR_PID, os.getpid())
        state.set_header(Header.SUPERVISOR_STARTED_AT, time.time())
        return state

    @classmethod
    def attach(cls, name: str, shares_tracker: bool = False) -> "SharedState":
        """Attach to an existing segment.

        Python < 3.13 registers attached segments with the resource tracker too,
        which would unlink the supervisor's segment when this process exits; a
        process with its own tracker undoes that.  A child spawned by the
        supervisor shares the supervisor's tracker (``shares_tracker``), whose
        registration must stay: it unlinks the segment if the supervisor dies.
        """
        shm = shared_memory.SharedMemory(name=name, create=False)
        st = os.fstat(shm._fd)  # type: ignore[attr-defined]
        foreign = bool(_ownership_problem(st))
        if not shares_tracker or foreign:   # the tracker must never unlink another user's file
            try:
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:
                pass
        if foreign:
            shm.close()
            check_owner(st, name)
        return cls._checked(shm, name)

    @classmethod
    def _checked(cls, shm: Any, name: str) -> "SharedState":
        state = cls(shm, owner=False)
        if int(state.header(Header.MAGIC)) != MAGIC:
            state.close()
            raise RuntimeError(f"shared memory segment {name!r} is not a django_lb_shm segment")
        version = int(state.header(Header.VERSION))
        if version != LAYOUT_VERSION:
            state.close()
            raise LayoutMismatch(layout_mismatch_message(name, version))
        return state

    @classmethod
    def attach_untracked(cls, name: str) -> "SharedState":
        """Attach without the resource tracker (app processes: no tracker process is started).

        FileNotFoundError when there is no segment, PermissionError or SharedMemoryNotOwned
        when it belongs to another OS user (or another could write it), LayoutMismatch when
        another version laid it out.
        """
        try:
            import _posixshmem
        except ImportError:  # not POSIX: the tracked way
            return cls.attach(name)
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            st = os.fstat(fd)
            check_owner(st, name)   # of the file opened, not of a name that may change meanwhile
            mapping = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        return cls._checked(_Mapped(name, mapping), name)

    def close(self) -> None:
        try:
            self.values.release()
        except Exception:
            pass
        self.shm.close()

    def hand_over(self) -> None:
        """Before this supervisor process starts over (exec): the segment stays, naming this live pid,
        so that app processes wait for the new one instead of failing; the new one reclaims it."""
        try:
            resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]
        except Exception:
            pass
        self.close()

    def unlink(self) -> None:
        self.close()
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    # -- fields --------------------------------------------------------------
    @property
    def n_databases(self) -> int:
        return int(self.values[Header.N_DATABASES])

    def header(self, field: Header) -> float:
        return self.values[field]

    def set_header(self, field: Header, value: float) -> None:
        self.values[field] = value

    def add_header(self, field: Header, delta: float) -> None:
        with self._add_lock:
            self.values[field] += delta

    def _index(self, db: int, field: Slot) -> int:
        return HEADER_SIZE + db * SLOT_SIZE + field

    def get(self, db: int, field: Slot) -> float:
        return self.values[self._index(db, field)]

    def set(self, db: int, field: Slot, value: float) -> None:
        self.values[self._index(db, field)] = value

    def add(self, db: int, field: Slot, delta: float) -> None:
        index = HEADER_SIZE + db * SLOT_SIZE + field
        with self._add_lock:
            self.values[index] += delta

    def state(self, db: int) -> DbState:
        return _DB_STATES[int(self.values[HEADER_SIZE + db * SLOT_SIZE + Slot.STATE])]

    def set_state(self, db: int, state: DbState) -> None:
        self.set(db, Slot.STATE, int(state))
        self.set(db, Slot.STATE_SINCE, time.monotonic())

    def record_latency(self, db: int, ms: float, weight: float = 0.2) -> None:
        previous = self.get(db, Slot.LATENCY_MS)
        self.set(db, Slot.LAST_LATENCY_MS, ms)
        self.set(db, Slot.LATENCY_MS, ms if previous <= 0 else previous + weight * (ms - previous))

    # -- reader slots (zero-hop reads of app processes) ---------------------------------
    def reader_index(self, slot: int, db: int, field: Reader) -> int:
        return self.reader_base + slot * self.reader_size + READER_HEAD + db * READER_FIELDS + field

    def reader_head(self, slot: int) -> int:
        return self.reader_base + slot * self.reader_size

    def readers_high(self) -> int:
        return max(0, min(int(self.values[Header.READERS_HIGH]), self.reader_slots))

    def reader_sum(self, db: int, field: Reader) -> float:
        """One field of one database, summed over the reader slots claimed so far."""
        values = self.values
        start = self.reader_base + READER_HEAD + db * READER_FIELDS + field
        step = self.reader_size
        return sum(values[start + slot * step] for slot in range(self.readers_high()))

    def inflight(self, db: int) -> float:
        """Reads running on ``db`` now: the coordinator's and every app process's."""
        return self.values[HEADER_SIZE + db * SLOT_SIZE + Slot.INFLIGHT] + self.reader_sum(db, Reader.INFLIGHT)

    def snapshot(self, names: Optional[list[str]] = None) -> dict:
        """Everything in the segment as plain data (for status and tests)."""
        now = time.monotonic()
        databases = []
        for i in range(self.n_databases):
            heartbeat = self.get(i, Slot.HEARTBEAT)
            databases.append({
                "name": names[i] if names and i < len(names) else str(i),
                "state": self.state(i).name,
                "reads": int(self.get(i, Slot.READS) + self.reader_sum(i, Reader.READS)),
                "coordinator_reads": int(self.get(i, Slot.READS)),
                "zero_hop_reads": int(self.reader_sum(i, Reader.READS)),
                "writes": int(self.get(i, Slot.WRITES)),
                "applied_seq": int(self.get(i, Slot.APPLIED_SEQ)),
                "pending_writes": max(0, int(self.header(Header.LAST_SEQ) - self.get(i, Slot.APPLIED_SEQ))),
                "latency_ms": round(self.get(i, Slot.LATENCY_MS), 3),
                "inflight_reads": int(self.inflight(i)),
                "errors": int(self.get(i, Slot.ERRORS)),
                "heartbeat_age_s": round(now - heartbeat, 3) if heartbeat else None,
                "probe_age_s": round(now - self.get(i, Slot.LAST_PROBE_AT), 3) if self.get(i, Slot.LAST_PROBE_AT) else None,
                "thread_restarts": int(self.get(i, Slot.THREAD_RESTARTS)),
            })
        started = self.header(Header.STARTED_AT)
        heartbeat = self.header(Header.HEARTBEAT)
        return {
            "databases": databases,
            "coordinator": {
                "pid": int(self.header(Header.COORDINATOR_PID)),
                "state": CoordinatorState(int(self.header(Header.COORDINATOR_STATE))).name,
                "restarts": int(self.header(Header.RESTARTS)),
                "uptime_s": round(time.time() - started, 3) if started else 0.0,
                "heartbeat_age_s": round(now - heartbeat, 3) if heartbeat else None,
                "last_seq": int(self.header(Header.LAST_SEQ)),
                "journal_entries": int(self.header(Header.JOURNAL_ENTRIES)),
                "journal_bytes": int(self.header(Header.JOURNAL_BYTES)),
                "requests": int(self.header(Header.REQUESTS)),
                "active_requests": int(self.header(Header.ACTIVE_REQUESTS)),
                "reader_slots_used": self.readers_high(),
                "layout_version": int(self.header(Header.VERSION)),
            },
            "supervisor": {"pid": int(self.header(Header.SUPERVISOR_PID))},
        }


class _Mapped:
    """What SharedState needs of a SharedMemory, for a segment mapped by hand (attach_untracked)."""

    def __init__(self, name: str, mapping: mmap.mmap):
        self.name = self._name = name
        self._mmap = mapping
        self.buf = memoryview(mapping)

    def close(self) -> None:
        try:
            self.buf.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass   # a view is still exported: the mapping goes with the process

    def unlink(self) -> None:
        raise RuntimeError("an app process never unlinks the segment")


def live_supervisor(address: Any) -> int:
    """The pid of a running supervisor of this user that serves ``address`` on this host (0: none)."""
    try:
        state = SharedState.attach_untracked(segment_name(address))
    except (OSError, RuntimeError, ValueError, SharedMemoryNotOwned):
        return 0
    try:
        pid = int(state.header(Header.SUPERVISOR_PID))
    finally:
        state.close()
    return pid if pid and pid_alive(pid) else 0


def pid_alive(pid: int) -> bool:
    """A process ``pid`` exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int:
    """The supervisor pid recorded in an existing segment (of any layout version); 0 if it is not ours."""
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except (ValueError, FileNotFoundError, PermissionError):
        return 0
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    try:
        values = shm.buf.cast("d")
        try:
            if len(values) <= Header.SUPERVISOR_PID or int(values[Header.MAGIC]) != MAGIC:
                return 0
            return int(values[Header.SUPERVISOR_PID])   # the same place in every layout version
        finally:
            values.release()
    finally:
        shm.close()


def _unlink(name: str) -> None:
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
        shm.close()
        shm.unlink()
    except FileNotFoundError:
        pass
