"""Load-balanced models in a database that is no copy (Django's multi-db: ``using('other')``).

'other' is a real database outside LOAD_BALANCER['DATABASES'] (an SQLite file, or a database on
one of the suite's PostgreSQL servers): writes there cannot make the copies differ, so they are
Django's plain ones, and the instances' later reads and writes stay there.  The copies themselves
still refuse one-copy writes (tests/test_orm_surface.py, tests/test_models_setting.py).
"""
from __future__ import annotations

from typing import Iterator

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connections

from django_lb_shm import errors
from django_lb_shm.backend.alias import lb_alias
from tests.support.lb import ALIASES, BACKEND, table_rows
from tests.plainlbapp.models import PlainItem
from tests.testapp.models import Author, Book, Tag

OTHER = "other"
LB_TABLES = ["testapp_author", "testapp_book", "testapp_tag", "testapp_book_tags",
             "plainlbapp_plainitem", "plainlbapp_plainitem_tags"]


def _other_settings() -> dict:
    if BACKEND == "postgres":
        server = ALIASES[-1]
        with connections[server].cursor() as cursor:
            cursor.execute("DROP DATABASE IF EXISTS lb_other")
            cursor.execute("CREATE DATABASE lb_other")
        return dict(settings.DATABASES[server], NAME="lb_other")
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(pytest.lb_base / "other.sqlite3")}


@pytest.fixture(scope="module")
def other() -> Iterator[str]:
    entry = _other_settings()
    settings.DATABASES[OTHER] = entry
    configured = connections.configure_settings(
        {DEFAULT_DB_ALIAS: dict(settings.DATABASES[DEFAULT_DB_ALIAS]), OTHER: dict(entry)})
    connections.settings[OTHER] = configured[OTHER]
    call_command("migrate", database=OTHER, verbosity=0, interactive=False)
    try:
        yield OTHER
    finally:
        connections[OTHER].close()
        del connections[OTHER]
        del connections.settings[OTHER]
        del settings.DATABASES[OTHER]
        if BACKEND == "postgres":
            with connections[ALIASES[-1]].cursor() as cursor:
                cursor.execute("DROP DATABASE IF EXISTS lb_other")


@pytest.fixture
def empty_other(other: str, replicas) -> str:
    with connections[other].cursor() as cursor:
        for table in ["testapp_book_tags", "testapp_book", "testapp_tag", "testapp_author",
                      "plainlbapp_plainitem_tags", "plainlbapp_plainitem"]:
            cursor.execute(f'DELETE FROM "{table}"')
    return other


def copies_untouched(replicas) -> None:
    replicas.assert_identical()
    for table in LB_TABLES:
        assert all(rows == [] for rows in replicas.rows(table).values()), table


def test_a_load_balancer_model_writes_and_reads_a_database_that_is_no_copy(empty_other, replicas):
    ann = Author.objects.using(OTHER).create(name="Ann")
    book = Book.objects.using(OTHER).create(title="Dune", author=ann)
    book.tags.add(Tag.objects.using(OTHER).create(label="sf"))        # the m2m rows follow the instance
    book.title = "Dune II"
    book.save()                                                       # no using=: where it was read from
    Book.objects.using(OTHER).filter(pk=book.pk).update(pages=7)
    Author.objects.using(OTHER).get_or_create(name="Bob")

    fetched = Book.objects.using(OTHER).get(pk=book.pk)
    assert (fetched.title, fetched.pages) == ("Dune II", 7)
    assert fetched.author._state.db == OTHER and fetched.author.name == "Ann"
    assert [t.label for t in fetched.tags.all()] == ["sf"]
    assert [b.title for b in Author.objects.using(OTHER).get(name="Ann").books.all()] == ["Dune II"]
    assert len(table_rows(OTHER, "testapp_book_tags")) == 1
    copies_untouched(replicas)

    Author.objects.using(OTHER).get(name="Bob").delete()
    ann.delete()                                                      # cascades on 'other' only
    assert table_rows(OTHER, "testapp_author") == [] and table_rows(OTHER, "testapp_book") == []
    copies_untouched(replicas)


def test_a_models_setting_model_writes_and_reads_a_database_that_is_no_copy(empty_other, replicas):
    item = PlainItem.objects.using(OTHER).create(name="bolt", qty=1)
    item.tags.add(Tag.objects.using(OTHER).create(label="metal"))
    item.qty = 2
    item.save()
    PlainItem.objects.using(OTHER).bulk_create([PlainItem(name="nut")])

    assert [(i.name, i.qty) for i in PlainItem.objects.using(OTHER).all()] == [("bolt", 2), ("nut", 0)]
    assert [t.label for t in PlainItem.objects.using(OTHER).get(name="bolt").tags.all()] == ["metal"]
    copies_untouched(replicas)
    item.delete()
    assert [row[1] for row in table_rows(OTHER, "plainlbapp_plainitem")] == ["nut"]
    copies_untouched(replicas)


def test_the_copies_still_refuse_one_copy_writes_and_the_load_balancer_still_serves(empty_other, replicas):
    on_other = Author.objects.using(OTHER).create(name="Ann")
    with pytest.raises(errors.NotSupportedError, match=r"using='DB1' would write to one copy only"):
        on_other.save(using="DB1")
    with pytest.raises(errors.NotSupportedError, match=r"PlainItem.save_base\(\) with using='DB2'"):
        PlainItem(name="x").save(using="DB2")
    on_lb = Author.objects.create(name="Ann")                          # same name: another database
    assert on_lb._state.db == lb_alias()
    replicas.assert_identical()
    assert all([row[1] for row in rows] == ["Ann"] for rows in replicas.rows("testapp_author").values())
    assert [row[1] for row in table_rows(OTHER, "testapp_author")] == ["Ann"]
