"""``djangoloadbalancer verify``: are the load-balanced databases still identical?

Every LoadBalancerModel table (and every auto-created many-to-many table between
load-balanced models) is read from each database in LOAD_BALANCER['DATABASES']
directly, through ``django.db.connections[alias]``, never through the
coordinator.  Each table is streamed in primary-key order, one chunk at a time
(keyset pagination: ``WHERE pk > last ORDER BY pk LIMIT chunk``), and the
streams of all databases are merge-compared in lockstep, so memory stays
bounded by ``chunk_size`` rows per database whatever the table size.  Rows are
compared by a hash of their normalized values, keyed by primary key.

Before the rows, each table's columns are compared: a copy that lacks the table, or
columns another copy has (a migration applied to some copies only), is named, and the
rows are then compared on the model's columns every copy has (not at all when a copy
lacks the table or its primary key).

Exit codes: 0 identical, 1 some table differs (in rows or columns), 2 a database (or a
table on it) could not be read; differences found on the others are still reported.

A table with differences is compared once more after a short pause, over the
key range where the differences were, so a write that one database had not
applied yet (WRITE_ACK 'FIRST') is not reported as a divergence.
"""
from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TextIO

from django_lb_shm.client.connection import read_status
from django_lb_shm.routers import is_load_balanced
from django_lb_shm.settings.config import get_config
from django_lb_shm.wire.exit_codes import (
    EXIT_DIFFERENT,
    EXIT_IDENTICAL,
    EXIT_UNREADABLE,
)

RECHECK_DELAY = 0.5  # seconds before a table with differences is compared again
_TEXT_TYPES = ("char", "text", "clob", "string")


class VerifyError(Exception):
    """One database could not be read while comparing one table."""

    def __init__(self, alias: str, message: str):
        super().__init__(f"{alias}: {message}")
        self.alias = alias


# -- what to compare -------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """One table to compare: its columns, and which of them form the primary key."""

    table: str
    label: str                        # model label, e.g. 'testapp.Book_tags'
    columns: tuple[str, ...]
    pk_columns: tuple[str, ...]
    text_pk: tuple[bool, ...] = ()    # key columns that need an explicit binary collation

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(c) for c in self.pk_columns)


def table_spec(model: Any, alias: str) -> TableSpec:
    from django.db import connections

    meta = model._meta
    columns = tuple(f.column for f in meta.local_concrete_fields if f.column)
    pk_fields = list(getattr(meta, "pk_fields", [meta.pk]))
    connection = connections[alias]
    text_pk = tuple(
        any(t in (f.db_type(connection) or "").lower() for t in _TEXT_TYPES) for f in pk_fields
    )
    return TableSpec(meta.db_table, meta.label, columns, tuple(f.column for f in pk_fields), text_pk)


def load_balanced_tables(alias: Optional[str] = None) -> list[TableSpec]:
    """Every concrete table of a load-balanced model (LoadBalancerModel, LOAD_BALANCER['MODELS']) and
    auto-created m2m table between them."""
    from django.apps import apps

    alias = alias or get_config().databases[0]
    specs: dict[str, TableSpec] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.abstract or meta.proxy or meta.swapped or not is_load_balanced(model):
            continue
        specs.setdefault(meta.db_table, table_spec(model, alias))
    return [specs[t] for t in sorted(specs)]


# -- row hashing ------------------------------------------------------------------------------
_PLAIN = frozenset({type(None), bool, int, float, str})


def normalize(value: Any) -> Any:
    """A deterministic, comparable stand-in for one value as a database driver returned it."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(value).hex())
    if isinstance(value, decimal.Decimal):
        return ("decimal", str(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return (type(value).__name__, value.isoformat())
    if isinstance(value, datetime.timedelta):
        return ("timedelta", value // datetime.timedelta(microseconds=1))
    if isinstance(value, uuid.UUID):
        return ("uuid", value.hex)
    if isinstance(value, (dict, list, tuple)):
        return ("json", json.dumps(value, sort_keys=True, default=str))
    if isinstance(value, (bool, int, float, str)):  # subclasses (e.g. enum members)
        return (type(value).__name__, repr(value))
    return (type(value).__name__, str(value))


def row_digest(row: Sequence[Any]) -> bytes:
    """A 128-bit hash of one row's normalized values."""
    text = repr(tuple(map(normalize, row)))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _comparable(key: Any) -> Any:
    """Keys as Python orders them like the database does (memoryview has no order)."""
    if isinstance(key, (memoryview, bytearray)):
        return bytes(key)
    if isinstance(key, tuple):
        return tuple(map(_comparable, key))
    return key


# -- streaming one table from one database ------------------------------------------------------
def _key_sql(spec: TableSpec, vendor: str, quote: Callable[[str], str]) -> list[str]:
    """The key columns as ORDER BY / WHERE terms.

    Text keys are ordered bytewise (code point order, like Python's str), whatever
    the database's collation: the merge compares keys in Python.  On PostgreSQL
    that ordering cannot use a primary key index built with another collation,
    so a text-keyed table costs a sort per chunk; integer and UUID keys use the index.
    """
    collation = {"postgresql": ' COLLATE "C"', "sqlite": " COLLATE BINARY"}.get(vendor, "")
    text_pk = spec.text_pk or (False,) * len(spec.pk_columns)
    return [quote(column) + (collation if text else "") for column, text in zip(spec.pk_columns, text_pk)]


def _chunk_query(spec: TableSpec, alias: str, chunk_size: int, lower: str, upper: bool) -> str:
    from django.db import connections

    connection = connections[alias]
    quote = connection.ops.quote_name
    keys = _key_sql(spec, connection.vendor, quote)
    key = keys[0] if len(keys) == 1 else "(" + ", ".join(keys) + ")"
    marks = "%s" if len(keys) == 1 else "(" + ", ".join(["%s"] * len(keys)) + ")"
    where = [f"{key} {lower} {marks}"] if lower else []
    if upper:
        where.append(f"{key} <= {marks}")
    return (
        f"SELECT {', '.join(quote(c) for c in spec.columns)} FROM {quote(spec.table)}"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY {', '.join(keys)} LIMIT {int(chunk_size)}"
    )


def row_stream(alias: str, spec: TableSpec, chunk_size: int,
               lo: Any = None, hi: Any = None) -> Iterator[tuple[Any, bytes]]:
    """(primary key, row digest) in key order, read ``chunk_size`` rows at a time (lo/hi inclusive).

    A key is the column's value, or a tuple of values for a composite primary key.
    """
    from django.db import DatabaseError, connections

    composite = len(spec.pk_columns) > 1
    get_key = itemgetter(*spec.pk_indexes)
    as_params = list if composite else (lambda key: [key])
    last, op = lo, ">="
    while True:
        sql = _chunk_query(spec, alias, chunk_size, op if last is not None else "", hi is not None)
        params = (as_params(last) if last is not None else []) + (as_params(hi) if hi is not None else [])
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute(sql, params)
                rows = cursor.fetchall()
        except DatabaseError as exc:
            raise VerifyError(alias, f"cannot read table {spec.table}: {type(exc).__name__}: {exc}") from exc
        previous = last if op == ">" else None
        for row in rows:
            key = get_key(row)
            if composite or type(key) not in _PLAIN:
                key = _comparable(key)
            if previous is not None and not previous < key:
                raise VerifyError(alias, f"table {spec.table} returned primary keys out of order "
                                         f"({_show_key(previous)} then {_show_key(key)})")
            previous = key
            yield key, row_digest(row)
        if len(rows) < chunk_size:
            return
        last, op = previous, ">"


def merge_streams(streams: dict[str, Iterator[tuple[Any, bytes]]]) -> Iterator[tuple[Any, dict[str, bytes]]]:
    """Walk key-ordered streams in lockstep: (key, {alias: digest} for the databases holding it)."""
    heads = {alias: next(stream, None) for alias, stream in streams.items()}
    while True:
        smallest = None
        for head in heads.values():
            if head is not None and (smallest is None or head[0] < smallest):
                smallest = head[0]
        if smallest is None:
            return
        present = {}
        for alias, head in heads.items():
            if head is not None and head[0] == smallest:
                present[alias] = head[1]
                heads[alias] = next(streams[alias], None)
        yield smallest, present


# -- comparing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowDifference:
    pk: Any                           # the key value (a tuple for composite keys)
    missing_on: tuple[str, ...] = ()
    different_on: tuple[str, ...] = ()
    only_on: tuple[str, ...] = ()     # set when a minority of the databases hold the row

    def describe(self) -> str:
        parts = []
        if self.only_on:
            parts.append(f"only on {', '.join(self.only_on)} (missing on {', '.join(self.missing_on)})")
        elif self.missing_on:
            parts.append(f"missing on {', '.join(self.missing_on)}")
        if self.different_on:
            parts.append(f"different on {', '.join(self.different_on)}")
        return f"pk {_show_key(self.pk)}: " + "; ".join(parts)

    @property
    def odd_ones(self) -> tuple[str, ...]:
        """The databases that disagree with the majority about this row."""
        return self.only_on or self.missing_on + self.different_on


@dataclass
class TableReport:
    table: str
    label: str
    databases: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)
    differing: int = 0                # rows that differ in any way
    differences: list[RowDifference] = field(default_factory=list)  # the first `show` of them
    odd_ones: tuple[str, ...] = ()    # every database that disagreed about some row
    error: Optional[str] = None
    rechecked: bool = False
    schema: dict[str, str] = field(default_factory=dict)   # database -> what it lacks ("no column extra")
    rows_compared: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.differing == 0 and not self.schema


def _show_key(key: Any) -> str:
    return str(key) if isinstance(key, (int, str, uuid.UUID)) else repr(key)


def classify_row(key: Any, present: dict[str, bytes], aliases: Sequence[str]) -> Optional[RowDifference]:
    """None when every database holds the same row; else which databases lack it or differ."""
    if len(present) == len(aliases) and len(set(present.values())) == 1:
        return None
    missing = tuple(a for a in aliases if a not in present)
    holders = [a for a in aliases if a in present]
    only_on = tuple(holders) if len(holders) * 2 < len(aliases) else ()
    groups: dict[bytes, list[str]] = {}
    for alias in holders:
        groups.setdefault(present[alias], []).append(alias)
    # The largest group of identical rows is the reference; ties go to the first database listed.
    reference = max(groups.values(), key=len)
    different = tuple(a for a in holders if a not in reference)
    return RowDifference(key, missing_on=missing, different_on=different, only_on=only_on)


@dataclass
class _Pass:
    """One merge pass over a key range."""

    counts: dict[str, int]
    differing: int = 0
    differences: list[RowDifference] = field(default_factory=list)
    odd_ones: set = field(default_factory=set)
    first: Any = None
    last: Any = None
    before_first: dict[str, int] = field(default_factory=dict)  # counts below the first difference
    through_last: dict[str, int] = field(default_factory=dict)  # counts up to the last difference


def _compare_pass(spec: TableSpec, aliases: Sequence[str], chunk_size: int, show: int,
                  lo: Any = None, hi: Any = None,
                  tick: Optional[Callable[[int], None]] = None) -> _Pass:
    streams = {alias: row_stream(alias, spec, chunk_size, lo, hi) for alias in aliases}
    result = _Pass(counts=dict.fromkeys(aliases, 0))
    for done, (key, present) in enumerate(merge_streams(streams), 1):
        difference = classify_row(key, present, aliases)
        if difference is not None and result.first is None:
            result.first, result.before_first = key, dict(result.counts)
        for alias in present:
            result.counts[alias] += 1
        if difference is not None:
            result.differing += 1
            result.odd_ones.update(difference.odd_ones)
            result.last, result.through_last = key, dict(result.counts)
            if len(result.differences) < show:
                result.differences.append(difference)
        if tick is not None and done % 256 == 0:
            tick(done)
    return result


def compare_table(spec: TableSpec, aliases: Sequence[str], chunk_size: int = 2000, show: int = 10,
                  recheck_delay: Optional[float] = RECHECK_DELAY,
                  tick: Optional[Callable[[int], None]] = None) -> TableReport:
    """Compare one table across the databases (read directly, never through the coordinator).

    With differences, the key range holding them is compared again after
    ``recheck_delay`` seconds (None: report the first pass as it is).
    """
    aliases = tuple(aliases)
    report = TableReport(spec.table, spec.label, aliases)
    try:
        first = _compare_pass(spec, aliases, chunk_size, show, tick=tick)
        final = first
        if first.differing and recheck_delay is not None:
            time.sleep(recheck_delay)
            final = _compare_pass(spec, aliases, chunk_size, show, lo=first.first, hi=first.last)
            # Rows outside [first, last] were identical in the first pass: keep those counts.
            final.counts = {a: first.counts[a] - first.through_last[a] + first.before_first[a] + final.counts[a]
                            for a in aliases}
            report.rechecked = True
    except VerifyError as exc:
        report.error = str(exc)
        return report
    report.counts, report.differing, report.differences = final.counts, final.differing, final.differences
    report.odd_ones = tuple(a for a in aliases if a in final.odd_ones)
    return report


# -- columns ------------------------------------------------------------------------------------
def table_columns(alias: str, table: str) -> Optional[list[str]]:
    """The columns of ``table`` on ``alias`` (None: no such table); VerifyError when it cannot be read."""
    from django.db import DatabaseError, connections

    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            if table not in connection.introspection.table_names(cursor):
                return None
            return [column.name for column in connection.introspection.get_table_description(cursor, table)]
    except DatabaseError as exc:
        raise VerifyError(alias, f"cannot read the columns of table {table}: {type(exc).__name__}: {exc}") from exc


def schema_differences(spec: TableSpec, aliases: Sequence[str]) -> tuple[Optional[TableSpec], dict[str, str]]:
    """(the spec narrowed to the columns every copy has -- None when the rows cannot be compared
    --, {alias: what it lacks that another copy has})."""
    columns = {alias: table_columns(alias, spec.table) for alias in aliases}
    present = {alias: set(found) for alias, found in columns.items() if found is not None}
    if not present:   # on no copy (a model never migrated, e.g. declared inside a test): nothing differs
        return None, {}
    every = set().union(*present.values())
    lacking = {}
    for alias in aliases:
        if alias not in present:
            lacking[alias] = f"no table {spec.table}"
        elif every - present[alias]:
            names = sorted(every - present[alias])
            lacking[alias] = f"no column{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if len(present) < len(aliases):
        return None, lacking
    common = set.intersection(*present.values()) if present else set()
    if not set(spec.pk_columns) <= common:
        return None, lacking
    return replace(spec, columns=tuple(c for c in spec.columns if c in common)), lacking


def compare_tables(aliases: Optional[Sequence[str]] = None, tables: Optional[Iterable[Any]] = None,
                   chunk_size: int = 2000, show: int = 10, recheck_delay: Optional[float] = RECHECK_DELAY,
                   progress: Optional["ProgressBar"] = None) -> list[TableReport]:
    """One TableReport per load-balanced table (or per table given: TableSpec, model or table name)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    aliases = tuple(aliases or get_config().databases)
    specs = _resolve_tables(tables, aliases[0])
    reports = []
    for spec in specs:
        tick = None
        if progress is not None:
            progress.start(spec.table, _estimate_rows(spec, aliases))
            tick = progress.update
        reports.append(_compare_columns_then_rows(spec, aliases, chunk_size, show, recheck_delay, tick))
        if progress is not None:
            progress.finish()
    return reports


def _compare_columns_then_rows(spec: TableSpec, aliases: tuple, chunk_size: int, show: int,
                               recheck_delay: Optional[float], tick: Optional[Callable[[int], None]]) -> TableReport:
    try:
        narrowed, lacking = schema_differences(spec, aliases)
    except VerifyError as exc:
        return TableReport(spec.table, spec.label, aliases, error=str(exc))
    if narrowed is None:
        return TableReport(spec.table, spec.label, aliases, schema=lacking, rows_compared=False)
    report = compare_table(narrowed, aliases, chunk_size, show, recheck_delay, tick)
    report.schema = lacking
    return report


def _resolve_tables(tables: Optional[Iterable[Any]], alias: str) -> list[TableSpec]:
    available = {spec.table: spec for spec in load_balanced_tables(alias)}
    if tables is None:
        return list(available.values())
    specs = []
    for item in tables:
        if isinstance(item, TableSpec):
            specs.append(item)
        elif isinstance(item, str):
            if item not in available:
                raise ValueError(f"{item!r} is not a load-balanced table; known: {', '.join(available)}")
            specs.append(available[item])
        else:
            specs.append(table_spec(item, alias))
    return specs


def _estimate_rows(spec: TableSpec, aliases: Sequence[str]) -> int:
    from django.db import DatabaseError, connections

    counts = []
    for alias in aliases:
        connection = connections[alias]
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT COUNT(*) FROM {connection.ops.quote_name(spec.table)}")
                counts.append(cursor.fetchone()[0])
        except DatabaseError:
            pass  # the comparison itself reports it
    return max(counts, default=0)


# -- reachability -------------------------------------------------------------------------------
def find_unreachable(aliases: Sequence[str]) -> dict[str, str]:
    """{alias: reason} for every database that does not answer ``SELECT 1``."""
    from django.db import connections

    problems = {}
    for alias in aliases:
        try:
            connection = connections[alias]
            name = str(connection.settings_dict.get("NAME") or "")
            if connection.vendor == "sqlite" and not name.startswith("file:") and ":memory:" not in name \
                    and not os.path.exists(name):
                problems[alias] = f"the SQLite database file {name} does not exist"
                continue
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot be compared"
            problems[alias] = f"{type(exc).__name__}: {str(exc).strip() or 'no details'}"
    return problems


# -- output -------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar, redrawn at most every 0.1 s; only ever used on a terminal."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        self.columns = max(columns, 40) if columns else 80  # a new pseudo-terminal says 0
        self.label, self.total, self.drawn = "", 0, 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.drawn = label, total, 0.0
        self.update(0, force=True)

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn < 0.1:
            return
        self.drawn = now
        fraction = min(done / self.total, 1.0) if self.total else 1.0
        counter = f" {fraction:4.0%} {done}/{self.total} rows"
        label = self.label[: max(self.columns // 3, 10)]
        width = max(self.columns - len(label) - len(counter) - 4, 5)
        filled = int(fraction * width)
        line = f"{label} [{'#' * filled}{'.' * (width - filled)}]{counter}"
        self.stream.write("\r" + line[: self.columns - 1])
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\r" + " " * (self.columns - 1) + "\r")
        self.stream.flush()


def format_report(report: TableReport) -> list[str]:
    counts = " ".join(f"{a}={n}" for a, n in report.counts.items())
    if report.error is not None:
        return [f"{report.table:<32} ERROR      {report.error}"]
    if report.schema:
        return _format_schema(report)
    if report.ok and not report.rows_compared:
        return [f"{report.table:<32} {'no table':>10}       OK (on no copy)"]
    if report.ok:
        rows = next(iter(report.counts.values()), 0)
        return [f"{report.table:<32} {rows:>10} rows  OK"]
    lines = [f"{report.table:<32} DIFFERENT  {report.differing} row(s) differ, on "
             f"{', '.join(report.odd_ones)}; rows: {counts}"
             + ("; still different when compared again" if report.rechecked else "")]
    if report.differences:
        shown = len(report.differences)
        lines.append(f"    first {shown} differing primary key(s) of {report.table}:")
        lines += [f"    {d.describe()}" for d in report.differences]
    return lines


def _format_schema(report: TableReport) -> list[str]:
    lacking = "; ".join(f"{alias}: {what}" for alias, what in report.schema.items())
    if not report.rows_compared:
        return [f"{report.table:<32} SCHEMA     {lacking}; rows not compared"]
    rows = (f"rows on the columns every copy has: {report.differing} differ" if report.differing
            else f"rows identical on the columns every copy has ({next(iter(report.counts.values()), 0)} rows)")
    lines = [f"{report.table:<32} SCHEMA     {lacking}; {rows}"]
    if report.differences:
        lines += [f"    {d.describe()}" for d in report.differences]
    return lines


def _summary(reports: list[TableReport], unreachable: dict[str, str], aliases: Sequence[str]) -> tuple[int, str]:
    failed = [r.table for r in reports if r.error is not None]
    differ = [r.table + (" (schema)" if r.schema else "") for r in reports if r.error is None and not r.ok]
    if unreachable or failed:
        what = [f"{', '.join(unreachable)} unreachable"] if unreachable else []
        what += [f"could not compare {', '.join(failed)}"] if failed else []
        what += [f"{len(differ)} table(s) differ: {', '.join(differ)}"] if differ else []
        return EXIT_UNREADABLE, "verify INCOMPLETE: " + "; ".join(what) + "."
    if differ:
        return EXIT_DIFFERENT, (f"verify FAILED: {len(differ)} of {len(reports)} table(s) differ "
                                f"across {', '.join(aliases)}: {', '.join(differ)}.")
    return EXIT_IDENTICAL, f"verify OK: {len(reports)} table(s) identical on {', '.join(aliases)}."


def verify(chunk_size: int = 2000, show: int = 10, progress: bool = True,
           stream: Optional[TextIO] = None) -> int:
    """Compare every load-balanced table across LOAD_BALANCER['DATABASES']; 0 identical, 1 differ, 4 unreadable (wire/exit_codes.py)."""
    stream = stream if stream is not None else sys.stdout
    aliases = get_config().databases
    if chunk_size < 1:
        stream.write(f"verify: --chunk-size must be at least 1, got {chunk_size}\n")
        return EXIT_UNREADABLE
    unreachable = find_unreachable(aliases)
    for alias, reason in unreachable.items():
        stream.write(f"database {alias!r} cannot be reached: {reason}\n")
    reachable = [a for a in aliases if a not in unreachable]
    tables = load_balanced_tables(reachable[0] if reachable else aliases[0])
    reports: list[TableReport] = []
    if len(aliases) == 1:
        stream.write(f"Only one database ({aliases[0]}) is load balanced: nothing to compare.\n")
    elif len(reachable) >= 2:
        stream.write(f"Comparing {len(tables)} table(s) on {', '.join(reachable)} "
                     f"(chunks of {chunk_size} rows)\n")
        bar = ProgressBar(stream) if progress and _isatty(stream) else None
        for spec in tables:
            reports += compare_tables(reachable, [spec], chunk_size, max(show, 0), progress=bar)
            for line in format_report(reports[-1]):
                stream.write(line + "\n")
            stream.flush()
    else:
        stream.write("Fewer than two databases can be read: nothing was compared.\n")
    code, summary = _summary(reports, unreachable, reachable)
    stream.write(summary + "\n")
    if code == EXIT_DIFFERENT:
        stream.write(_pending_writes_note() + "\n")
    stream.flush()
    return code


def _pending_writes_note() -> str:
    """Copies differ while journaled writes wait to be applied: say whether that can be the reason."""
    try:
        status = read_status(get_config())
    except Exception:
        return ("No coordinator answers: writes in its journal may not be applied to every copy yet. "
                "Start it, wait until `djangoloadbalancer status` shows 0 pending, then verify again.")
    behind = [db["name"] for db in status["databases"] if db["state"] == "SCHEMA_BEHIND"]
    if behind:
        return (f"{', '.join(behind)} SCHEMA_BEHIND (see `djangoloadbalancer status`): migrations applied on another "
                "copy are missing there, and so are the writes that wait for them; run `djangoloadbalancer migrate`.")
    diverged = [db["name"] for db in status["databases"] if db["state"] == "DIVERGED"]
    if diverged:
        return (f"{', '.join(diverged)} DIVERGED (see `djangoloadbalancer status`): it rejected a write the "
                f"others applied; refill it with `djangoloadbalancer resync {diverged[0]}`.")
    out = [db["name"] for db in status["databases"] if db["state"] in ("NEW", "RESYNCING")]
    if out:
        return (f"{', '.join(out)} waiting for or in a resync (see `djangoloadbalancer status`): it serves no reads "
                "and is not expected to match until its resync completes.")
    pending = {db["name"]: db["pending_writes"] for db in status["databases"] if db["pending_writes"]}
    if pending:
        waiting = ", ".join(f"{name}: {count}" for name, count in pending.items())
        return (f"The coordinator still has writes to apply ({waiting}): verify again once "
                "`djangoloadbalancer status` shows 0 pending.")
    return "The coordinator has no writes pending: the copies really differ."


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
