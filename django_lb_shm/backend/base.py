"""DatabaseWrapper factory for the virtual alias (``ENGINE: 'django_lb_shm.backend'``).

The class is built on first use from the real databases' engine
(``LB_TARGET_ENGINE``): operations, features and the SQL compiler are theirs,
only the DB-API connection is replaced by a coordinator session.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.utils import CursorDebugWrapper
from django.db.utils import load_backend

from django_lb_shm.backend.compiler import load_balanced_compiler
from django_lb_shm.client.connection import get_client
from django_lb_shm.client.session import ClientSession
from django_lb_shm.client.statements import SAVEPOINT, classify
from django_lb_shm.plain_atomic import PARTNER
from django_lb_shm.settings.config import get_config

_under_test_runner = [False]   # set by LoadBalancerTestRunner for its test run


def count_under_test_runner(on: bool) -> None:
    _under_test_runner[0] = on


def default_is_counted() -> bool:
    """'default' records its queries for CaptureQueriesContext / assertNumQueries (force_debug_cursor),
    and LOAD_BALANCER['COUNT_QUERIES_ON_DEFAULT'] wants the load-balanced ones among them."""
    mode = get_config().count_queries_on_default   # first: it settles it outside tests (asked per cursor)
    if not (mode == "ALWAYS" or mode == "TESTS" and _under_test_runner[0]):
        return False
    return DEFAULT_DB_ALIAS in connections.settings and connections[DEFAULT_DB_ALIAS].force_debug_cursor


class CountedOnDefaultCursorWrapper(CursorDebugWrapper):
    """Django's debug cursor, whose entries also go to 'default''s ``queries_log`` while that one is
    counted: ``assertNumQueries(n)`` on 'default' then sees the load-balanced models' statements, one per
    statement the ORM ran (not the coordinator's own).  SAVEPOINT statements are not copied: a plain
    ``atomic()`` block's own savepoint on 'default' is counted already, its load-balanced twin's is not
    a statement the user wrote."""

    @contextmanager
    def debug_sql(self, sql: Optional[str] = None, params: Any = None, use_last_executed_query: bool = False,
                  many: bool = False) -> Iterator[None]:
        try:
            with super().debug_sql(sql, params, use_last_executed_query, many):
                yield
        finally:
            self._share_entry(sql)

    def _share_entry(self, sql: Optional[str]) -> None:
        log = self.db.queries_log
        if not log:
            return
        entry = log[-1]   # the one super().debug_sql() just appended (a connection is one thread's)
        if not self.db.queries_logged:
            log.pop()     # logged only for 'default''s sake
        if sql and default_is_counted() and classify(sql) != SAVEPOINT:
            # "alias" tells these apart from 'default''s own (Django's entries have "sql" and "time").
            connections[DEFAULT_DB_ALIAS].queries_log.append({**entry, "alias": self.db.alias})


class ProxyOperationsMixin:
    _compilers: dict = {}   # (operations class, compiler name) -> compiler class; asked on every query

    def compiler(self, compiler_name: str):
        key = (type(self), compiler_name)
        compiler = self._compilers.get(key)
        if compiler is None:
            compiler = self._compilers[key] = load_balanced_compiler(super().compiler(compiler_name))
        return compiler

    def last_executed_query(self, cursor: Any, sql: str, params: Any) -> str:
        # The vendor versions ask the real driver connection (mogrify); there is none here.
        if not params:
            return sql
        try:
            return sql % tuple(_literal(p) for p in params) if not isinstance(params, dict) else sql % {
                k: _literal(v) for k, v in params.items()
            }
        except (TypeError, ValueError):
            return f"{sql} -- params: {params!r}"


    def sql_flush(self, style: Any, tables: Any, *, reset_sequences: bool = False, allow_cascade: bool = False) -> list:
        """``flush --database <lb alias>`` (and TransactionTestCase): DELETE rather than TRUNCATE.

        The coordinator applies row changes to every copy in one transaction (foreign
        keys are checked at its end); TRUNCATE is not a row change it forwards.
        """
        if not tables:
            return []
        if self.connection.vendor == "sqlite":
            return super().sql_flush(style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        sql = [f"{style.SQL_KEYWORD('DELETE FROM')} {style.SQL_FIELD(self.quote_name(table))};" for table in tables]
        if reset_sequences:
            with self.connection.cursor() as cursor:
                introspection = self.connection.introspection
                sequences = [seq for table in tables for seq in introspection.get_sequences(cursor, table)]
            sql.extend(self.sequence_reset_by_name_sql(style, sequences))
        return sql


class ProxyFeaturesMixin:
    supports_transactions = True
    can_rollback_ddl = False
    # supports_ignore_conflicts stays the vendor's: with a generated key, the insert compiler runs
    # ON CONFLICT DO NOTHING one row per statement, RETURNING its key (compiler.py), so the leader
    # says which rows it inserted.
    # A db_default compiles inline in the INSERT, not as DEFAULT: the client then sees a
    # Now() (rewritten to one value) or a random function (refused) that each copy would
    # otherwise evaluate itself.
    supports_default_keyword_in_insert = False


class ProxyCreationMixin:
    """The virtual alias has no database of its own to create or destroy."""

    def create_test_db(self, *args: Any, **kwargs: Any) -> str:
        return self.connection.settings_dict["NAME"]

    def destroy_test_db(self, *args: Any, **kwargs: Any) -> None:
        return None


class ProxyWrapperMixin:
    """DB-API connection replaced by a :class:`ClientSession`; everything else is the vendor's."""

    # Not through queries_logged: debug_transaction() would then log this alias's own COMMITs too.
    def make_cursor(self, cursor: Any) -> Any:
        if default_is_counted():
            return CountedOnDefaultCursorWrapper(cursor, self)
        return super().make_cursor(cursor)

    def make_debug_cursor(self, cursor: Any) -> CountedOnDefaultCursorWrapper:
        return CountedOnDefaultCursorWrapper(cursor, self)

    def get_connection_params(self) -> dict:
        return {}

    # While a plain transaction.atomic() on 'default' has this connection's twin block open, the
    # pair has one rollback flag, 'default''s (plain_atomic._pair): what breaks or fixes one fixes
    # or breaks the other, as on one connection.
    @property
    def needs_rollback(self) -> bool:
        partner = self.__dict__.get(PARTNER)
        return partner.needs_rollback if partner is not None else self.__dict__.get("_lb_needs_rollback", False)

    @needs_rollback.setter
    def needs_rollback(self, value: bool) -> None:
        partner = self.__dict__.get(PARTNER)
        if partner is not None:
            partner.needs_rollback = value
        else:
            self.__dict__["_lb_needs_rollback"] = value

    def get_new_connection(self, conn_params: dict) -> ClientSession:
        return ClientSession(self.alias, self.vendor)

    def init_connection_state(self) -> None:
        # Session state (time zone, roles...) is set on the coordinator's own connections.
        pass

    def create_cursor(self, name: Any = None):
        return self.connection.cursor()

    def _set_autocommit(self, autocommit: bool) -> None:
        self.connection.set_autocommit(autocommit)

    def _start_transaction_under_autocommit(self) -> None:
        self.connection.begin()

    def is_usable(self) -> bool:
        return self.connection is not None and self.connection.is_usable()

    def disable_constraint_checking(self) -> bool:
        return False

    def enable_constraint_checking(self) -> None:
        pass

    def check_constraints(self, table_names: Any = None) -> None:
        pass

    def get_database_version(self):
        return tuple(server_info()["version"])

    @property
    def pg_version(self) -> int:
        return int(server_info()["server_version"])


@functools.lru_cache(maxsize=1)
def _server_info_cached(key: Any) -> dict:
    return get_client().call("hello")


def server_info() -> dict:
    client = get_client()
    return _server_info_cached((client.config.address.tuple, client.pid))


@functools.lru_cache(maxsize=None)
def wrapper_class(target_engine: str) -> type:
    target = load_backend(target_engine).DatabaseWrapper
    ops = type("LoadBalancerOperations", (ProxyOperationsMixin, target.ops_class), {})
    features = type("LoadBalancerFeatures", (ProxyFeaturesMixin, target.features_class), {})
    creation = type("LoadBalancerCreation", (ProxyCreationMixin, target.creation_class), {})
    return type(
        "LoadBalancerDatabaseWrapper",
        (ProxyWrapperMixin, target),
        {"ops_class": ops, "features_class": features, "creation_class": creation,
         "__module__": __name__},
    )


def DatabaseWrapper(settings_dict: dict, alias: str = DEFAULT_DB_ALIAS):  # noqa: N802 (Django's name)
    return wrapper_class(settings_dict["LB_TARGET_ENGINE"])(settings_dict, alias)


def _literal(value: Any) -> str:
    """A parameter as SQL text, close to what the vendor's own last_executed_query shows (numbers
    bare even when the driver wraps them, as psycopg's Int4; strings quoted)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)
