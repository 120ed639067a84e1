"""Issue 19 (part B): plain ``transaction.atomic()`` on 'default' carries the load-balanced writes
inside it (LOAD_BALANCER['PLAIN_ATOMIC'] = 'JOIN', the default), and 'default''s query count sees them.

Real coordinator, real databases (the suite's SQLite files or PostgreSQL servers).
"""
from __future__ import annotations

import time
import warnings

import pytest
from django.conf import settings
from django.core.handlers.base import BaseHandler
from django.db import IntegrityError, connection, connections, transaction
from django.http import HttpResponse
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.settings.validation import find_problems
from django_lb_shm.errors import TransactionError
from django_lb_shm.transactions import LoadBalancerTransactionWarning
from tests.support.lb import ALIASES, Replicas
from tests.support.waiting import names_on_alias
from tests.test_testing import RUNNER, run_django_tests
from tests.testapp.models import Author, Book, Note, Tag


class Boom(Exception):
    pass


def names(alias: str = "DB2") -> list:
    return sorted(names_on_alias(alias))


def notes() -> list:
    return sorted(Note.objects.values_list("text", flat=True))


@pytest.fixture(autouse=True)
def no_notes():
    Note.objects.all().delete()   # on 'default' only: not a load-balanced table
    yield
    Note.objects.all().delete()


def lb_open() -> bool:
    """The load-balanced connection holds a transaction on the coordinator."""
    session = connections[lb_alias()].connection
    return bool(session is not None and session.transaction_open)


def test_commit_applies_the_block_on_every_copy(replicas):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadBalancerTransactionWarning)
        with transaction.atomic():
            author = Author.objects.create(name="Ann")
            Book.objects.create(title="one", author=author)
            assert connections[lb_alias()].in_atomic_block and lb_open()
            assert Book.objects.filter(author=author).count() == 1   # reads its own writes
    assert not connections[lb_alias()].in_atomic_block and not lb_open()
    replicas.assert_identical()
    assert all(names(alias) == ["Ann"] for alias in ALIASES)
    assert len(replicas.rows("testapp_book")["DB1"]) == 1


def test_an_exception_rolls_back_the_load_balanced_writes(replicas):
    Author.objects.create(name="kept")
    with pytest.raises(Boom):
        with transaction.atomic():
            Author.objects.create(name="gone")
            Author.objects.filter(name="kept").update(rating=5)
            raise Boom
    replicas.assert_identical()
    assert all(names(alias) == ["kept"] for alias in ALIASES)
    assert Author.objects.get(name="kept").rating == 0


def test_set_rollback_rolls_back_both(replicas):
    with transaction.atomic():
        Author.objects.create(name="gone")
        Note.objects.create(author_id=1, text="gone")
        transaction.set_rollback(True)
    replicas.assert_identical()
    assert names() == [] and notes() == []


def test_set_rollback_on_the_load_balanced_alias_rolls_back_default_too(replicas):
    with transaction.atomic():
        Author.objects.create(name="gone")
        Note.objects.create(author_id=1, text="gone")
        transaction.set_rollback(True, using=lb_alias())
    replicas.assert_identical()
    assert names() == [] and notes() == []


def test_nested_blocks_are_savepoints_rolled_back_partially(replicas):
    @transaction.atomic
    def work():
        Author.objects.create(name="outer")
        try:
            with transaction.atomic():
                Author.objects.create(name="inner")
                Author.objects.create(name="outer")   # unique violation inside the savepoint
        except IntegrityError:
            pass
        try:
            with transaction.atomic(using="default"):
                Tag.objects.create(label="t-gone")
                Note.objects.create(author_id=1, text="gone")
                raise Boom
        except Boom:
            pass
        with transaction.atomic():
            Tag.objects.create(label="t-kept")
        Author.objects.create(name="after")

    work()
    replicas.assert_identical()
    assert all(names(alias) == ["after", "outer"] for alias in ALIASES)
    assert [r[1] for r in replicas.rows("testapp_tag")["DB2"]] == ["t-kept"]
    assert notes() == []


def test_on_commit_callbacks_run_once_after_the_commit(replicas):
    calls: list = []
    with transaction.atomic():
        Author.objects.create(name="Ann")
        transaction.on_commit(lambda: calls.append(("default", names("DB1"))))
        transaction.on_commit(lambda: calls.append(("lb", names("DB1"))), using=lb_alias())
        with transaction.atomic():
            transaction.on_commit(lambda: calls.append(("nested", None)))
        assert calls == []
    assert sorted(c[0] for c in calls) == ["default", "lb", "nested"]
    assert dict(calls)["default"] == ["Ann"] and dict(calls)["lb"] == ["Ann"]   # after the commit
    with pytest.raises(Boom):
        with transaction.atomic():
            Author.objects.create(name="Bob")
            transaction.on_commit(lambda: calls.append("rolled back"))
            transaction.on_commit(lambda: calls.append("rolled back"), using=lb_alias())
            raise Boom
    assert len(calls) == 3


def test_durable_blocks(replicas):
    with transaction.atomic(durable=True):
        Author.objects.create(name="durable")
    with django_lb_shm.atomic():
        with pytest.raises(RuntimeError, match="durable"):
            with transaction.atomic(durable=True):   # the load-balanced side is nested: refused
                pass
        assert not connections["default"].in_atomic_block
        Author.objects.create(name="outer lb")
    with transaction.atomic():
        with pytest.raises(RuntimeError, match="durable"):
            with transaction.atomic(durable=True):
                pass
        with pytest.raises(RuntimeError, match="durable"):
            with django_lb_shm.atomic(durable=True):   # its writes would commit with the plain block
                pass
    replicas.assert_identical()
    assert names() == ["durable", "outer lb"]
    assert not connections["default"].in_atomic_block and not connections[lb_alias()].in_atomic_block


def test_mixed_with_django_lb_shm_atomic(replicas):
    with transaction.atomic():
        Author.objects.create(name="plain")
        try:
            with django_lb_shm.atomic():   # a savepoint of the plain block's load-balanced part
                Author.objects.create(name="explicit-gone")
                raise Boom
        except Boom:
            pass
        with django_lb_shm.atomic():
            Author.objects.create(name="explicit")
    with pytest.raises(Boom):
        with django_lb_shm.atomic():
            Author.objects.create(name="outer-gone")
            with transaction.atomic():     # its load-balanced part is a savepoint of the outer block
                Author.objects.create(name="inner-gone")
            raise Boom
    replicas.assert_identical()
    assert all(names(alias) == ["explicit", "plain"] for alias in ALIASES)


def test_a_plain_model_and_a_load_balanced_write_roll_back_together(replicas):
    with pytest.raises(Boom):
        with transaction.atomic():
            author = Author.objects.create(name="gone")
            Note.objects.create(author=author, text="gone")
            raise Boom
    replicas.assert_identical()
    assert names() == [] and notes() == []
    with transaction.atomic():
        author = Author.objects.create(name="kept")
        Note.objects.create(author=author, text="kept")
    replicas.assert_identical()
    assert all(names(alias) == ["kept"] for alias in ALIASES) and notes() == ["kept"]


def test_select_for_update_inside_a_plain_block(replicas):
    author = Author.objects.create(name="locked")
    with transaction.atomic():   # before: TransactionManagementError on PostgreSQL (the alias was in autocommit)
        locked = Author.objects.select_for_update().get(pk=author.pk)
        locked.rating = 7
        locked.save()
    replicas.assert_identical()
    assert Author.objects.get(pk=author.pk).rating == 7


def test_a_read_only_block_opens_nothing_on_the_coordinator(coordinator):
    Author.objects.create(name="r")
    before = coordinator.status()["coordinator"]["last_seq"]
    with transaction.atomic():
        assert Author.objects.count() == 1
        assert not lb_open()
    assert coordinator.status()["coordinator"]["last_seq"] == before
    assert not coordinator.status()["coordinator"]["write_order"]["held"]


def test_atomic_requests(replicas):
    def view(request):
        Author.objects.create(name=f"request-{request}")
        if request == "fail":
            raise Boom
        return HttpResponse("ok")

    default = connections["default"]
    default.settings_dict["ATOMIC_REQUESTS"] = True
    try:
        atomic_view = BaseHandler().make_view_atomic(view)
        assert atomic_view("ok").status_code == 200
        with pytest.raises(Boom):
            atomic_view("fail")
    finally:
        default.settings_dict["ATOMIC_REQUESTS"] = False
    replicas.assert_identical()
    assert names() == ["request-ok"]


def test_a_broken_load_balanced_part_rolls_default_back_and_raises(lb_factory):
    handle = lb_factory("plain-idle", TRANSACTION_HOLD_TIMEOUT=1, CLIENT_TIMEOUT=20)
    with pytest.raises(TransactionError, match="TRANSACTION_HOLD_TIMEOUT"):
        with transaction.atomic():
            author = Author.objects.create(name="idle")
            Note.objects.create(author=author, text="idle")
            time.sleep(1.8)   # the coordinator ends the idle transaction; the commit finds out
    assert not connections["default"].in_atomic_block and not connections[lb_alias()].in_atomic_block
    assert notes() == []
    Replicas(handle).assert_identical(["testapp_author"])
    assert names() == []
    Author.objects.create(name="next")   # the connection works again
    assert names("DB1") == ["next"]


def test_when_the_default_commit_fails_the_load_balanced_part_stays_committed(replicas):
    """The documented order: load-balanced first.  A deferred foreign key on 'default' (Django makes
    them DEFERRABLE INITIALLY DEFERRED on SQLite and PostgreSQL) fails only at 'default''s COMMIT."""
    from django.contrib.auth.models import User

    membership = User.groups.through
    with pytest.raises(IntegrityError) as raised:
        with transaction.atomic():
            Author.objects.create(name="committed first")
            membership.objects.create(user_id=987654, group_id=987654)   # no such user nor group
    assert any("committed on every copy" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert not membership.objects.exists()
    replicas.assert_identical()
    assert all(names(alias) == ["committed first"] for alias in ALIASES)


def test_autocommit_mode_gives_the_old_behaviour_with_its_warning(replicas):
    with override_settings(LOAD_BALANCER={**settings.LOAD_BALANCER, "PLAIN_ATOMIC": "AUTOCOMMIT"}):
        with pytest.raises(Boom):
            with transaction.atomic():
                with pytest.warns(LoadBalancerTransactionWarning, match="PLAIN_ATOMIC"):
                    Author.objects.create(name="at once")
                assert not connections[lb_alias()].in_atomic_block
                raise Boom
    replicas.assert_identical()
    assert all(names(alias) == ["at once"] for alias in ALIASES)


def test_other_aliases_keep_the_warning(replicas):
    with pytest.warns(LoadBalancerTransactionWarning, match="'DB2'"):
        with transaction.atomic(using="DB2"):
            Author.objects.create(name="at once")
    replicas.assert_identical()


def test_the_setting_is_checked():
    def ids(**lb):
        raw = {**settings.LOAD_BALANCER, **lb}
        return {p.id for p in find_problems(raw, settings.DATABASES)}

    assert "django_lb_shm.E043" in ids(PLAIN_ATOMIC="sometimes")
    assert not {"django_lb_shm.E043", "django_lb_shm.W042"} & ids(PLAIN_ATOMIC="AUTOCOMMIT", WRITE_ACK="ALL")
    sqlite = connection.vendor == "sqlite"
    assert ("django_lb_shm.W042" in ids(WRITE_ACK="ALL")) == sqlite
    assert "django_lb_shm.W042" not in ids()
    assert "django_lb_shm.E044" in ids(COUNT_QUERIES_ON_DEFAULT=True)
    assert "django_lb_shm.E044" not in ids(COUNT_QUERIES_ON_DEFAULT="NEVER")


# -- one rollback flag for the pair (Django's transactions tests) ----------------------------------------
def test_an_error_in_the_twin_marks_default_and_set_rollback_false_on_default_fixes_both(replicas):
    Author.objects.create(name="Ann")
    with transaction.atomic():
        with pytest.raises(IntegrityError):
            Author.objects.create(name="Ann")   # in the twin, inside no savepoint
        assert transaction.get_rollback() is True and connection.needs_rollback is True
        if connections[lb_alias()].features.atomic_transactions:   # PostgreSQL: the transaction is lost
            with pytest.raises(transaction.TransactionManagementError):
                Note.objects.create(author_id=1, text="refused")   # 'default' refuses as well
            return
        transaction.set_rollback(False)
        assert connections[lb_alias()].get_rollback() is False
        Author.objects.filter(name="Ann").update(rating=7)
        Note.objects.create(author_id=1, text="kept")
    replicas.assert_identical()
    assert Author.objects.get(name="Ann").rating == 7 and notes() == ["kept"]


def test_a_broken_default_transaction_refuses_load_balanced_queries(replicas):
    from django.db import DatabaseError

    with transaction.atomic():
        Author.objects.create(name="gone")
        with pytest.raises(DatabaseError):
            with transaction.atomic(savepoint=False):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT no_such_column FROM testapp_note")
        assert connections[lb_alias()].get_rollback() is True
        with pytest.raises(transaction.TransactionManagementError, match="until the end of the 'atomic' block"):
            Author.objects.count()
        with pytest.raises(transaction.TransactionManagementError):
            Author.objects.create(name="refused")
    Author.objects.create(name="after")   # the flag is reset with the block
    replicas.assert_identical()
    assert names() == ["after"]


def test_a_failed_savepoint_release_on_default_refuses_load_balanced_queries(replicas):
    from django.db import DatabaseError

    if not connection.features.can_release_savepoints:
        pytest.skip("the database does not release savepoints")
    with transaction.atomic():
        with pytest.raises(DatabaseError):
            with transaction.atomic():
                Author.objects.create(name="gone")
                connection.savepoint_ids.append("12")   # Django's test: a bad savepoint id on 'default'
        with pytest.raises(transaction.TransactionManagementError):
            len(Author.objects.all())
        assert connection.needs_rollback is True
        connection.savepoint_ids.pop()
    replicas.assert_identical()
    assert names() == []


def test_mark_for_rollback_on_error_on_default_marks_the_twin(replicas):
    with transaction.atomic(savepoint=False):
        with pytest.raises(Boom):
            with transaction.mark_for_rollback_on_error():
                assert connections[lb_alias()].get_rollback() is False
                raise Boom
        assert connections[lb_alias()].get_rollback() is True
        with pytest.raises(transaction.TransactionManagementError):
            Author.objects.create(name="refused")
    Author.objects.create(name="after")
    replicas.assert_identical()
    assert names() == ["after"]


def test_merged_blocks_share_the_flag_and_the_rollback(replicas):
    with transaction.atomic():
        Author.objects.create(name="one")
        with transaction.atomic():
            Author.objects.create(name="two")
            with pytest.raises(Boom):
                with transaction.atomic(savepoint=False):
                    Author.objects.create(name="three")
                    raise Boom
            assert transaction.get_rollback() is True
            assert transaction.get_rollback(using=lb_alias()) is True
            transaction.set_rollback(False, using=lb_alias())
            assert transaction.get_rollback() is False
            assert Author.objects.count() == 3   # read inside the load-balanced transaction
            assert not transaction.get_autocommit() and not transaction.get_autocommit(using=lb_alias())
            with pytest.raises(transaction.TransactionManagementError, match="forbidden"):
                transaction.set_autocommit(True, using=lb_alias())
            transaction.set_rollback(True)
        assert Author.objects.count() == 1       # the savepoint of the middle block rolled back
    replicas.assert_identical()
    assert all(names(alias) == ["one"] for alias in ALIASES)
    assert not connections[lb_alias()].needs_rollback and not connection.needs_rollback


def test_transaction_savepoints_on_default_include_the_load_balanced_writes(replicas):
    with transaction.atomic():
        Author.objects.create(name="kept")
        sid = transaction.savepoint()
        Author.objects.create(name="gone")
        Note.objects.create(author_id=1, text="gone")
        transaction.savepoint_rollback(sid)
        assert Author.objects.count() == 1
        sid = transaction.savepoint()
        Author.objects.create(name="kept too")
        transaction.savepoint_commit(sid)
    replicas.assert_identical()
    assert all(names(alias) == ["kept", "kept too"] for alias in ALIASES) and notes() == []


# -- query counting ----------------------------------------------------------------------------------------
@pytest.fixture
def counted_on_default():
    """COUNT_QUERIES_ON_DEFAULT 'ALWAYS': this pytest process is not under LoadBalancerTestRunner."""
    with override_settings(LOAD_BALANCER={**settings.LOAD_BALANCER, "COUNT_QUERIES_ON_DEFAULT": "ALWAYS"}):
        yield


def test_capture_queries_on_default_sees_the_load_balanced_statements(coordinator, counted_on_default):
    with CaptureQueriesContext(connection) as default_queries:
        with CaptureQueriesContext(connections[lb_alias()]) as lb_queries:
            with transaction.atomic():
                Author.objects.create(name="counted")
                list(Author.objects.filter(name="counted"))
                with transaction.atomic():
                    Author.objects.filter(name="counted").update(rating=1)
    # 'default' logs its own BEGIN and COMMIT, as Django does for a model on 'default'.
    statements = [q["sql"].split()[0] for q in default_queries.captured_queries]
    assert statements == ["BEGIN", "INSERT", "SELECT", "SAVEPOINT", "UPDATE", "RELEASE", "COMMIT"], statements
    marked = [q["sql"].split()[0] for q in default_queries.captured_queries if q.get("alias") == lb_alias()]
    assert marked == ["INSERT", "SELECT", "UPDATE"]   # the copies, told apart from 'default''s own
    # Its own log keeps its twin savepoints and its COMMIT (and BEGIN, where the vendor's wrapper logs one).
    own = [q["sql"].split()[0] for q in lb_queries.captured_queries]
    assert [s for s in own if s != "BEGIN"] == ["INSERT", "SELECT", "SAVEPOINT", "UPDATE", "RELEASE", "COMMIT"], own
    connections[lb_alias()].queries_log.clear()
    with CaptureQueriesContext(connection) as only_default:
        Author.objects.count()
    assert len(only_default) == 1
    assert not connections[lb_alias()].queries_log   # no log of its own while only 'default' counts


def test_outside_the_test_runner_default_counts_its_own_queries_only(coordinator):
    with CaptureQueriesContext(connection) as default_queries:
        Author.objects.create(name="not counted")
        assert Author.objects.count() == 1
    assert default_queries.captured_queries == []


def test_a_django_testcase_counts_the_load_balanced_queries_under_the_runner(coordinator):
    result = run_django_tests(coordinator.env(), RUNNER, ["tests.support.django_testcases.PlainAtomicTestCase",
                                                          "tests.support.django_testcases.PlainAtomicTransactionTestCase"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 5 tests" in result.stderr and "OK" in result.stderr, result.stderr
