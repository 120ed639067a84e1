"""Issue 14 item 5: a write whose value each copy would compute itself (the clock, random
numbers) is rewritten to one value for every copy, or refused; never applied silently.

Real coordinator, real databases: every copy is read directly afterwards, and the journal
(which replays writes to a lagging copy) must hold the rewritten statement.
"""
from __future__ import annotations

import datetime
import pickle
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from django.conf import settings
from django.db import NotSupportedError, connections
from django.db.models.functions import Now, Random, TruncDate

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from tests.support.lb import ALIASES, BACKEND
from tests.testapp.models import Stamp

TABLE = "testapp_stamp"
UTC = datetime.timezone.utc
postgres_only = pytest.mark.postgres_only
sqlite_only = pytest.mark.sqlite_only


# -- helpers --------------------------------------------------------------------------------
def lb_execute(sql: str, params=None):
    with connections[lb_alias()].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def copies(replicas, column: str, pk: int) -> dict:
    """The raw value of ``column`` of row ``pk`` on each copy, read on the copy's own connection."""
    replicas.handle.wait_drained()
    out = {}
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(f'SELECT "{column}" FROM "{TABLE}" WHERE id = %s', [pk])
            out[alias] = cursor.fetchone()[0]
    return out


def one_value(replicas, column: str, pk: int):
    values = copies(replicas, column, pk)
    assert len(set(values.values())) == 1, f"the copies differ: {values}"
    value = values[ALIASES[0]]
    assert value is not None
    return value


def last_journaled_sql() -> str:
    """The statements of the last write the journal holds (what a lagging copy would replay)."""
    path = Path(settings.LOAD_BALANCER["JOURNAL_DIR"]) / "journal.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        blob = db.execute("SELECT statements FROM entries WHERE void = 0 ORDER BY seq DESC LIMIT 1").fetchone()[0]
    return "\n".join(sql for sql, _params, _many in pickle.loads(blob))


def as_utc(value) -> datetime.datetime:
    if isinstance(value, str):   # SQLite keeps datetimes as text, in UTC
        value = datetime.datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def assert_refused(info, name: str) -> None:
    assert type(info.value).__name__ == "NonDeterministicWrite"
    message = str(info.value)
    assert name in message and "pass it as a parameter" in message, message


@pytest.fixture
def stamp(replicas):
    return Stamp.objects.create(label="s")


# -- the ORM --------------------------------------------------------------------------------
def test_update_to_now_is_one_value_on_every_copy(replicas, stamp):
    before = datetime.datetime.now(UTC)
    Stamp.objects.filter(pk=stamp.pk).update(at=Now())
    after = datetime.datetime.now(UTC)
    value = as_utc(one_value(replicas, "at", stamp.pk))
    assert before - datetime.timedelta(seconds=1) <= value <= after + datetime.timedelta(seconds=1)
    journaled = last_journaled_sql()
    assert "STATEMENT_TIMESTAMP" not in journaled and "'NOW'" not in journaled, journaled
    assert {as_utc(v) for v in Stamp.objects.using(ALIASES[-1]).filter(pk=stamp.pk).values_list("at", flat=True)} == {value}


def test_truncdate_of_now_is_one_value_on_every_copy(replicas, stamp):
    days = {datetime.datetime.now(UTC).date()}
    Stamp.objects.filter(pk=stamp.pk).update(day=TruncDate(Now()))
    days.add(datetime.datetime.now(UTC).date())
    assert str(one_value(replicas, "day", stamp.pk)) in {str(d) for d in days}
    journaled = last_journaled_sql()
    assert "STATEMENT_TIMESTAMP" not in journaled and "'NOW'" not in journaled, journaled


def test_delete_filtered_on_now_removes_the_same_rows_everywhere(replicas):
    # the clock in a WHERE clause: each copy reading its own would pick its own rows
    soon = datetime.datetime.now(UTC) + datetime.timedelta(milliseconds=30)
    Stamp.objects.bulk_create([Stamp(label="past", at=soon - datetime.timedelta(days=1)), Stamp(label="soon", at=soon)])
    time.sleep(0.03)
    Stamp.objects.filter(at__lt=Now()).delete()
    replicas.assert_identical([TABLE])
    journaled = last_journaled_sql()
    assert "STATEMENT_TIMESTAMP" not in journaled and "'NOW'" not in journaled, journaled


def test_db_default_now_is_one_value_on_every_copy(replicas):
    # PostgreSQL would compile it as DEFAULT (each copy's own clock); the virtual alias
    # compiles it inline, and the client rewrites it.
    one = Stamp.objects.create(label="one")
    Stamp.objects.bulk_create([Stamp(label=f"bulk{i}") for i in range(3)])
    journaled = last_journaled_sql()
    assert "DEFAULT" not in journaled and "STATEMENT_TIMESTAMP" not in journaled and "'NOW'" not in journaled
    replicas.assert_identical([TABLE])
    assert one_value(replicas, "created", one.pk)
    assert one.created is not None


def test_random_is_refused_and_applied_nowhere(replicas, stamp):
    with pytest.raises(NotSupportedError) as info:
        Stamp.objects.filter(pk=stamp.pk).update(number=Random())
    assert_refused(info, "RANDOM()" if BACKEND == "postgres" else "RAND()")
    assert "random.random()" in str(info.value)
    assert set(copies(replicas, "number", stamp.pk).values()) == {None}
    with pytest.raises(NotSupportedError):
        Stamp.objects.create(label="random", number=Random())
    assert not any(Stamp.objects.using(alias).filter(label="random").exists() for alias in ALIASES)


def test_order_by_random_in_an_update_is_refused(replicas):
    Stamp.objects.bulk_create([Stamp(label=f"r{i}") for i in range(5)])
    with pytest.raises(NotSupportedError) as info:
        Stamp.objects.filter(pk__in=Stamp.objects.order_by("?").values("pk")[:2]).update(text="picked")
    assert_refused(info, "RANDOM()" if BACKEND == "postgres" else "RAND()")
    assert "random.sample()" in str(info.value)
    replicas.assert_identical([TABLE])
    assert not any(Stamp.objects.using(alias).filter(text="picked").exists() for alias in ALIASES)


def test_python_side_values_are_untouched(replicas):
    # auto_now / default=callable are computed in the app process: nothing to rewrite
    at = datetime.datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    stamp = Stamp.objects.create(label="py", at=at, text="now() random() CURRENT_TIMESTAMP", now="datetime('now')")
    assert as_utc(one_value(replicas, "at", stamp.pk)) == at
    assert one_value(replicas, "text", stamp.pk) == "now() random() CURRENT_TIMESTAMP"
    assert one_value(replicas, "now", stamp.pk) == "datetime('now')"


# -- raw SQL through the load-balanced connection -----------------------------------------
REWRITTEN = {
    "postgres": [
        ("at", "now()"), ("at", "NOW ( )"), ("at", "CURRENT_TIMESTAMP"), ("at", "CURRENT_TIMESTAMP(3)"),
        ("at", "statement_timestamp()"), ("at", "transaction_timestamp()"), ("at", "clock_timestamp()"),
        ("at", "LOCALTIMESTAMP"), ("at", "'now'::timestamptz"), ("at", "pg_catalog.now()"),
        ("day", "CURRENT_DATE"), ("day", "'tomorrow'::date"), ("text", "CURRENT_TIME::text"),
        ("text", "LOCALTIME(2)::text"), ("text", "date_trunc('hour', now())::text"),
    ],
    "sqlite": [
        ("at", "datetime('now')"), ("at", "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')"),
        ("at", "CURRENT_TIMESTAMP"), ("day", "CURRENT_DATE"), ("text", "CURRENT_TIME"),
        ("number", "julianday('now')"), ("number", "unixepoch('now')"), ("day", "date()"),
        ("text", "time()"), ("text", "strftime('%%s', 'now')"),
    ],
}
REFUSED = {
    "postgres": [("number", "random()", "RANDOM()"), ("text", "gen_random_uuid()::text", "GEN_RANDOM_UUID()"),
                 ("text", "uuid_generate_v4()::text", "UUID_GENERATE_V4()"), ("text", "timeofday()", "TIMEOFDAY()"),
                 ("number", "floor(random() * 10)", "RANDOM()")],
    "sqlite": [("number", "random()", "RANDOM()"), ("text", "hex(randomblob(4))", "RANDOMBLOB()"),
               ("number", "RAND()", "RAND()"), ("number", "abs(random()) % 10", "RANDOM()")],
}


@pytest.mark.parametrize("column, expression", REWRITTEN[BACKEND], ids=[e for _c, e in REWRITTEN[BACKEND]])
def test_raw_clock_function_is_one_value_on_every_copy(replicas, stamp, column, expression):
    lb_execute(f'UPDATE "{TABLE}" SET "{column}" = {expression} WHERE id = %s', [stamp.pk])
    one_value(replicas, column, stamp.pk)
    journaled = last_journaled_sql()
    assert expression.lower() not in journaled.lower(), journaled


@pytest.mark.parametrize("column, expression, name", REFUSED[BACKEND], ids=[e for _c, e, _n in REFUSED[BACKEND]])
def test_raw_random_function_is_refused_and_applied_nowhere(replicas, stamp, column, expression, name):
    before = copies(replicas, column, stamp.pk)
    with pytest.raises(NotSupportedError) as info:
        lb_execute(f'UPDATE "{TABLE}" SET "{column}" = {expression} WHERE id = %s', [stamp.pk])
    assert_refused(info, name)
    assert copies(replicas, column, stamp.pk) == before


def test_strings_and_quoted_identifiers_are_untouched(replicas, stamp):
    text = "now() random() CURRENT_TIMESTAMP datetime('now') 'NOW'"
    literal = text.replace("'", "''")
    lb_execute(f"UPDATE \"{TABLE}\" SET \"now\" = '{literal}', \"text\" = %s WHERE id = %s -- random()",
               ["CURRENT_DATE", stamp.pk])
    assert one_value(replicas, "now", stamp.pk) == text
    assert one_value(replicas, "text", stamp.pk) == "CURRENT_DATE"


# -- transactions -------------------------------------------------------------------------
@postgres_only
def test_a_transaction_pins_now_like_postgresql(replicas):
    a, b, c = (Stamp.objects.create(label=n) for n in "abc")
    with django_lb_shm.atomic():
        lb_execute(f'UPDATE "{TABLE}" SET at = now() WHERE id = %s', [a.pk])
        time.sleep(0.05)
        lb_execute(f'UPDATE "{TABLE}" SET at = CURRENT_TIMESTAMP WHERE id = %s', [b.pk])
        lb_execute(f'UPDATE "{TABLE}" SET at = statement_timestamp() WHERE id = %s', [c.pk])
    first = one_value(replicas, "at", a.pk)
    assert one_value(replicas, "at", b.pk) == first                                   # the transaction's time
    assert one_value(replicas, "at", c.pk) >= first + datetime.timedelta(seconds=0.04)  # the statement's
    with django_lb_shm.atomic():
        lb_execute(f'UPDATE "{TABLE}" SET at = transaction_timestamp() WHERE id = %s', [b.pk])
    assert one_value(replicas, "at", b.pk) > first                                    # a new transaction


@sqlite_only
def test_a_transaction_reads_the_clock_per_statement_like_sqlite(replicas):
    a, b = Stamp.objects.create(label="a"), Stamp.objects.create(label="b")
    with django_lb_shm.atomic():
        lb_execute(f"UPDATE \"{TABLE}\" SET at = STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'now') WHERE id = %s", [a.pk])
        time.sleep(0.05)
        lb_execute(f"UPDATE \"{TABLE}\" SET at = STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'now') WHERE id = %s", [b.pk])
    assert one_value(replicas, "at", b.pk) > one_value(replicas, "at", a.pk)


def test_orm_now_in_a_transaction_is_one_value_on_every_copy(replicas):
    a = Stamp.objects.create(label="a")
    with django_lb_shm.atomic():
        Stamp.objects.filter(pk=a.pk).update(at=Now())
        Stamp.objects.create(label="b")
    replicas.assert_identical([TABLE])
    assert one_value(replicas, "at", a.pk)


# -- reads ----------------------------------------------------------------------------------
def test_reads_are_neither_rewritten_nor_refused(replicas, stamp, monkeypatch):
    import django_lb_shm.client.determinism as determinism

    def must_not_run(*args, **kwargs):
        raise AssertionError("a read went through the write rewriting")

    monkeypatch.setattr(determinism, "deterministic", must_not_run)
    assert lb_execute("SELECT random()")[0][0] is not None
    assert Stamp.objects.filter(pk=stamp.pk, created__lte=Now()).count() == 1
    assert len(list(Stamp.objects.order_by("?"))) == 1
    with django_lb_shm.atomic():
        assert len(list(Stamp.objects.select_for_update().filter(pk=stamp.pk).order_by("?"))) == 1
        stamp.label = "locked"
        stamp.save(update_fields=["label"])   # an ordinary write: the pre-check lets it through
        assert lb_execute("SELECT now()" if BACKEND == "postgres" else "SELECT datetime('now')")[0][0]
