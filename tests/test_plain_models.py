"""A model that is not load-balanced next to load-balanced ones (tests.testapp.models.Note:
on 'default', pointing at Author rows the way system check E024 allows)."""
from __future__ import annotations

from django.db import connections

from tests.support.lb import ALIASES
from tests.testapp.models import Author, Note


def notes_on(alias: str) -> list[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT text FROM testapp_note ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


def test_a_plain_model_pointing_at_load_balanced_rows_stays_on_default(coordinator, replicas):
    author = Author.objects.create(name="Ann")
    note = Note(text="first")
    note.author = author          # the load-balanced instance must not pull the note to the virtual alias
    note.save()
    Note.objects.create(author=author, text="second")
    assert notes_on("default") == ["first", "second"]
    assert all(notes_on(alias) == [] for alias in ALIASES if alias != "default")
    # Reads of the plain model through the load-balanced instance go to 'default' every time.
    assert [sorted(author.notes.values_list("text", flat=True)) for _ in range(6)] == [["first", "second"]] * 6
    assert Note.objects.get(text="first").author == author    # and back, through the load balancer
    author.delete()               # DO_NOTHING: the notes stay, pointing at nothing
    assert notes_on("default") == ["first", "second"]
    replicas.assert_identical()
