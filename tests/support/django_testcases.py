"""Django test cases run by ``manage.py test`` in tests/test_testing.py (not collected by pytest).

They use the test app's load-balanced models the way a project's own tests would.
"""
import os
import socket
import time

from django.db import connections
from django.test import SimpleTestCase, TestCase, TransactionTestCase
from django.test.testcases import DatabaseOperationForbidden

from tests.support.lb import ALIASES
from tests.support.waiting import names_on_alias, wait_until
from tests.testapp.models import Author


class LoadBalancedTestCase(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.author = Author.objects.create(name="set up")

    def test_sees_its_set_up_data_and_its_own_writes(self):
        Author.objects.create(name="one")
        self.assertEqual(sorted(Author.objects.values_list("name", flat=True)), ["one", "set up"])

    def test_each_test_starts_from_the_set_up_data(self):
        Author.objects.filter(pk=self.author.pk).update(name="renamed")
        self.assertEqual(list(Author.objects.values_list("name", flat=True)), ["renamed"])

    def test_and_again(self):
        self.assertEqual(list(Author.objects.values_list("name", flat=True)), ["set up"])


class LoadBalancedTransactionTestCase(TransactionTestCase):
    databases = "__all__"

    def test_a_write_reaches_every_test_database(self):
        Author.objects.create(name="everywhere")

        def names() -> dict:
            return {alias: names_on_alias(alias) for alias in ALIASES}

        wait_until(lambda: names() == {alias: ["everywhere"] for alias in ALIASES}, 20,
                   "the write on every test database", describe=names)
        for alias in ALIASES:  # and they are the test databases, not the real ones
            self.assertIn("test", str(connections[alias].settings_dict["NAME"]))


class SerializedRollbackTestCase(TransactionTestCase):
    serialized_rollback = True

    def test_runs_with_serialized_rollback(self):
        Author.objects.create(name="serialized")
        self.assertEqual(Author.objects.filter(name="serialized").count(), 1)


class NoDatabaseTestCase(SimpleTestCase):
    def test_a_simple_test_case_still_may_not_query(self):
        with self.assertRaises(DatabaseOperationForbidden):
            Author.objects.count()


class NoMetricsTestCase(TestCase):
    """Run by tests/test_metrics.py with LOAD_BALANCER['METRICS'] set to LB_TEST_METRICS_PORT (the runner
    takes METRICS out of this process's settings too)."""

    def test_the_test_coordinator_serves_no_metrics(self):
        Author.objects.create(name="the test coordinator is up")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(os.environ["LB_TEST_METRICS_PORT"])), timeout=5).close()


class SlowTestCase(TestCase):
    """Run alone, by label: gives a test a moment to kill the test process."""

    def test_waits(self):
        Author.objects.create(name="waiting")
        time.sleep(float(os.environ.get("LB_SLOW_TEST_SECONDS", "0")))


class PlainAtomicTestCase(TestCase):
    """Run by tests/test_plain_atomic.py: 'default''s query count sees the load-balanced statements, and
    plain transaction.atomic() blocks work inside the runner's per-test load-balanced transaction."""

    def test_assert_num_queries_on_default(self):
        from django_lb_shm.backend.alias import lb_alias

        # The runner's transaction on the load-balanced alias (class and test), and no twin of 'default''s.
        blocks = connections[lb_alias()].atomic_blocks
        self.assertEqual([block._from_testcase for block in blocks], [True, True])
        with self.assertNumQueries(2):
            Author.objects.create(name="counted")
            self.assertEqual(Author.objects.count(), 1)

    def test_capture_queries_context_on_default(self):
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as queries:
            list(Author.objects.filter(name="x"))
        self.assertEqual(len(queries), 1)
        self.assertIn("testapp_author", queries[0]["sql"])

    def test_plain_atomic_blocks_inside_a_test_case(self):
        from django.db import transaction

        with self.assertNumQueries(3):   # SAVEPOINT, INSERT, RELEASE SAVEPOINT, as for a model on 'default'
            with transaction.atomic():
                Author.objects.create(name="kept")
        try:
            with transaction.atomic():
                Author.objects.create(name="gone")
                raise ValueError
        except ValueError:
            pass
        with transaction.atomic(durable=True):   # the test case's own blocks do not count as nesting
            Author.objects.create(name="durable")
        self.assertEqual(sorted(Author.objects.values_list("name", flat=True)), ["durable", "kept"])


class PlainAtomicTransactionTestCase(TransactionTestCase):
    def test_commit(self):
        from django.db import transaction

        # What Django counts for a model on 'default': its own BEGIN and COMMIT, and the two statements.
        with self.assertNumQueries(4):
            with transaction.atomic():
                Author.objects.create(name="committed")
                Author.objects.filter(name="committed").update(rating=1)
        self.assertEqual(list(Author.objects.values_list("rating", flat=True)), [1])

    def test_rollback(self):
        from django.db import transaction

        with self.assertRaises(ValueError):
            with transaction.atomic():
                Author.objects.create(name="rolled back")
                raise ValueError
        self.assertEqual(Author.objects.count(), 0)
