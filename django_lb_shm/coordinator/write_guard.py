"""Which tables a write may touch: those of load-balanced models, and nothing else.

The coordinator (coordinator/router.py) checks every statement of a write request here before the
write is ordered.
"""
from __future__ import annotations

import re
from typing import Optional

from django_lb_shm.coordinator.db_thread import MARKER_TABLE
from django_lb_shm.errors import RequestRejected
from django_lb_shm.routers import is_load_balanced


class WriteGuard:
    """Writes may only change LoadBalancerModel tables (and their many-to-many tables).

    Anything else sent as a write (another app's table, DDL, connection
    settings) is refused: it would change copies the load balancer does not own.
    """

    _TARGET = re.compile(r'\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+"?([^\s"(]+)', re.IGNORECASE)
    _SQLITE_SEQUENCE_RESET = re.compile(
        r'\s*UPDATE\s+"?sqlite_sequence"?\s+SET\s+"?seq"?\s*=\s*0\s+WHERE\s+"?name"?\s+IN\s*\(([^)]*)\)\s*;?\s*$',
        re.IGNORECASE)
    # Django's PostgreSQL sequence reset: SELECT setval(pg_get_serial_sequence('"table"','id'), ...)
    _SEQUENCE_TARGET = re.compile(r"""\s*SELECT\s+setval\s*\(\s*pg_get_serial_sequence\s*\(\s*'"?([^'"]+)"?'""",
                                  re.IGNORECASE)
    _ALLOWED_HEADS = ("SAVEPOINT", "RELEASE", "ROLLBACK", "SELECT")  # savepoints; locking reads

    def __init__(self, tables: frozenset, others: Optional[dict] = None):
        self.tables = tables
        self.others = others or {}   # table -> label of an installed model that is not load-balanced

    @classmethod
    def for_installed_models(cls) -> "WriteGuard":
        from django.apps import apps

        models = apps.get_models(include_auto_created=True)
        others = {m._meta.db_table: m._meta.label for m in models if not is_load_balanced(m)}
        return cls(frozenset(m._meta.db_table for m in models if is_load_balanced(m)) - {MARKER_TABLE}, others)

    def check(self, sql: str) -> None:
        match = self._TARGET.match(sql) or self._one_sequence_reset(sql)
        if match:
            table = match.group(1)
            if table == "sqlite_sequence" and self._resets_own_sequences(sql):
                return
            if table in self.others:
                raise RequestRejected(
                    f"write to table {table!r} refused: it belongs to {self.others[table]}, which is not a "
                    "LoadBalancerModel nor listed in LOAD_BALANCER['MODELS']; write it on its own database (a "
                    "relation from a load-balanced model that cascades into it is refused by system check "
                    "django_lb_shm.E024)"
                )
            if table not in self.tables:
                raise RequestRejected(
                    f"write to table {table!r} refused: it belongs to no load-balanced model this "
                    "coordinator knows (only their tables are written through the load balancer). The "
                    "coordinator loads the models when it starts: if this model is new, restart it "
                    "(SIGHUP to the djangoloadbalancer process) after `djangoloadbalancer migrate`"
                )
            return
        if "setval" in sql.lower():
            raise RequestRejected(
                "a sequence change refused: the load balancer forwards only Django's own sequence reset "
                "(SELECT setval(pg_get_serial_sequence('\"<table>\"', ...), ...)) of a LoadBalancerModel table"
            )
        head = sql.lstrip(" \t\r\n(").split(None, 1)[0].upper() if sql.strip() else ""
        if head not in self._ALLOWED_HEADS:
            raise RequestRejected(
                f"{head or 'an empty statement'} statement refused: the load balancer applies only INSERT, "
                "UPDATE and DELETE on LoadBalancerModel tables (run schema changes with `djangoloadbalancer migrate`)"
            )

    def _one_sequence_reset(self, sql: str) -> Optional[re.Match]:
        """Django's sequence reset of one table, and nothing else in the statement."""
        return self._SEQUENCE_TARGET.match(sql) if sql.lower().count("setval") == 1 else None

    def _resets_own_sequences(self, sql: str) -> bool:
        """Django's SQLite sequence reset (flush), for load-balanced tables only."""
        match = self._SQLITE_SEQUENCE_RESET.match(sql)
        return bool(match) and {name.strip(" '\"") for name in match.group(1).split(",")} <= self.tables
