"""What making writes deterministic costs the client, per statement (timeit; no database needed).

    PYTHONPATH=. python stress/determinism_cost.py

The SQL is Django's own, compiled for SQLite and PostgreSQL from a model like the test
app's Author: the INSERT of create() (and its explicit-key twin), the UPDATE of save(), a
100-row bulk_create() INSERT, and update(at=Now()), which is rewritten.  "repeat" is an SQL
text seen before (an ORM query's text repeats: the verdict is cached), "first" a text never
seen (bulk inserts of varying sizes, raw SQL with inlined values): both caches emptied.
"""
from __future__ import annotations

import datetime
import timeit
import uuid

import django
from django.conf import settings

settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
               "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": "unused"}},
    INSTALLED_APPS=["django.contrib.contenttypes"], USE_TZ=True)
django.setup()

from django.db import models  # noqa: E402
from django.db.models.functions import Now  # noqa: E402
from django.db.models.sql import InsertQuery, UpdateQuery  # noqa: E402

from django_lb_shm.client import determinism  # noqa: E402
from django_lb_shm.client.session import ClientSession  # noqa: E402
from django_lb_shm.wire.descriptors import InsertKeys, Statement  # noqa: E402


class Author(models.Model):
    name = models.CharField(max_length=100)
    born = models.DateField(null=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    token = models.UUIDField(default=uuid.uuid4)
    rating = models.IntegerField(default=0)
    at = models.DateTimeField(null=True)

    class Meta:
        app_label = "contenttypes"


def insert_sql(using: str, rows: int, with_pk: bool = False) -> str:
    query = InsertQuery(Author)
    names = (["id"] if with_pk else []) + ["name", "born", "created", "updated", "token", "rating", "at"]
    objs = [Author(id=-1 - i, name=f"a{i}") for i in range(rows)]
    query.insert_values([Author._meta.get_field(n) for n in names], objs)
    compiler = query.get_compiler(using)
    compiler.returning_fields = [Author._meta.pk]
    return compiler.as_sql()[0][0]


def update_sql(using: str, **values) -> str:
    query = UpdateQuery(Author)
    query.add_update_values(values)
    query.add_q(models.Q(pk=1))
    return query.get_compiler(using).as_sql()[0]


def per_call_us(func, number: int) -> float:
    return min(timeit.repeat(func, number=number, repeat=5)) / number * 1e6


def main() -> None:
    for using, vendor in (("default", "sqlite"), ("pg", "postgresql")):
        session = ClientSession("loadbalancer", vendor)
        insert = Statement(insert_sql(using, 1), ["a", None, 1, 2, 3, 0, None], False,
                           InsertKeys(insert_sql(using, 1, with_pk=True), [], (-1,)))
        stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        update = Statement(update_sql(using, name="x", born=None, created=stamp, updated=stamp,
                                      token=uuid.uuid4(), rating=0), [])
        bulk = Statement(insert_sql(using, 100), [])
        now = Statement(update_sql(using, at=Now()), [])
        print(f"{vendor}: {len(insert.sql)}-char INSERT, {len(update.sql)}-char UPDATE, {len(bulk.sql)}-char bulk INSERT")
        print(f"  update(at=Now()) -> {determinism.rewrite_sql(now.sql, vendor, determinism.Clock(0.0))}")
        verdicts, plans = determinism._VERDICTS[vendor], determinism._PLANS[vendor]
        for label, statement in (("INSERT (create)", insert), ("UPDATE (save)", update),
                                 ("bulk INSERT, 100 rows", bulk), ("update(at=Now())", now)):
            repeat = per_call_us(lambda: session._deterministic(statement), 20000)

            def first() -> None:
                verdicts.clear()
                plans.clear()
                session._deterministic(statement)

            print(f"  {label:24s} repeat {repeat:7.2f} us   first {per_call_us(first, 2000):8.2f} us")


if __name__ == "__main__":
    main()
