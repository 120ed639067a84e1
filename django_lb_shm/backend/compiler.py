"""SQL compilers for the virtual alias: the vendor's own, plus one duty on INSERT.

An INSERT whose primary key the database generates (AutoField & co.) must not
let every database invent its own key.  The insert compiler also compiles the
same INSERT with the key column present, holding a marker where each row's key
goes; the coordinator runs the plain INSERT on the first database, reads the
keys it returned, and runs the explicit-key INSERT with those keys on all the
others (followed by a sequence reset where the vendor needs one).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Optional

from django.core.management.color import no_style
from django.db.models.constants import OnConflict

from django_lb_shm.errors import NotSupportedError
from django_lb_shm.wire.descriptors import InsertKeys

# Markers are integers no application uses as a key; one per row of an INSERT.
_MARKER_BASE = -(2**62) + 7919


def marker(i: int) -> int:
    return _MARKER_BASE - i


class LoadBalancedInsertMixin:
    def pre_save_val(self, field: Any, obj: Any) -> Any:
        # Compiled twice (plain and explicit-key forms): auto_now, default=callable
        # and friends must give both forms the same value.
        cache = self.__dict__.setdefault("_lb_pre_save", {})
        key = (id(obj), field.attname)
        if key not in cache:
            cache[key] = super().pre_save_val(field, obj)
        return cache[key]

    def as_sql(self):
        # Statements compiled once already for this execute_sql() (see _insert_key_pairs).
        rowwise = self.__dict__.get("_lb_rowwise_sql")
        return rowwise if rowwise is not None else super().as_sql()

    def execute_sql(self, returning_fields: Optional[list] = None):
        self.connection.ensure_connection()
        session = self.connection.connection
        pairs = self._insert_key_pairs(returning_fields)
        try:
            session.expect_inserts(pairs)   # inside: an exception right after must not leave them queued
            return super().execute_sql(returning_fields)
        finally:
            session.expected_inserts.clear()
            self.__dict__.pop("_lb_rowwise_sql", None)

    def _generates_key(self) -> bool:
        pk = self.query.get_meta().pk
        return bool(self.query.objs) and pk not in (self.query.fields or []) and getattr(pk, "db_returning", False)

    def _insert_key_pairs(self, returning_fields: Optional[list]) -> list[tuple[str, InsertKeys]]:
        if not self._generates_key():
            return []
        opts = self.query.get_meta()
        objs = self.query.objs
        self.returning_fields = returning_fields
        if getattr(self.query, "on_conflict", None) == OnConflict.IGNORE and not returning_fields:
            identity = self._through_identity()
            return self._skippable_batch_pairs(identity) if identity else self._skippable_row_pairs()
        plain = self.as_sql()
        returns_rows = bool(returning_fields) and self.connection.features.can_return_columns_from_insert
        # Without RETURNING the only key is the cursor's lastrowid: one per statement, and
        # meaningless when ON CONFLICT skipped or updated the row instead of inserting it.
        on_conflict = getattr(self.query, "on_conflict", None)
        if not returns_rows and (len(plain) != len(objs) or on_conflict is not None):
            raise NotSupportedError(
                f"django_lb_shm cannot load-balance inserting {len(objs)} {opts.label} rows without the keys "
                "coming back (bulk_create() with ignore_conflicts or update_conflicts on a model whose primary "
                "key the database generates): it could not give every database the same keys; set the "
                "primary keys explicitly."
            )
        explicit = self._explicit_key_statements(returning_fields)
        self.__dict__["_lb_rowwise_sql"] = plain   # Django's execute_sql() runs these, not a third compile
        if len(explicit) != len(plain):
            raise NotSupportedError(f"cannot pair the INSERT statements for {opts.label} across databases")
        pk_index = returning_fields.index(opts.pk) if returns_rows and opts.pk in returning_fields else 0
        after = tuple(self.connection.ops.sequence_reset_sql(no_style(), [self.query.model]))
        per_statement = len(objs) // len(plain)
        pairs = []
        for n, ((sql, params), (f_sql, f_params)) in enumerate(zip(plain, explicit)):
            first = n * per_statement
            markers = tuple(marker(i) for i in range(first, first + per_statement))
            pairs.append((sql, InsertKeys(f_sql, f_params, markers, pk_index, after)))
        return pairs

    def _skippable_row_pairs(self) -> list[tuple[str, InsertKeys]]:
        """bulk_create(ignore_conflicts=True) with generated keys: one INSERT per row, RETURNING its
        key, so that the leader's answer says whether it inserted the row (and with which key) or
        skipped it on a conflict; the followers then insert exactly that row with that key, or
        nothing. as_sql() then returns these statements (execute_sql runs them one by one)."""
        opts = self.query.get_meta()
        if not self.connection.features.can_return_columns_from_insert:
            raise NotSupportedError(
                f"django_lb_shm cannot load-balance bulk_create(ignore_conflicts=True) of {opts.label} rows whose "
                "primary key the database generates: this database cannot return the keys of the rows an INSERT "
                "made (RETURNING; SQLite needs 3.35+), so the other databases could not get the same keys. Set "
                "the primary keys explicitly."
            )
        after = tuple(self.connection.ops.sequence_reset_sql(no_style(), [self.query.model]))
        plain, pairs = [], []
        for obj in self.query.objs:
            one = self._one_row_compiler(obj, [opts.pk])
            (sql, params), = one.as_sql()
            (f_sql, f_params), = one._explicit_key_statements([opts.pk])
            plain.append((sql, params))
            pairs.append((sql, InsertKeys(f_sql, f_params, (marker(0),), 0, after, may_skip=True)))
        self.__dict__["_lb_rowwise_sql"] = plain
        return pairs

    def _through_identity(self) -> list:
        """The two foreign keys of an auto-created many-to-many table (``add()``: Django needs no
        keys back) when every row's values are integers, which the leader returns as they were
        sent; [] otherwise (one INSERT per row then)."""
        opts = self.query.get_meta()
        if not (opts.auto_created and self.connection.features.can_return_rows_from_bulk_insert):
            return []
        identity = [f for f in opts.fields if f.is_relation and f.concrete]
        if len(identity) != 2 or any(f not in (self.query.fields or []) for f in identity):
            return []
        if not all(type(getattr(obj, f.attname)) is int for obj in self.query.objs for f in identity):
            return []
        return identity

    def _skippable_batch_pairs(self, identity: list) -> list[tuple[str, InsertKeys]]:
        """Many-to-many ``add()`` with ignore_conflicts: one INSERT ... ON CONFLICT DO NOTHING for
        all rows, RETURNING each inserted row's key and foreign keys, so that the leader says which
        rows it inserted and with which keys; the followers insert exactly those (one statement per
        row, on their side only)."""
        opts = self.query.get_meta()
        after = tuple(self.connection.ops.sequence_reset_sql(no_style(), [self.query.model]))
        everything = self._one_row_compiler(None, [opts.pk] + identity)
        everything.query.objs = self.query.objs
        plain = everything.as_sql()
        rows = []
        for obj in self.query.objs:
            (f_sql, f_params), = self._one_row_compiler(obj, [opts.pk])._explicit_key_statements([opts.pk])
            rows.append((tuple(getattr(obj, f.attname) for f in identity), f_sql, f_params))
        self.__dict__["_lb_rowwise_sql"] = plain
        (sql, _), = plain
        return [(sql, InsertKeys(rows[0][1], (), (marker(0),), 0, after, rows=tuple(rows)))]

    def _one_row_compiler(self, obj: Any, returning_fields: list) -> "LoadBalancedInsertMixin":
        query = copy.copy(self.query)
        query.objs = [obj]
        one = self.__class__(query, self.connection, self.using)
        one.__dict__["_lb_pre_save"] = self.__dict__.setdefault("_lb_pre_save", {})
        one.returning_fields = returning_fields
        return one

    def _explicit_key_statements(self, returning_fields: Optional[list]) -> list:
        opts = self.query.get_meta()
        pk = opts.pk
        query = copy.copy(self.query)
        query.fields = [pk] + list(self.query.fields or [])
        other = self.__class__(query, self.connection, self.using)
        other.__dict__["_lb_pre_save"] = self.__dict__.setdefault("_lb_pre_save", {})
        other.returning_fields = returning_fields
        saved = [getattr(obj, pk.attname) for obj in self.query.objs]
        try:
            for i, obj in enumerate(self.query.objs):
                setattr(obj, pk.attname, marker(i))
            return other.as_sql()
        finally:
            for obj, value in zip(self.query.objs, saved):
                setattr(obj, pk.attname, value)
            cache = other.__dict__["_lb_pre_save"]
            for obj in self.query.objs:
                cache.pop((id(obj), pk.attname), None)


@functools.lru_cache(maxsize=None)
def load_balanced_compiler(base: type) -> type:
    if base.__name__ != "SQLInsertCompiler":
        return base
    return type("SQLInsertCompiler", (LoadBalancedInsertMixin, base), {"__module__": __name__})
