"""Schema drift: which copies lack migrations that another copy has applied.

What is compared: the rows of ``django_migrations`` of the load-balanced apps (the apps
with a LoadBalancerModel), as ``"app.name"`` strings.  A copy is *behind* when another
copy has applied every migration it has, and more: its tables may lack the columns and
tables the app's code uses.  The coordinator keeps such a copy SCHEMA_BEHIND: it serves no
reads, takes no writes (they wait in the journal, as for a DOWN copy), and the leader is
one of the others.  Once the copy has the migrations too (``djangoloadbalancer migrate``),
it catches up from the journal and is RUNNING again.

Copies that differ both ways (each has migrations the other lacks: two branches of the
code migrated on different copies) are not ordered: neither is behind because of the
other -- marking both would leave no copy to serve --, and ``status`` and check W035 name
what each lacks.  A copy that lacks what a third copy, which has both, has is behind that one.

``SchemaWatch`` keeps the comparison current in the coordinator: seeded at boot from
each copy's claimed connection, before any copy serves; told by each database thread when
its copy reconnects; and every WAIT_TIME it reads the copies that answer, on connections
of its own (one per copy), so that a copy migrated while the coordinator runs -- by
``djangoloadbalancer migrate`` or by a plain ``manage.py migrate`` -- is seen without a
restart.  A database thread whose copy fails a write another copy applied asks for a
fresh look before calling it DIVERGED.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Mapping, Optional

from django_lb_shm.periodic import PeriodicThread
from django_lb_shm.routers import is_load_balanced

logger = logging.getLogger("django_lb_shm.schema")

Applied = frozenset   # of "app.name"

_HAS_TABLE = {
    "sqlite": "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'django_migrations'",
    "postgresql": "SELECT COUNT(*) FROM (SELECT to_regclass('django_migrations') AS t) AS r WHERE r.t IS NOT NULL",
}


def load_balanced_apps() -> frozenset[str]:
    """Labels of the installed apps that have a load-balanced model (LoadBalancerModel, LOAD_BALANCER['MODELS'])."""
    from django.apps import apps

    return frozenset(m._meta.app_label for m in apps.get_models(include_auto_created=True) if is_load_balanced(m))


def applied_migrations(query: Callable[[str, tuple], list], vendor: str, app_labels: Iterable[str]) -> Applied:
    """The migrations of ``app_labels`` applied on one copy; ``query(sql, params)`` returns its rows.
    No ``django_migrations`` table (a copy never migrated): none."""
    labels = sorted(app_labels)
    if not labels or not query(_HAS_TABLE[vendor], ())[0][0]:
        return frozenset()
    marks = ", ".join(["%s"] * len(labels))
    rows = query(f"SELECT app, name FROM django_migrations WHERE app IN ({marks})", tuple(labels))
    return frozenset(f"{app}.{name}" for app, name in rows)


def behind_copies(applied: Mapping[str, Applied]) -> dict[str, tuple[str, ...]]:
    """{alias: the migrations it lacks} of every copy another copy is ahead of (has all of its
    migrations, and more)."""
    missing = missing_migrations(applied)
    return {alias: missing[alias] for alias, own in applied.items() if any(own < other for other in applied.values())}


def missing_migrations(applied: Mapping[str, Applied]) -> dict[str, tuple[str, ...]]:
    """{alias: the migrations some other copy has applied and it has not}, for every copy."""
    every = frozenset().union(*applied.values())
    return {alias: tuple(sorted(every - own)) for alias, own in applied.items()}


def ahead_of(applied: Mapping[str, Applied], alias: str) -> list[str]:
    """The copies that have every migration ``alias`` has, and more."""
    own = applied.get(alias, frozenset())
    return [other for other, theirs in applied.items() if own < theirs]


class SchemaWatch(PeriodicThread):
    """The coordinator's view of which copies are behind (see the module docstring).

    ``connect(alias)`` makes a closed DbConnection; ``readable()`` names the copies worth
    reading now (not DOWN); ``on_change(aliases)`` is called with the copies whose verdict
    changed, from whichever thread noticed.
    """

    def __init__(self, aliases: Iterable[str], app_labels: frozenset[str], interval: float,
                 connect: Callable[[str], Any], readable: Callable[[], Iterable[str]],
                 on_change: Callable[[set], None]):
        super().__init__("schema-watch", max(interval, 0.1), logger)
        self.aliases = tuple(aliases)
        self.app_labels = app_labels
        self._connect = connect
        self._readable = readable
        self._on_change = on_change
        self._conns: dict[str, Any] = {}
        self._conn_locks = {alias: threading.Lock() for alias in self.aliases}
        self._lock = threading.Lock()
        self.applied: dict[str, Applied] = {}
        self._behind: dict[str, tuple[str, ...]] = {}
        self._missing: dict[str, tuple[str, ...]] = {}

    # -- what the others ask (no I/O) ------------------------------------------------------
    def behind(self, alias: str) -> tuple[str, ...]:
        """The migrations ``alias`` lacks when it is behind another copy; () when it is not."""
        return self._behind.get(alias, ())

    def missing(self, alias: str) -> list[str]:
        """For status: every migration another copy has applied and ``alias`` has not."""
        return list(self._missing.get(alias, ()))

    def reason(self, alias: str) -> str:
        with self._lock:
            ahead = ahead_of(self.applied, alias)
        return (f"missing migrations {', '.join(self.behind(alias))}, applied on {', '.join(ahead) or 'another copy'}; "
                "no reads, and its writes wait in the journal until it has them (`djangoloadbalancer migrate`)")

    # -- what is known -----------------------------------------------------------------------
    def read_on(self, conn: Any) -> Applied:
        """The applied migrations of the copy ``conn`` (an open DbConnection) reaches."""
        return applied_migrations(lambda sql, params: conn.run(sql, params).rows, conn.wrapper.vendor,
                                  self.app_labels)

    def report(self, found: Mapping[str, Applied]) -> None:
        """What copies were just read to have applied; the verdicts follow."""
        with self._lock:
            self.applied.update(found)
            behind = behind_copies(self.applied)
            changed = {a for a in set(behind) | set(self._behind) if behind.get(a) != self._behind.get(a)}
            self._behind, self._missing = behind, missing_migrations(self.applied)
        if changed:
            self._on_change(changed)   # the database threads log their new states

    def refresh(self, aliases: Optional[Iterable[str]] = None) -> None:
        """Read the copies that answer (``aliases``, or the readable ones) now, on the watch's connections."""
        found = {}
        for alias in (self._readable() if aliases is None else aliases):
            applied = self._read(alias)
            if applied is not None:
                found[alias] = applied
        if found:
            self.report(found)

    def _read(self, alias: str) -> Optional[Applied]:
        with self._conn_locks[alias]:
            conn = self._conns.get(alias)
            if conn is None:
                conn = self._conns[alias] = self._connect(alias)
            try:
                if not conn.is_open:
                    conn.open()
                return self.read_on(conn)
            except Exception as exc:   # the database thread's own probes decide whether it is down
                logger.debug("schema watch: cannot read the migrations of %r: %s", alias, exc)
                conn.close()
                return None

    # -- the thread ------------------------------------------------------------------------------
    def tick(self) -> None:
        self.refresh()

    def close(self) -> None:
        for alias, conn in list(self._conns.items()):
            with self._conn_locks[alias]:
                conn.close()
