"""DbConnection's write path on PostgreSQL: fewer round trips, the same error semantics.

A follower block (BEGIN, statements, marker UPDATE, COMMIT) is one simple query;
the leader sends BEGIN with its first statement and the marker UPDATE with its
COMMIT.  These tests use a scratch database on the suite's first server (never
the load-balanced ones, whose marker the coordinator owns).
"""
from __future__ import annotations

import pytest
from psycopg import errors as pg_errors
from django.db import connections

from django_lb_shm.coordinator.db_thread import MARKER_TABLE, DbConnection
from django_lb_shm.wire.descriptors import Statement
from django_lb_shm.databases.failures import is_connection_error
from django_lb_shm.coordinator.transaction import ServerTransaction

pytestmark = pytest.mark.postgres_only

SCRATCH = "lb_round_trips"
ALIAS = "lb_round_trips"


@pytest.fixture(scope="module")
def scratch_alias():
    admin = connections.create_connection("default")
    admin.ensure_connection()
    admin.connection.autocommit = True
    with admin.connection.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {SCRATCH}")
        cur.execute(f"CREATE DATABASE {SCRATCH}")
    connections.settings[ALIAS] = dict(connections.settings["default"], NAME=SCRATCH)
    yield ALIAS
    del connections.settings[ALIAS]
    with admin.connection.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)")
    admin.close()


class Counting:
    """Counts the cursor calls (one call = one round trip) a DbConnection makes."""

    def __init__(self, conn: DbConnection):
        self.calls: list[str] = []
        create = conn.wrapper.create_cursor

        def create_cursor(*args, **kwargs):
            cursor = create(*args, **kwargs)
            execute, executemany = cursor.execute, cursor.executemany

            def counted_execute(sql, *a, **kw):
                self.calls.append(str(sql))
                return execute(sql, *a, **kw)

            def counted_executemany(sql, *a, **kw):
                self.calls.append(str(sql))
                return executemany(sql, *a, **kw)

            cursor.execute, cursor.executemany = counted_execute, counted_executemany
            return cursor

        conn.wrapper.create_cursor = create_cursor


@pytest.fixture()
def conn(scratch_alias):
    c = DbConnection(scratch_alias)
    c.open()
    c.ensure_marker()
    c.run("DROP TABLE IF EXISTS rt_child")
    c.run("DROP TABLE IF EXISTS rt_item")
    c.run("CREATE TABLE rt_item (id BIGSERIAL PRIMARY KEY, name TEXT UNIQUE NOT NULL, note TEXT)")
    c.run("CREATE TABLE rt_child (id INT PRIMARY KEY, item_id BIGINT REFERENCES rt_item (id) "
          "DEFERRABLE INITIALLY DEFERRED)")
    c.run(f"UPDATE {MARKER_TABLE} SET seq = 0 WHERE id = 1")
    assert c.batched
    yield c
    c.close()


def names(c: DbConnection) -> list:
    return [r[0] for r in c.run("SELECT name FROM rt_item ORDER BY id").rows]


def marker(c: DbConnection) -> int:
    return c.run(f"SELECT seq FROM {MARKER_TABLE} WHERE id = 1").rows[0][0]


def idle(c: DbConnection) -> bool:
    import psycopg
    return c.wrapper.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_follower_block_is_one_round_trip(conn):
    counter = Counting(conn)
    conn.apply_block([
        Statement("INSERT INTO rt_item (name, note) VALUES (%s, %s)", ("a", "50% off; -- not a comment")),
        Statement("INSERT INTO rt_item (name, note) VALUES ('b', '100%') -- trailing comment"),
        Statement("INSERT INTO rt_item (name) VALUES (%s)", [("c",), ("d",)], many=True),
        Statement("UPDATE rt_item SET note = %(n)s WHERE name = %(k)s", {"n": "x%%y", "k": "b"}),
        Statement("UPDATE rt_item SET note = note WHERE name = %s; ", ("zz",)),     # own semicolon
        Statement("UPDATE rt_item SET note = '%%' WHERE name = 'd'", ()),   # %% with empty params
        Statement("INSERT INTO rt_item (name) VALUES (%s)", [], many=True),
    ], 7, 70)
    assert len(counter.calls) == 1
    assert names(conn) == ["a", "b", "c", "d"]
    notes = dict(conn.run("SELECT name, note FROM rt_item").rows)
    assert notes["a"] == "50% off; -- not a comment" and notes["b"] == "x%%y" and notes["d"] == "%"
    assert marker(conn) == 7 and idle(conn)


def test_follower_block_error_applies_nothing(conn):
    conn.apply_block([Statement("INSERT INTO rt_item (name) VALUES ('a')")], 1, 10)
    with pytest.raises(pg_errors.UniqueViolation) as caught:
        conn.apply_block([
            Statement("INSERT INTO rt_item (name) VALUES ('b')"),
            Statement("INSERT INTO rt_item (name) VALUES ('a')"),    # duplicate
            Statement("INSERT INTO rt_item (name) VALUES ('c')"),
        ], 2, 20)
    assert not is_connection_error(caught.value)
    assert idle(conn)
    assert names(conn) == ["a"] and marker(conn) == 1


def test_follower_block_deferred_error_at_commit(conn):
    with pytest.raises(pg_errors.ForeignKeyViolation) as caught:
        conn.apply_block([Statement("INSERT INTO rt_child (id, item_id) VALUES (1, 999)")], 3, 30)
    assert idle(conn) and marker(conn) == 0
    assert conn.run("SELECT count(*) FROM rt_child").rows[0][0] == 0


def test_follower_block_connection_error(conn, scratch_alias):
    pid = conn.wrapper.connection.info.backend_pid
    other = DbConnection(scratch_alias)
    other.open()
    other.run("SELECT pg_terminate_backend(%s)", (pid,))
    other.close()
    with pytest.raises(pg_errors.OperationalError) as caught:
        conn.apply_block([Statement("INSERT INTO rt_item (name) VALUES ('a')")], 1, 10)
    assert is_connection_error(caught.value)
    conn.open()
    assert names(conn) == [] and marker(conn) == 0


def test_leader_write_two_round_trips(conn):
    counter = Counting(conn)
    conn.begin(immediate_constraints=True)
    result = conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s) RETURNING id", ("a",)))
    assert len(result.rows) == 1 and result.description[0][0] == "id" and result.rowcount == 1
    conn.prepare_commit(5, 50, check_deferred=False)
    assert not idle(conn)                     # in the transaction, marker not yet written
    conn.commit_with_marker(5, 50)
    assert len(counter.calls) == 2
    assert idle(conn) and marker(conn) == 5 and names(conn) == ["a"]
    assert conn.run(f"SELECT tag FROM {MARKER_TABLE} WHERE id = 1").rows[0][0] == 50


def test_autocommit_write_checks_deferred_constraints_before_the_journal(conn):
    """A deferred foreign key of one autocommit write fails with the statement, in the first
    round trip: COMMIT (after the journal append) can no longer refuse it."""
    counter = Counting(conn)
    conn.begin(immediate_constraints=True)
    with pytest.raises(pg_errors.ForeignKeyViolation) as caught:
        conn.execute(Statement("INSERT INTO rt_child (id, item_id) VALUES (1, 999)"))
    assert len(counter.calls) == 1
    conn.rollback_quietly()
    assert idle(conn) and marker(conn) == 0


def test_leader_statement_error_rolls_back(conn):
    conn.apply_block([Statement("INSERT INTO rt_item (name) VALUES ('a')")], 1, 10)
    conn.begin()
    with pytest.raises(pg_errors.UniqueViolation) as caught:
        conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s)", ("a",)))
    conn.rollback_quietly()
    assert idle(conn) and names(conn) == ["a"] and marker(conn) == 1


def test_leader_transaction_deferred_error_before_the_journal(conn):
    conn.begin()
    conn.execute(Statement("INSERT INTO rt_item (name) VALUES ('a')"))
    conn.execute(Statement("INSERT INTO rt_child (id, item_id) VALUES (1, 999)"))   # deferred: accepted here
    with pytest.raises(pg_errors.ForeignKeyViolation) as caught:
        conn.prepare_commit(4, 40, check_deferred=True)
    conn.rollback_quietly()
    assert idle(conn) and names(conn) == [] and marker(conn) == 0


def test_begin_without_statements_sends_nothing(conn):
    counter = Counting(conn)
    conn.begin()
    conn.commit()
    conn.begin()
    conn.rollback_quietly()
    assert counter.calls == [] and idle(conn)
    conn.begin()
    conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s)", [("a",), ("b",)], many=True))
    conn.commit_with_marker(2, 20)
    assert names(conn) == ["a", "b"] and marker(conn) == 2


class _Leader:
    """Just what Sequencer.hold_write_order needs of a database thread."""

    def __init__(self, conn: DbConnection):
        from django_lb_shm.shm.state import DbState
        self.alias, self.writer, self.state, self.applied_seq = conn.alias, conn, DbState.RUNNING, 0
        self.went_down = None

    def go_down(self, exc):
        self.went_down = exc
        self.writer.close()


def _sequencer(conn: DbConnection):
    from types import SimpleNamespace
    from django_lb_shm.coordinator.sequencer import Sequencer
    leader = _Leader(conn)
    return Sequencer([leader], journal=None, shared=None, config=SimpleNamespace(client_timeout=2)), leader


def test_begin_prelude_error_releases_the_order_once(conn):
    sequencer, _leader = _sequencer(conn)
    with pytest.raises(pg_errors.SyntaxError) as caught:
        ServerTransaction(sequencer).open(["SAVEPOINT s1", "THIS IS NOT SQL"], "", "")
    assert sequencer.lock.acquire(blocking=False)     # given back, exactly once
    sequencer.lock.release()
    assert idle(conn)                                 # not left inside an aborted transaction


def test_begin_prelude_connection_error_releases_the_order_once(conn, scratch_alias):
    from django_lb_shm.errors import TransactionError
    sequencer, leader = _sequencer(conn)
    other = DbConnection(scratch_alias)
    other.open()
    other.run("SELECT pg_terminate_backend(%s)", (conn.wrapper.connection.info.backend_pid,))
    other.close()
    with pytest.raises(TransactionError):
        ServerTransaction(sequencer).open(["SAVEPOINT s1"], "", "")
    assert leader.went_down is not None and is_connection_error(leader.went_down)
    assert sequencer.lock.acquire(blocking=False)
    sequencer.lock.release()


@pytest.mark.parametrize("bad, refused", [
    (Statement("INSERT INTO rt_item (name) VALUES (%s)", ("a\x00b",)), pg_errors.DataError),          # the NUL
    (Statement("INSERT INTO rt_item (name, note) VALUES (%s, %s)", ("a",)), pg_errors.ProgrammingError),   # count
])
def test_a_statement_refused_before_sending_keeps_the_deferred_begin(conn, bad, refused):
    conn.begin()
    with pytest.raises(refused):
        conn.execute(bad)
    conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s)", ("x",)))   # the caller goes on
    assert not idle(conn)            # ...inside the transaction
    conn.rollback_quietly()          # and rolls back
    assert names(conn) == [] and idle(conn)


def test_a_connection_closed_inside_a_transaction_is_not_silently_replaced(conn):
    from django_lb_shm.errors import DatabaseDown

    conn.begin()
    conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s)", ("in-txn",)))
    conn.close()  # what DbThread.go_down does to the writer while a transaction uses it
    with pytest.raises(DatabaseDown, match="closed inside a transaction") as caught:
        conn.execute(Statement("INSERT INTO rt_item (name) VALUES (%s)", ("after",)))
    assert is_connection_error(caught.value)  # the sequencer then aborts the transaction
    conn.rollback_quietly()
    assert names(conn) == []  # reopened outside any transaction: nothing of it committed


def test_a_group_of_writes_is_one_round_trip(conn):
    counter = Counting(conn)
    conn.begin(immediate_constraints=True)
    results = conn.execute_group([
        Statement("INSERT INTO rt_item (name) VALUES (%s) RETURNING id", ("a",)),
        Statement("UPDATE rt_item SET note = %s WHERE name = %s", ("n", "a")),
        Statement("INSERT INTO rt_item (name, note) VALUES ('b', '100%') RETURNING id"),
    ])
    assert len(counter.calls) == 1
    assert [type(r).__name__ for r in results] == ["Result", "Result", "Result"]
    assert len(results[0].rows) == 1 and results[1].rowcount == 1 and len(results[2].rows) == 1
    conn.commit_with_marker(3, 30)
    assert names(conn) == ["a", "b"] and marker(conn) == 3 and idle(conn)


def test_a_refused_write_in_a_group_fails_alone(conn):
    conn.apply_block([Statement("INSERT INTO rt_item (name) VALUES ('dup')")], 1, 10)
    conn.begin(immediate_constraints=True)
    results = conn.execute_group([
        Statement("INSERT INTO rt_item (name) VALUES (%s)", ("x",)),
        Statement("INSERT INTO rt_item (name) VALUES (%s)", ("dup",)),                    # unique violation
        Statement("INSERT INTO rt_child (id, item_id) VALUES (1, 999)"),                  # deferred FK, immediate here
        Statement("INSERT INTO rt_item (name) VALUES (%s)", ("y",)),
    ])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["Result", "UniqueViolation", "ForeignKeyViolation", "Result"]
    conn.commit_with_marker(2, 20)
    assert names(conn) == ["dup", "x", "y"] and marker(conn) == 2 and idle(conn)
    assert conn.run("SELECT count(*) FROM rt_child").rows[0][0] == 0


def _reset(table: str) -> Statement:
    """Django's sequence reset, as the insert compiler puts it after an INSERT of generated keys."""
    return Statement(f"SELECT setval(pg_get_serial_sequence('\"{table}\"','id'), coalesce(max(\"id\"), 1), "
                     f"max(\"id\") IS NOT null) FROM \"{table}\";")


def test_a_follower_block_of_keyed_inserts_resets_each_sequence_once(conn):
    counter = Counting(conn)
    block = []
    for key in (5, 9, 7):
        block += [Statement("INSERT INTO rt_item (id, name) VALUES (%s, %s)", (key, f"k{key}"), keyed=True),
                  _reset("rt_item")]
    conn.apply_block(block, 3, 30)
    sent = counter.calls[0]
    assert sent.count("setval") == 1 and sent.index("setval") > sent.index("'k7'")
    assert conn.run("SELECT last_value FROM rt_item_id_seq").rows[0][0] == 9   # max(id): as three resets leave it
    assert conn.run("INSERT INTO rt_item (name) VALUES ('next') RETURNING id").rows[0][0] == 10


def test_a_reset_before_a_statement_that_may_read_the_sequence_is_kept(conn):
    counter = Counting(conn)
    conn.apply_block([
        Statement("INSERT INTO rt_item (id, name) VALUES (%s, %s)", (4, "keyed"), keyed=True),
        _reset("rt_item"),
        Statement("INSERT INTO rt_item (name) VALUES (%s)", ("raw, its key from the sequence",)),
        Statement("INSERT INTO rt_item (id, name) VALUES (%s, %s)", (8, "keyed again"), keyed=True),
        _reset("rt_item"),
    ], 4, 40)
    assert counter.calls[0].count("setval") == 2
    assert dict((n, i) for i, n in conn.run("SELECT id, name FROM rt_item").rows)[
        "raw, its key from the sequence"] == 5


def test_statements_of_earlier_journals_load_unkeyed_and_keyed_ones_round_trip():
    import pickle

    old_form = pickle.dumps(Statement("UPDATE t SET x = %s", (1,)))   # four constructor arguments
    assert Statement.__reduce__(Statement("x"))[1] == ("x", None, False, None)
    assert pickle.loads(old_form).keyed is False
    assert pickle.loads(pickle.dumps(Statement("INSERT", (1,), keyed=True))).keyed is True
