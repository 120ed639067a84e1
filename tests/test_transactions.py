"""Issue 8: an atomic block of LoadBalancerModel writes is applied as one unit on every database."""
from __future__ import annotations

import multiprocessing
import os
import warnings

import pytest
from django.conf import settings
from django.db import IntegrityError, transaction
from django.test import override_settings

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.transactions import LoadBalancerTransactionWarning
from tests.support.workers import atomic_blocks, insert_authors
from tests.testapp.models import Author, Book, Tag


def test_committed_block_reaches_every_database(replicas):
    with django_lb_shm.atomic():
        author = Author.objects.create(name="Ann")
        Book.objects.create(title="one", author=author)
        Book.objects.create(title="two", author=author)
        # reads inside the block see the block's own writes
        assert Book.objects.filter(author=author).count() == 2
    replicas.assert_identical()
    assert len(replicas.rows("testapp_book")["DB2"]) == 2


def test_block_that_raises_applies_nothing_anywhere(replicas):
    Author.objects.create(name="kept")
    with pytest.raises(RuntimeError):
        with transaction.atomic(using=lb_alias()):
            Author.objects.create(name="gone1")
            Author.objects.filter(name="kept").update(rating=99)
            raise RuntimeError("boom")
    replicas.assert_identical()
    rows = replicas.rows("testapp_author")
    assert [(r[1], r[-1]) for r in rows["DB1"]] == [("kept", 0)]


def test_nested_block_rolls_back_like_django(replicas):
    with django_lb_shm.atomic():
        Author.objects.create(name="outer")
        try:
            with django_lb_shm.atomic():
                Author.objects.create(name="inner")
                Author.objects.create(name="outer")  # unique violation inside the savepoint
        except IntegrityError:
            pass
        Author.objects.create(name="after")
    replicas.assert_identical()
    assert sorted(r[1] for r in replicas.rows("testapp_author")["DB2"]) == ["after", "outer"]


def test_savepoint_before_the_first_write_and_decorator_form(replicas):
    @django_lb_shm.atomic
    def work():
        with django_lb_shm.atomic():  # savepoint before the transaction reached the coordinator
            Tag.objects.create(label="t1")
        try:
            with django_lb_shm.atomic():
                Tag.objects.create(label="t2")
                raise ValueError
        except ValueError:
            pass

    work()
    replicas.assert_identical()
    assert [r[1] for r in replicas.rows("testapp_tag")["default"]] == ["t1"]


def test_read_only_block_takes_no_write_order(coordinator):
    Author.objects.create(name="r")
    with django_lb_shm.atomic():
        assert Author.objects.count() == 1
    # a write from another process is not blocked by it
    before = coordinator.status()["coordinator"]["last_seq"]
    Author.objects.create(name="s")
    assert coordinator.status()["coordinator"]["last_seq"] == before + 1


def test_blocks_racing_with_other_writers_leave_replicas_identical(replicas):
    ctx = multiprocessing.get_context("spawn")
    settings_json = os.environ["LB_TEST_CONFIG"]
    procs = [ctx.Process(target=atomic_blocks, args=(settings_json, f"blk{n}", 15)) for n in range(2)]
    procs += [ctx.Process(target=insert_authors, args=(settings_json, f"auto{n}", 20)) for n in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    replicas.assert_identical()
    rows = replicas.rows("testapp_author")["DB1"]
    assert len(rows) == 2 * 15 + 2 * 20
    # each committed block's rows are all there; rolled-back ones nowhere
    assert not [r for r in rows if r[1].endswith("-rolled-back")]


def test_plain_atomic_on_default_includes_the_write_without_a_warning(replicas):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with transaction.atomic():  # 'default': its load-balanced twin carries the write (PLAIN_ATOMIC 'JOIN')
            Author.objects.create(name="inside")
    assert not [w for w in caught if issubclass(w.category, LoadBalancerTransactionWarning)]
    replicas.assert_identical()


def test_plain_atomic_in_autocommit_mode_warns_that_it_cannot_include_the_write(replicas):
    with override_settings(LOAD_BALANCER={**settings.LOAD_BALANCER, "PLAIN_ATOMIC": "AUTOCOMMIT"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with transaction.atomic():  # 'default', not the load-balanced alias
                Author.objects.create(name="outside")
    assert any(issubclass(w.category, LoadBalancerTransactionWarning) for w in caught)
    replicas.assert_identical()


@pytest.mark.postgres_only
def test_select_for_update_inside_a_block(replicas):
    author = Author.objects.create(name="locked")
    with django_lb_shm.atomic():
        locked = Author.objects.select_for_update().get(pk=author.pk)
        locked.rating = 7
        locked.save()
    replicas.assert_identical()
    assert Author.objects.get(pk=author.pk).rating == 7


@pytest.mark.postgres_only
def test_block_while_a_database_is_down_arrives_whole(coordinator, replicas):
    server = pytest.lb_pg_cluster.servers[2]  # DB2
    server.stop(mode="immediate")
    try:
        with django_lb_shm.atomic():
            author = Author.objects.create(name="during")
            for i in range(5):
                Book.objects.create(title=f"b{i}", author=author)
        coordinator.wait_state("DB2", "DOWN", timeout=10)
    finally:
        server.start()
    coordinator.wait_state("DB2", "RUNNING", timeout=20)
    replicas.assert_identical()
    assert len(replicas.rows("testapp_book")["DB2"]) == 5


def test_foreign_key_failing_at_commit_is_an_integrity_error(replicas):
    # Django's foreign keys are checked at COMMIT (deferred): plain Django raises IntegrityError there too
    with pytest.raises(IntegrityError):
        with django_lb_shm.atomic():
            Book.objects.create(author_id=10**9, title="orphan")
    Author.objects.create(name="still-writable")  # the write order was given back
    replicas.assert_identical()
    assert replicas.rows("testapp_book")["DB1"] == []
