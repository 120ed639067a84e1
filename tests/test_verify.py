"""`djangoloadbalancer verify`: every load-balanced table compared across the real databases.

The databases are read directly (django.db.connections[alias]); differences are
made by writing to one database directly, behind the coordinator's back.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import tty
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path

from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_lb_shm.ops.verify import (
    EXIT_DIFFERENT,
    EXIT_IDENTICAL,
    EXIT_UNREADABLE,
    RowDifference,
    compare_tables,
    load_balanced_tables,
    verify,
)
from tests.support.lb import ALIASES, BACKEND, REPO, app_tables
from tests.support.threads import Workers
from tests.testapp.models import Author, Book, Destination, Review, Tag, Token

LB_TABLES = sorted(app_tables(load_balanced_only=True))


def populate(authors: int = 6) -> list[int]:
    """Rows in every test table, written through the coordinator; returns the authors' keys."""
    tags = [Tag.objects.create(label=f"tag{i}") for i in range(3)]
    keys = []
    for i in range(authors):
        author = Author.objects.create(name=f"author{i}", born=date(1970 + i, 1, 2))
        book = Book.objects.create(title=f"book{i}", author=author, price=Decimal("12.50") + i)
        book.tags.set(tags[: i % 3 + 1])
        Review.objects.create(book=book, stars=i % 5, text=f"review {i}")
        keys.append(author.pk)
    Author.objects.filter(pk=keys[0]).update(rating=5)
    Book.objects.filter(author_id=keys[-1]).delete()
    Token.objects.bulk_create([Token(label=f"token{i}") for i in range(4)])
    Destination.objects.create(name="Paris", desc="city")
    return keys


def db2_diverges(replicas, author_keys: list[int]) -> tuple[int, int, int]:
    """Update one author, delete one, insert one, directly on DB2 only: (updated, deleted, inserted) keys."""
    replicas.handle.wait_drained()
    loner = Author.objects.create(name="loner")  # no books: deletable without touching other tables
    replicas.handle.wait_drained()
    updated, deleted, inserted = author_keys[1], loner.pk, max(author_keys) + 1000
    with connections["DB2"].cursor() as cursor:
        cursor.execute("UPDATE testapp_author SET rating = rating + 7 WHERE id = %s", [updated])
        cursor.execute("DELETE FROM testapp_author WHERE id = %s", [deleted])
        cursor.execute(
            "INSERT INTO testapp_author (id, name, born, created, updated, token, rating) "
            "SELECT %s, 'intruder', born, created, updated, token, rating FROM testapp_author WHERE id = %s",
            [inserted, updated],
        )
    return updated, deleted, inserted


def run_verify(**kwargs) -> tuple[int, str]:
    out = io.StringIO()
    code = verify(stream=out, **kwargs)
    return code, out.getvalue()


def cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


LAUNCHER_VERIFY = [sys.executable, "bin/djangoloadbalancer", "verify"]
MANAGE_VERIFY = [sys.executable, "-m", "django", "loadbalancer", "verify"]


# -- in process ---------------------------------------------------------------------------------
def test_the_compared_tables_are_the_load_balanced_ones():
    specs = {spec.table: spec for spec in load_balanced_tables()}
    # every concrete LoadBalancerModel plus the auto-created m2m table; no contrib tables
    assert sorted(specs) == LB_TABLES
    assert "testapp_book_tags" in specs and "auth_user" not in specs
    assert specs["testapp_token"].pk_columns == ("key",)
    assert specs["testapp_author"].columns[:2] == ("id", "name")


def test_identical_after_writes_through_the_coordinator(replicas):
    populate()
    replicas.assert_identical()  # the suite's own row-by-row comparison agrees
    code, out = run_verify(progress=True)
    assert code == EXIT_IDENTICAL, out
    counts = {"testapp_author": 6, "testapp_book": 5, "testapp_tag": 3, "testapp_token": 4, "testapp_destination": 1}
    for table in LB_TABLES:
        match = re.search(rf"^{table}\s+(\d+) rows\s+OK$", out, re.MULTILINE)
        assert match, f"no OK line for {table}:\n{out}"
        if table in counts:
            assert int(match.group(1)) == counts[table]
    assert f"verify OK: {len(LB_TABLES)} table(s) identical on default, DB1, DB2." in out
    assert "\r" not in out  # no progress bar on a stream that is not a terminal


def test_direct_changes_on_one_database_are_reported(replicas):
    keys = populate()
    updated, deleted, inserted = db2_diverges(replicas, keys)
    code, out = run_verify()
    assert code == EXIT_DIFFERENT, out
    assert re.search(r"^testapp_author\s+DIFFERENT\s+3 row\(s\) differ, on DB2; rows: default=7 DB1=7 DB2=7; "
                     r"still different when compared again$",
                     out, re.MULTILINE), out
    assert f"pk {updated}: different on DB2" in out
    assert f"pk {deleted}: missing on DB2" in out
    assert f"pk {inserted}: only on DB2 (missing on default, DB1)" in out
    assert re.search(r"^testapp_book\s+5 rows\s+OK$", out, re.MULTILINE)  # the others are still OK
    assert f"verify FAILED: 1 of {len(LB_TABLES)} table(s) differ across default, DB1, DB2: testapp_author." in out
    assert "The coordinator has no writes pending: the copies really differ." in out

    [report] = compare_tables(tables=["testapp_author"])
    assert not report.ok and report.differing == 3 and report.odd_ones == ("DB2",)
    assert report.differences == [
        RowDifference(updated, different_on=("DB2",)),
        RowDifference(deleted, missing_on=("DB2",)),
        RowDifference(inserted, missing_on=("default", "DB1"), only_on=("DB2",)),
    ]


def test_show_limits_the_keys_named_not_the_count(replicas):
    Tag.objects.bulk_create([Tag(label=f"t{i}") for i in range(12)])
    replicas.handle.wait_drained()
    with connections["DB1"].cursor() as cursor:
        cursor.execute("UPDATE testapp_tag SET label = label || '!'")
    code, out = run_verify(show=2)
    assert code == EXIT_DIFFERENT
    assert "testapp_tag" in out and "12 row(s) differ, on DB1" in out
    assert len(re.findall(r"^    pk \d+: different on DB1$", out, re.MULTILINE)) == 2


def test_small_chunks_use_keyset_pagination_and_stay_correct(replicas):
    Author.objects.bulk_create([Author(name=f"bulk{i:03}") for i in range(300)])
    Token.objects.bulk_create([Token(label=f"tok{i}") for i in range(50)])
    replicas.handle.wait_drained()

    contexts = {alias: CaptureQueriesContext(connections[alias]) for alias in ALIASES}
    for context in contexts.values():
        context.__enter__()
    try:
        [report] = compare_tables(tables=["testapp_author"], chunk_size=7)
    finally:
        for context in contexts.values():
            context.__exit__(None, None, None)
    assert report.ok and report.counts == dict.fromkeys(ALIASES, 300)
    for alias, context in contexts.items():
        # (the comparison's own queries: not those that read the table's columns first)
        selects = [q["sql"] for q in context.captured_queries if "testapp_author" in q["sql"] and "ORDER BY" in q["sql"]]
        assert len(selects) == 300 // 7 + 1, alias  # 42 full chunks and one of 6 rows
        assert all("LIMIT 7" in sql and "ORDER BY" in sql for sql in selects)
        assert " > " not in selects[0] and all(" > " in sql for sql in selects[1:])

    keys = sorted(Author.objects.values_list("pk", flat=True))
    tok17 = Token.objects.get(label="tok17").key
    extra = keys[-1] + 50
    direct = {
        "default": [("DELETE FROM testapp_author WHERE id = %s", [keys[0]])],           # first row
        "DB1": [("DELETE FROM testapp_author WHERE id IN (%s, %s)", [keys[6], keys[7]]),  # across a chunk edge
                ("INSERT INTO testapp_author (id, name, created, updated, token, rating) "
                 "SELECT %s, 'extra', created, updated, token, rating FROM testapp_author WHERE id = %s",
                 [extra, keys[1]])],
        "DB2": [("UPDATE testapp_author SET name = 'renamed' WHERE id = %s", [keys[13]]),
                ("DELETE FROM testapp_author WHERE id = %s", [keys[-1]]),                # last row
                ("DELETE FROM testapp_token WHERE label = 'tok17'", [])],
    }
    for alias, statements in direct.items():
        with connections[alias].cursor() as cursor:
            for sql, params in statements:
                cursor.execute(sql, params)
    expected = [
        RowDifference(keys[0], missing_on=("default",)),
        RowDifference(keys[6], missing_on=("DB1",)),
        RowDifference(keys[7], missing_on=("DB1",)),
        RowDifference(keys[13], different_on=("DB2",)),
        RowDifference(keys[-1], missing_on=("DB2",)),
        RowDifference(extra, missing_on=("default", "DB2"), only_on=("DB1",)),
    ]
    for chunk_size in (1, 7, 2000):
        author, token = compare_tables(tables=["testapp_author", "testapp_token"], chunk_size=chunk_size,
                                       show=100, recheck_delay=None)
        assert author.differences == expected, chunk_size
        assert author.counts == dict.fromkeys(ALIASES, 299)  # same counts, different rows
        assert token.differing == 1 and token.counts == {"default": 50, "DB1": 50, "DB2": 49}
        [missing] = token.differences
        assert missing.missing_on == ("DB2",) and uuid.UUID(str(missing.pk)) == tok17


def test_a_difference_that_heals_before_the_recheck_is_not_reported(replicas):
    keys = [a.pk for a in Author.objects.bulk_create([Author(name=f"lag{i}") for i in range(10)])]
    replicas.handle.wait_drained()
    with connections["DB2"].cursor() as cursor:
        cursor.execute("SELECT * FROM testapp_author WHERE id = %s", [keys[4]])
        row = cursor.fetchone()
        cursor.execute("DELETE FROM testapp_author WHERE id = %s", [keys[4]])
    [lagging] = compare_tables(tables=["testapp_author"], recheck_delay=None)
    assert lagging.differences == [RowDifference(keys[4], missing_on=("DB2",))]

    def catch_up():  # a late write arriving, like a database lagging behind under WRITE_ACK 'FIRST'
        time.sleep(0.3)
        with connections["DB2"].cursor() as cursor:
            cursor.execute(f"INSERT INTO testapp_author VALUES ({', '.join(['%s'] * len(row))})", list(row))
        connections["DB2"].close()

    late = Workers(catch_up, 1).start()
    [report] = compare_tables(tables=["testapp_author"], recheck_delay=1.5)
    late.join(10)
    assert report.rechecked and report.ok, report
    assert report.counts == dict.fromkeys(ALIASES, 10)


def test_progress_bar_only_on_a_terminal(replicas):
    populate(2)
    replicas.handle.wait_drained()
    master, slave = os.openpty()
    tty.setraw(slave)  # no newline translation: a carriage return can only come from the bar
    received = bytearray()

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with open(slave, "w", closefd=False) as terminal:
        assert verify(stream=terminal, progress=True) == EXIT_IDENTICAL
        assert verify(stream=terminal, progress=False) == EXIT_IDENTICAL
    os.close(slave)
    reader.join(5)
    os.close(master)
    text = received.decode()
    first_run, second_run = text.split("verify OK", 1)
    assert "\rtestapp_author [" in first_run and " rows" in first_run
    assert re.search(r"^testapp_author\s+2 rows\s+OK$", first_run.replace("\r", "\n"), re.MULTILINE)
    assert "\r" not in second_run.split("\n", 1)[1], "no bar with progress=False"


def test_a_table_that_cannot_be_read_on_one_database_exits_2(replicas, monkeypatch):
    import django_lb_shm.ops.verify as verify_module

    populate(2)
    replicas.handle.wait_drained()
    chunk_query = verify_module._chunk_query

    def failing_on_db2(spec, alias, *args):
        sql = chunk_query(spec, alias, *args)
        if alias == "DB2" and spec.table == "testapp_destination":
            return sql.replace('FROM "testapp_destination"', 'FROM "testapp_destination_hidden"')
        return sql

    monkeypatch.setattr(verify_module, "_chunk_query", failing_on_db2)
    code, out = run_verify()
    assert code == EXIT_UNREADABLE, out
    assert re.search(r"^testapp_destination\s+ERROR\s+DB2: cannot read table testapp_destination: ", out, re.M)
    assert re.search(r"^testapp_author\s+2 rows\s+OK$", out, re.MULTILINE)  # the rest is still compared
    assert out.rstrip().endswith("verify INCOMPLETE: could not compare testapp_destination.")
    monkeypatch.setattr(verify_module, "_chunk_query", chunk_query)
    assert run_verify()[0] == EXIT_IDENTICAL


def test_a_table_or_column_one_database_lacks_is_named(replicas):
    populate(2)
    replicas.handle.wait_drained()
    with connections["DB2"].cursor() as cursor:
        cursor.execute("ALTER TABLE testapp_destination RENAME TO testapp_destination_hidden")
    try:
        code, out = run_verify()
    finally:
        with connections["DB2"].cursor() as cursor:
            cursor.execute("ALTER TABLE testapp_destination_hidden RENAME TO testapp_destination")
    assert code == EXIT_DIFFERENT, out
    assert re.search(r"^testapp_destination\s+SCHEMA\s+DB2: no table testapp_destination; rows not compared$",
                     out, re.M), out
    assert re.search(r"^testapp_author\s+2 rows\s+OK$", out, re.MULTILINE)  # the rest is still compared
    assert (f"verify FAILED: 1 of {len(LB_TABLES)} table(s) differ across default, DB1, DB2: "
            "testapp_destination (schema).") in out

    with connections["DB1"].cursor() as cursor:
        cursor.execute("ALTER TABLE testapp_destination ADD COLUMN extra varchar(10) NULL")
    try:
        code, out = run_verify()
    finally:
        with connections["DB1"].cursor() as cursor:
            cursor.execute("ALTER TABLE testapp_destination DROP COLUMN extra")
    assert code == EXIT_DIFFERENT, out
    assert re.search(r"^testapp_destination\s+SCHEMA\s+default: no column extra; DB2: no column extra; "
                     r"rows identical on the columns every copy has \(1 rows\)$", out, re.M), out
    assert run_verify()[0] == EXIT_IDENTICAL


# -- the command line -----------------------------------------------------------------------------
def test_cli_verify_exit_codes(replicas):
    keys = populate()
    replicas.handle.wait_drained()
    env = replicas.handle.env()
    launched = [subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for cmd in (LAUNCHER_VERIFY, MANAGE_VERIFY)]
    for proc in launched:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        assert f"verify OK: {len(LB_TABLES)} table(s) identical on default, DB1, DB2." in out
        assert re.search(r"^testapp_book_tags\s+\d+ rows\s+OK$", out, re.MULTILINE)

    updated, deleted, inserted = db2_diverges(replicas, keys)
    launcher = cli(LAUNCHER_VERIFY + ["--chunk-size", "3"], env)
    managed = cli(MANAGE_VERIFY + ["--show", "1", "--no-progress"], env)
    for result in (launcher, managed):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "testapp_author" in result.stdout and "DB2" in result.stdout
        assert f"pk {updated}: different on DB2" in result.stdout
    assert f"pk {deleted}: missing on DB2" in launcher.stdout
    assert f"pk {inserted}: only on DB2 (missing on default, DB1)" in launcher.stdout
    assert f"pk {deleted}:" not in managed.stdout  # --show 1


def test_cli_verify_unreachable_database_exits_2(coordinator, tmp_path):
    from tests.support.pg_cluster import free_port

    settings = json.loads(Path(coordinator.env()["LB_TEST_CONFIG"]).read_text())
    missing_file = tmp_path / "no-such-dir" / "DB2.sqlite3"
    if BACKEND == "postgres":
        settings["DATABASES"]["DB2"].update(HOST="127.0.0.1", PORT=str(free_port()))
    else:
        settings["DATABASES"]["DB2"]["NAME"] = str(missing_file)
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings))
    env = dict(coordinator.env(), LB_TEST_CONFIG=str(config))
    started = time.monotonic()
    result = cli(LAUNCHER_VERIFY, env, timeout=60)
    assert result.returncode == EXIT_UNREADABLE, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    assert "database 'DB2' cannot be reached" in result.stdout
    assert "verify INCOMPLETE: DB2 unreachable." in result.stdout
    # the two databases that answer are still compared
    assert f"Comparing {len(LB_TABLES)} table(s) on default, DB1" in result.stdout
    assert not missing_file.parent.exists()  # verify creates nothing


def test_a_failed_verify_says_whether_writes_may_still_be_pending():
    from django.conf import settings
    from django.test import override_settings

    from django_lb_shm.ops.verify import _pending_writes_note
    from tests.support.pg_cluster import free_port

    nobody = dict(settings.LOAD_BALANCER, ADDRESS=dict(settings.LOAD_BALANCER["ADDRESS"], PORT=free_port()),
                  CONNECT_TIMEOUT=1)
    with override_settings(LOAD_BALANCER=nobody):
        note = _pending_writes_note()
    assert note.startswith("No coordinator answers: writes in its journal may not be applied to every copy yet")


def test_a_table_on_no_copy_is_no_difference(coordinator):
    # A load-balanced model never migrated anywhere (Django's own test suite declares models
    # inside tests): every copy agrees it has no such table.
    from dataclasses import replace

    from django_lb_shm.ops.verify import format_report, schema_differences, table_spec

    spec = replace(table_spec(Author, "default"), table="testapp_never_created")
    assert schema_differences(spec, ALIASES) == (None, {})
    [report] = compare_tables(tables=[spec])
    assert report.ok and not report.rows_compared
    assert format_report(report) == [f"{'testapp_never_created':<32} {'no table':>10}       OK (on no copy)"]
