"""Design invariants 1 and 2: one write order; identical rows and keys everywhere."""
import multiprocessing

import pytest
from django.db import IntegrityError

from tests.support.lb import ALIASES
from tests.support.workers import insert_authors
from tests.testapp.models import Author


def test_create_reaches_every_database_with_the_same_key(replicas):
    author = Author.objects.create(name="Ann")
    replicas.assert_identical(["testapp_author"])
    rows = replicas.rows("testapp_author")
    assert [r[0] for r in rows["DB2"]] == [author.pk]


def test_python_side_defaults_are_identical(replicas):
    # auto_now_add, auto_now and default=uuid4 are computed once, in the app process
    Author.objects.create(name="Bob")
    Author.objects.bulk_create([Author(name=f"bulk{i}") for i in range(20)])
    replicas.assert_identical(["testapp_author"])


def test_rejected_write_is_applied_nowhere(replicas):
    Author.objects.create(name="Ann")
    with pytest.raises(IntegrityError):
        Author.objects.create(name="Ann")
    Author.objects.create(name="Cid")
    replicas.assert_identical(["testapp_author"])
    assert sorted(r[1] for r in replicas.rows("testapp_author")["DB1"]) == ["Ann", "Cid"]


def test_concurrent_writers_get_identical_keys(replicas):
    import os

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=insert_authors, args=(os.environ["LB_TEST_CONFIG"], f"p{n}", 25)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    replicas.assert_identical(["testapp_author"])
    assert len(replicas.rows("testapp_author")["default"]) == 100


def test_read_after_acknowledged_write_sees_it(coordinator):
    for i in range(30):
        author = Author.objects.create(name=f"ryw{i}")
        # round robin sends consecutive reads to different databases
        for _ in range(len(ALIASES)):
            assert Author.objects.filter(pk=author.pk).exists()


def _has_author(alias, pk):
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM testapp_author WHERE id = %s", [pk])
        return cursor.fetchone()[0] == 1


@pytest.mark.parametrize("policy, at_least", [("ALL", 3), ("QUORUM", 2)])
def test_write_ack_policy_waits_for_enough_databases(lb_factory, policy, at_least):
    lb_factory(f"ack-{policy.lower()}", WRITE_ACK=policy)
    for i in range(15):
        author = Author.objects.create(name=f"ack{i}")
        # read each copy directly, the moment the write is acknowledged
        assert sum(_has_author(alias, author.pk) for alias in ALIASES) >= at_least
