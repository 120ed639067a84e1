"""Fixtures: ``loaddata`` and ``dumpdata`` through the load-balanced alias (every copy, one order)."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.errors import NotSupportedError
from tests.testapp.models import Author, Book, Tag

FIXTURE = [
    {"model": "testapp.author", "pk": 40, "fields": {"name": "Ann", "created": "2026-01-01T00:00:00Z",
                                                    "updated": "2026-01-01T00:00:00Z",
                                                    "token": "00000000-0000-0000-0000-000000000040"}},
    {"model": "testapp.author", "pk": 41, "fields": {"name": "Bob", "created": "2026-01-01T00:00:00Z",
                                                    "updated": "2026-01-01T00:00:00Z",
                                                    "token": "00000000-0000-0000-0000-000000000041"}},
    {"model": "testapp.tag", "pk": 7, "fields": {"label": "poetry"}},
    {"model": "testapp.book", "pk": 90, "fields": {"title": "Verses", "author": 40, "tags": [7],
                                                  "published": "2026-01-02"}},
]


@pytest.fixture
def fixture_file(tmp_path):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(FIXTURE))
    return str(path)


def test_loaddata_through_the_load_balanced_alias_reaches_every_copy(coordinator, replicas, fixture_file):
    out = io.StringIO()
    call_command("loaddata", fixture_file, database=lb_alias(), stdout=out)
    assert "Installed 4 object(s)" in out.getvalue()
    replicas.assert_identical()
    assert list(Author.objects.values_list("pk", "name")) == [(40, "Ann"), (41, "Bob")]
    assert list(Book.objects.get(pk=90).tags.values_list("label", flat=True)) == ["poetry"]
    # The keys the databases generate next do not collide with the fixture's
    # (PostgreSQL: loaddata's sequence reset ran on every copy, in the write order).
    later = Author.objects.create(name="Cid")
    assert later.pk > 41
    Tag.objects.create(label="prose")
    replicas.assert_identical()


def test_dumpdata_through_the_load_balanced_alias(coordinator, fixture_file):
    call_command("loaddata", fixture_file, database=lb_alias(), stdout=io.StringIO())
    out = io.StringIO()
    call_command("dumpdata", "testapp.author", database=lb_alias(), stdout=out)
    assert [row["pk"] for row in json.loads(out.getvalue())] == [40, 41]


def test_loaddata_into_one_real_database_is_refused_with_the_way_that_works(coordinator, replicas, fixture_file):
    with pytest.raises(NotSupportedError, match=rf"loaddata <fixture> --database {lb_alias()}"):
        call_command("loaddata", fixture_file, stdout=io.StringIO())
    replicas.assert_identical()
    assert Author.objects.count() == 0


@pytest.mark.parametrize("reset_sequences", [False, True])
def test_flush_through_the_load_balanced_alias_empties_every_copy(coordinator, replicas, fixture_file,
                                                                   reset_sequences):
    from django.contrib.auth.models import Group

    call_command("loaddata", fixture_file, database=lb_alias(), stdout=io.StringIO())
    Group.objects.create(name="not load-balanced")   # on 'default' directly: flush leaves it
    try:
        call_command("flush", database=lb_alias(), interactive=False, reset_sequences=reset_sequences,
                     stdout=io.StringIO())
        replicas.assert_identical()
        assert Author.objects.count() == Book.objects.count() == Tag.objects.count() == 0
        assert Group.objects.filter(name="not load-balanced").exists()
        first = Author.objects.create(name="again")
        assert first.pk == 1 if reset_sequences else first.pk > 41
        replicas.assert_identical()
    finally:
        Group.objects.all().delete()
