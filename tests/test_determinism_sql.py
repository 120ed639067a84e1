"""Issue 14 item 5, without databases: the tokenizer and the rewriting of writes' SQL."""
import pytest
from django.db import NotSupportedError

from django_lb_shm.client.determinism import Clock, deterministic, may_vary, rewrite_sql, tokenize
from django_lb_shm.wire.descriptors import InsertKeys, Statement
from django_lb_shm.errors import NonDeterministicWrite

# 2026-12-06 05:01:02.123456 UTC; the transaction began at 05:00:00.500000
CLOCK = Clock(1796533262.123456, 1796533200.5)
STMT = "'2026-12-06 05:01:02.123456+00:00'::timestamptz"
TXN = "'2026-12-06 05:00:00.500000+00:00'::timestamptz"
SQLITE_NOW = "'2026-12-06 05:01:02.123'"
PG, SQLITE = "postgresql", "sqlite"


def pg(sql):
    return rewrite_sql(sql, PG, CLOCK)


def lite(sql):
    return rewrite_sql(sql, SQLITE, CLOCK)


# -- tokenizer ------------------------------------------------------------------------------
def kinds(sql, vendor=PG):
    return [(t.kind, t.value) for t in tokenize(sql, vendor)]


def test_tokenizer_skips_strings_identifiers_and_comments():
    sql = "SELECT 'a''b', E'c\\'d', $$e$$, $t$ f $x$ $t$, \"g\"\"h\", x -- now()\n /* a /* b */ c */ ::int"
    assert kinds(sql) == [
        ("word", "select"), ("string", "a'b"), ("punct", ","), ("string", "c\\'d"), ("punct", ","),
        ("string", "e"), ("punct", ","), ("string", " f $x$ "), ("punct", ","), ("qident", 'g""h'),
        ("punct", ","), ("word", "x"), ("cast", "::"), ("word", "int"),
    ]


def test_tokenizer_keeps_placeholders_whole():
    assert kinds("x = %s AND y LIKE '%%a' AND z = %(name)s AND w = 100%%") == [
        ("word", "x"), ("punct", "="), ("param", "%s"), ("word", "and"), ("word", "y"), ("word", "like"),
        ("string", "%%a"), ("word", "and"), ("word", "z"), ("punct", "="), ("param", "%(name)s"),
        ("word", "and"), ("word", "w"), ("punct", "="), ("number", "100"), ("param", "%%"),
    ]


def test_tokenizer_sqlite_quotes_and_no_dollar_quoting():
    assert kinds("[a b] `c` \"d\" 'e\\' $x", SQLITE) == [
        ("qident", "a b"), ("qident", "c"), ("qident", "d"), ("string", "e\\"), ("punct", "$"), ("word", "x"),
    ]


def test_tokenizer_unterminated_input_ends_the_token():
    assert kinds("x = 'open") == [("word", "x"), ("punct", "="), ("string", "open")]
    assert kinds("x /* open") == [("word", "x")]
    assert kinds("x $$ open") == [("word", "x"), ("string", " open")]


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sql, expected", [
    ('UPDATE "t" SET "x" = STATEMENT_TIMESTAMP()', f'UPDATE "t" SET "x" = ({STMT})'),   # Django's Now()
    ('UPDATE "t" SET "d" = (STATEMENT_TIMESTAMP() AT TIME ZONE %s)::date',               # TruncDate(Now())
     f'UPDATE "t" SET "d" = (({STMT}) AT TIME ZONE %s)::date'),
    ("UPDATE t SET x = now()", f"UPDATE t SET x = ({TXN})"),
    ("UPDATE t SET x = NOW ( )", f"UPDATE t SET x = ({TXN})"),
    ("UPDATE t SET x = pg_catalog.now()", f"UPDATE t SET x = ({TXN})"),
    ('UPDATE t SET x = "now"()', f"UPDATE t SET x = ({TXN})"),
    ("UPDATE t SET x = transaction_timestamp()", f"UPDATE t SET x = ({TXN})"),
    ("UPDATE t SET x = clock_timestamp()", f"UPDATE t SET x = ({STMT})"),
    ("UPDATE t SET x = CURRENT_TIMESTAMP", f"UPDATE t SET x = ({TXN})"),
    ("UPDATE t SET x = current_timestamp(3)", f"UPDATE t SET x = ({TXN}(3))"),
    ("UPDATE t SET x = CURRENT_DATE", f"UPDATE t SET x = ({TXN}::date)"),
    ("UPDATE t SET x = CURRENT_TIME", f"UPDATE t SET x = ({TXN}::timetz)"),
    ("UPDATE t SET x = LOCALTIMESTAMP(0)", f"UPDATE t SET x = ({TXN}::timestamp(0))"),
    ("UPDATE t SET x = LOCALTIME", f"UPDATE t SET x = ({TXN}::time)"),
    ("UPDATE t SET x = 'now'::timestamptz", f"UPDATE t SET x = ({TXN})::timestamptz"),
    ("UPDATE t SET x = 'today'::date", f"UPDATE t SET x = ({TXN}::date)::date"),
    ("UPDATE t SET x = CAST('tomorrow' AS timestamp)", f"UPDATE t SET x = CAST(({TXN}::date + 1) AS timestamp)"),
    ("UPDATE t SET x = age(now(), y)", f"UPDATE t SET x = age(({TXN}), y)"),
    ("INSERT INTO t (a, b) VALUES (%s, now()) RETURNING t.id", f"INSERT INTO t (a, b) VALUES (%s, ({TXN})) RETURNING t.id"),
])
def test_postgresql_clock_functions_become_one_literal(sql, expected):
    assert pg(sql) == expected


@pytest.mark.parametrize("sql", [
    "UPDATE t SET x = 'now() random() CURRENT_TIMESTAMP'",           # a string
    "UPDATE t SET x = E'it''s \\' now()'",
    "UPDATE t SET x = $$now()$$ || $f$ random() $f$",
    'UPDATE t SET "now" = 1, "current_timestamp" = 2, "random" = 3',  # quoted identifiers
    'UPDATE t SET x = "NOW"()',                                      # another function: quoted names keep their case
    "UPDATE t SET x = 1 -- now()\n/* random() /* nested */ CURRENT_DATE */ WHERE y = 2",
    "INSERT INTO now (a) VALUES (1)",                                # a table named now
    "UPDATE t SET now = 1, random = 2 WHERE t.current_date = 3",     # columns
    "UPDATE t SET x = 'now', y = 'now'::text",                       # the text 'now', not a time
    "UPDATE t SET x = uuid_generate_v5(%s, %s), y = age(a, b)",      # deterministic
    "UPDATE t SET x = %s WHERE y LIKE '100%%now%%'",
])
def test_postgresql_untouched(sql):
    assert pg(sql) is sql


@pytest.mark.parametrize("sql, name, hint", [
    ('UPDATE "t" SET "f" = RANDOM()', "RANDOM()", "random.random()"),                       # Random()
    ('UPDATE "t" SET "f" = %s WHERE "t"."id" IN (SELECT U0."id" AS "pk" FROM "t" U0 ORDER BY RANDOM() ASC LIMIT 2)',
     "RANDOM()", "random.sample()"),                                                       # order_by('?')
    ("UPDATE t SET f = random_normal()", "RANDOM_NORMAL()", "random.random()"),
    ("UPDATE t SET u = gen_random_uuid()", "GEN_RANDOM_UUID()", "uuid.uuid4()"),
    ('UPDATE t SET u = "gen_random_uuid"()', "GEN_RANDOM_UUID()", "uuid.uuid4()"),
    ("UPDATE t SET u = public.uuid_generate_v4()", "UUID_GENERATE_V4()", "uuid.uuid4()"),
    ("UPDATE t SET u = uuid_generate_v1mc()", "UUID_GENERATE_V1MC()", "uuid.uuid4()"),
    ("UPDATE t SET u = uuidv7()", "UUIDV7()", "uuid.uuid4()"),
    ("UPDATE t SET b = gen_random_bytes(16)", "GEN_RANDOM_BYTES()", "os.urandom(n)"),
    ("UPDATE t SET s = timeofday()", "TIMEOFDAY()", "timezone.now()"),
    ("UPDATE t SET a = age(x)", "AGE()", "age(CURRENT_DATE, x)"),
    ("UPDATE t SET a = TIMESTAMP 'now'", "TIMESTAMP 'now'", "timezone.now()"),
    ("UPDATE t SET a = now(3)", "NOW() with arguments", "timezone.now()"),
])
def test_postgresql_random_functions_are_refused(sql, name, hint):
    with pytest.raises(NonDeterministicWrite) as info:
        pg(sql)
    assert isinstance(info.value, NotSupportedError)
    assert name in str(info.value) and hint in str(info.value)
    assert "pass it as a parameter" in str(info.value) or "both arguments" in str(info.value)


# -- SQLite -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sql, expected", [
    ("UPDATE \"t\" SET \"x\" = STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",                 # Django's Now()
     f"UPDATE \"t\" SET \"x\" = STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', {SQLITE_NOW})"),
    ("UPDATE t SET d = django_datetime_cast_date(STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW'), %s, %s)",
     f"UPDATE t SET d = django_datetime_cast_date(STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', {SQLITE_NOW}), %s, %s)"),
    ("UPDATE t SET x = datetime('now'), y = date('now', '+1 day'), z = julianday('Now')",
     f"UPDATE t SET x = datetime({SQLITE_NOW}), y = date({SQLITE_NOW}, '+1 day'), z = julianday({SQLITE_NOW})"),
    ("UPDATE t SET x = unixepoch('now', 'subsec'), y = strftime('%s', 'now'), z = timediff('now', a)",
     f"UPDATE t SET x = unixepoch({SQLITE_NOW}, 'subsec'), y = strftime('%s', {SQLITE_NOW}), "
     f"z = timediff({SQLITE_NOW}, a)"),
    ("UPDATE t SET x = datetime(coalesce(a, 'now'))", f"UPDATE t SET x = datetime(coalesce(a, {SQLITE_NOW}))"),
    ("UPDATE t SET x = datetime(), y = DATE( ), z = [time]()",
     f"UPDATE t SET x = datetime({SQLITE_NOW}), y = DATE({SQLITE_NOW}), z = [time]({SQLITE_NOW})"),
    ("UPDATE t SET x = CURRENT_TIMESTAMP, y = current_date, z = CURRENT_TIME",
     "UPDATE t SET x = '2026-12-06 05:01:02', y = '2026-12-06', z = '05:01:02'"),
])
def test_sqlite_clock_functions_become_one_literal(sql, expected):
    assert lite(sql) == expected


@pytest.mark.parametrize("sql", [
    "UPDATE t SET x = 'now', y = 'datetime(''now'') random()'",
    'UPDATE t SET "now" = 1, [random] = 2, `current_timestamp` = 3',
    "UPDATE t SET x = strftime('now', a)",          # 'now' as the format is text
    "UPDATE t SET x = date(a), y = datetime(a, '+1 day')",
    "UPDATE t SET x = 1 -- random()\n/* datetime('now') */",
    "INSERT INTO \"t\" (\"date\", \"time\") VALUES (%s, %s)",
    "UPDATE t SET localtimestamp = 1, now = 2",      # not keywords in SQLite
])
def test_sqlite_untouched(sql):
    assert lite(sql) is sql


@pytest.mark.parametrize("sql, name, hint", [
    ('UPDATE "t" SET "f" = RAND()', "RAND()", "random.random()"),                          # Random()
    ('UPDATE "t" SET "f" = %s WHERE "t"."id" IN (SELECT U0."id" AS "pk" FROM "t" U0 ORDER BY RAND() ASC LIMIT 2)',
     "RAND()", "random.sample()"),                                                        # order_by('?')
    ("UPDATE t SET f = random()", "RANDOM()", "random.random()"),
    ('UPDATE t SET f = "random"()', "RANDOM()", "random.random()"),
    ("UPDATE t SET b = randomblob(16)", "RANDOMBLOB()", "os.urandom(n)"),
    ('UPDATE t SET x = datetime("now")', '"now"', "single quotes"),
])
def test_sqlite_random_functions_are_refused(sql, name, hint):
    with pytest.raises(NonDeterministicWrite) as info:
        lite(sql)
    assert name in str(info.value) and hint in str(info.value)


# -- statements ---------------------------------------------------------------------------------
def test_both_forms_of_an_insert_get_the_same_literal():
    keys = InsertKeys('INSERT INTO t (id, at) VALUES (%s, STATEMENT_TIMESTAMP())', [-7], (-7,))
    statement = Statement('INSERT INTO t (at) VALUES (STATEMENT_TIMESTAMP()) RETURNING t.id', [], False, keys)
    out = deterministic(statement, PG, CLOCK)
    assert out.sql == f"INSERT INTO t (at) VALUES (({STMT})) RETURNING t.id"
    assert out.insert_keys.follower_sql == f"INSERT INTO t (id, at) VALUES (%s, ({STMT}))"
    assert out.insert_keys.markers == (-7,) and statement.insert_keys.follower_sql == keys.follower_sql


def test_an_ordinary_write_is_the_same_object():
    statement = Statement('UPDATE "t" SET "a" = %s WHERE "t"."id" = %s', [1, 2])
    assert deterministic(statement, PG, CLOCK) is statement
    assert deterministic(statement, SQLITE, CLOCK) is statement


def test_the_pre_check_lets_ordinary_writes_through():
    for vendor in (PG, SQLITE):
        assert not may_vary('INSERT INTO "testapp_author" ("name", "created", "updated", "token") '
                            'VALUES (%s, %s, %s, %s) RETURNING "testapp_author"."id"', vendor)
        assert not may_vary('UPDATE "page" SET "message" = %s, "updated" = %s, "uuid" = %s', vendor)
    assert may_vary("UPDATE t SET x = Now ()", PG) and may_vary("UPDATE t SET x = DATETIME('NOW')", SQLITE)
    assert not may_vary("UPDATE t SET x = now()", "mysql")


def test_literals_hold_no_percent_sign():
    for out in (pg("UPDATE t SET a = now(), b = CURRENT_TIME(2), c = 'today'::date"),
                lite("UPDATE t SET a = datetime(), b = CURRENT_TIMESTAMP")):
        assert "%" not in out


def test_a_known_sql_text_takes_each_statement_s_own_clock():
    sql = "UPDATE t SET x = now(), y = CURRENT_DATE WHERE id = %s"
    first = pg(sql)
    a_day_later = rewrite_sql(sql, PG, Clock(CLOCK.statement + 86400, CLOCK.transaction + 86400))
    assert "2026-12-06" in first and "2026-12-06" not in a_day_later and "2026-12-07" in a_day_later
    for _ in range(2):   # a refusal is kept too
        with pytest.raises(NonDeterministicWrite, match="RANDOM"):
            pg("UPDATE t SET x = random()")
