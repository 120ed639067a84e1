"""Outages of a SQLite copy: its file moved away under the coordinator, then put back.

SQLite reports a moved file as "attempt to write a readonly database"
(SQLITE_READONLY_DBMOVED) and would create an empty database in its place on
the next open; both must count as the copy being down, not diverged.
"""
from __future__ import annotations

import os

import pytest
from django.db import connections

from tests.testapp.models import Author

pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def move_away():
    moved: list[str] = []

    def move(alias: str) -> str:
        path = str(connections[alias].settings_dict["NAME"])
        connections[alias].close()
        os.rename(path, path + ".away")
        moved.append(path)
        return path

    yield move
    for path in moved:
        if os.path.exists(path + ".away"):
            if os.path.exists(path):
                os.unlink(path)
            os.rename(path + ".away", path)


@pytest.mark.parametrize("alias", ["DB2", "DB1"])   # a follower, then the first database (the leader)
def test_a_moved_file_is_down_not_diverged_and_catches_up_when_it_is_back(coordinator, replicas, move_away,
                                                                         alias):
    Author.objects.create(name="before")
    path = move_away(alias)
    for i in range(10):                       # no write fails: the leader's moves to the next database
        Author.objects.create(name=f"during-{i}")
    coordinator.wait_state(alias, "DOWN", timeout=10)
    assert Author.objects.count() == 11       # reads skip it
    assert not os.path.exists(path), "an empty database was created in place of the moved one"
    os.rename(path + ".away", path)
    coordinator.wait_state(alias, "RUNNING", timeout=20)
    replicas.assert_identical(["testapp_author"])
    assert Author.objects.count() == 11
