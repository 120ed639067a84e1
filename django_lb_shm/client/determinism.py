"""Writes whose values each copy would compute for itself: the clock, random numbers, random UUIDs.

Every copy runs the same write, so ``now()`` or ``random()`` in it would give each copy its
own value and leave the copies different.  Before a write leaves the app process, the time
functions are replaced by one literal (this process's clock, in UTC), read once for the
statement (PostgreSQL's transaction time: once per transaction), and the functions that
cannot become one literal (random numbers, random UUIDs) are refused with
:class:`NonDeterministicWrite`.  The journal records, and replays to a lagging copy, the
statement as sent, literal included.

Only the SQL text is inspected.  A small tokenizer skips string literals, quoted identifiers
and comments, and keeps Django's ``%s`` / ``%%`` placeholders whole; a literal put in never
holds ``%``, so the statement means the same with or without parameters.
"""
from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import NamedTuple, Optional

from django_lb_shm.errors import NonDeterministicWrite
from django_lb_shm.wire.descriptors import Statement

POSTGRESQL, SQLITE = "postgresql", "sqlite"

# -- hints of the refusals --------------------------------------------------------------------
_RANDOM = ("compute the value in Python: random.random() (or random.randint(), secrets...), "
           "pass it as a parameter; to pick rows at random (order_by('?')), choose their keys in "
           "Python with random.sample() and filter on them")
_UUID = "compute the value in Python: uuid.uuid4(), pass it as a parameter (UUIDField(default=uuid.uuid4) does)"
_BYTES = "compute the value in Python: os.urandom(n) / secrets.token_bytes(n), pass it as a parameter"
_TIMEOFDAY = ("compute the value in Python: django.utils.timezone.now(), pass it as a parameter "
              "(or use now(), which is rewritten to one value)")
_TYPED_NOW = ("write now() / CURRENT_TIMESTAMP / CURRENT_DATE (rewritten to one value), or compute it in "
              "Python: django.utils.timezone.now(), pass it as a parameter")
_AGE = "pass both arguments: age(CURRENT_DATE, x) (CURRENT_DATE is rewritten to one value)"
_SQLITE_QUOTED_NOW = "write 'now' in single quotes (rewritten to one value), or compute it in Python"

# -- PostgreSQL -------------------------------------------------------------------------------
# keyword -> (clock, type of the literal); all of them but CURRENT_DATE take a precision: (p)
_PG_KEYWORDS = {
    "current_timestamp": ("transaction", "timestamptz"),
    "current_time": ("transaction", "timetz"),
    "current_date": ("transaction", "date"),
    "localtimestamp": ("transaction", "timestamp"),
    "localtime": ("transaction", "time"),
}
_PG_CLOCKS = {   # function() -> clock
    "now": "transaction",
    "transaction_timestamp": "transaction",
    "statement_timestamp": "statement",
    "clock_timestamp": "statement",
}
_PG_REFUSED = {
    "random": _RANDOM,
    "random_normal": _RANDOM,
    "gen_random_uuid": _UUID,
    "uuid_generate_v1": _UUID,
    "uuid_generate_v1mc": _UUID,
    "uuid_generate_v4": _UUID,
    "uuidv4": _UUID,
    "uuidv7": _UUID,
    "gen_random_bytes": _BYTES,
    "timeofday": _TIMEOFDAY,
}
# 'now', 'today'... cast to a date/time type: PostgreSQL reads the clock for them too.
_PG_SPECIAL_DATES = {
    "now": "({})",
    "today": "({}::date)",
    "tomorrow": "({}::date + 1)",
    "yesterday": "({}::date - 1)",
}
_PG_DATETIME_TYPES = frozenset({"date", "time", "timetz", "timestamp", "timestamptz", "pg_catalog"})

# -- SQLite -----------------------------------------------------------------------------------
_SQLITE_KEYWORDS = {
    "current_timestamp": "%Y-%m-%d %H:%M:%S",
    "current_date": "%Y-%m-%d",
    "current_time": "%H:%M:%S",
}
# Date functions: their 'now' argument (Django's Now() is STRFTIME(..., 'NOW')) reads the clock,
# and so does calling the first five without an argument.
_SQLITE_DATE_FUNCTIONS = frozenset({"date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff"})
_SQLITE_NOW_WITHOUT_ARGUMENT = frozenset({"date", "time", "datetime", "julianday", "unixepoch"})
_SQLITE_REFUSED = {
    "random": _RANDOM,
    "rand": _RANDOM,          # Django's Random() and order_by('?') on SQLite (a Python function it registers)
    "randomblob": _BYTES,
}

# -- the cheap test every write pays ----------------------------------------------------------
# Substrings first (a few C-level scans of the lower-cased text), then one regex: a statement
# that passes both is tokenized.  Verdicts are kept per SQL text (an ORM query's text repeats).
_PG_HINTS = ("now", "current_", "localtime", "_timestamp", "timeofday", "random", "uuid", "age",
             "today", "tomorrow", "yesterday")
_PG_CANDIDATE = re.compile(
    r"\b(?:(?:now|(?:statement|transaction|clock)_timestamp|timeofday|random(?:_normal)?"
    r"|gen_random_(?:uuid|bytes)|uuid_generate_v(?:1mc|1|4)|uuidv[47]|age)\"?\s*\("
    r"|current_(?:timestamp|date|time)\b|localtime(?:stamp)?\b)"
    r"|'\s*(?:now|today|tomorrow|yesterday)\s*'")
_SQLITE_HINTS = ("now", "current_", "rand")
_EMPTY_CALL = re.compile(r"\(\s*\)")   # date(): without a hint (column names hold "date" and "time" often)
_SQLITE_CANDIDATE = re.compile(
    r"\b(?:(?:random|randomblob|rand)[\"`\]]?\s*\(|current_(?:timestamp|date|time)\b"
    r"|(?:date|time|datetime|julianday|unixepoch)[\"`\]]?\s*\(\s*\))"
    r"|['\"`\[]now['\"`\]]")
_VERDICTS: dict[str, dict[str, bool]] = {POSTGRESQL: {}, SQLITE: {}}
_VERDICTS_MAX = 2048
_PLANS: dict[str, dict[str, "Plan | str"]] = {POSTGRESQL: {}, SQLITE: {}}
_PLANS_MAX = 512


def may_vary(sql: str, vendor: str) -> bool:
    """Whether ``sql`` may call a function each copy evaluates itself (False: it surely does not)."""
    verdicts = _VERDICTS.get(vendor)
    if verdicts is None:
        return False
    verdict = verdicts.get(sql)
    if verdict is None:
        verdict = _candidate(sql, vendor)
        if len(verdicts) >= _VERDICTS_MAX:
            verdicts.clear()
        verdicts[sql] = verdict
    return verdict


def _candidate(sql: str, vendor: str) -> bool:
    low = sql.lower()
    if vendor == POSTGRESQL:
        hints, pattern = _PG_HINTS, _PG_CANDIDATE
    else:
        hints, pattern = _SQLITE_HINTS, _SQLITE_CANDIDATE
        if _EMPTY_CALL.search(low):
            return pattern.search(low) is not None
    for hint in hints:
        if hint in low:
            return pattern.search(low) is not None
    return False


# -- the clock --------------------------------------------------------------------------------
class Clock:
    """The instants (seconds since the epoch) the literals of one statement come from.

    ``statement`` is read once per statement; ``transaction`` once per load-balanced
    transaction (the statement's own instant outside one).
    """

    def __init__(self, statement: float, transaction: Optional[float] = None):
        self.statement = statement
        self.transaction = statement if transaction is None else transaction

    def at(self, which: str) -> datetime:
        seconds = self.transaction if which == "transaction" else self.statement
        micros = int(round(seconds * 1_000_000))
        return datetime.fromtimestamp(micros // 1_000_000, timezone.utc).replace(microsecond=micros % 1_000_000)


class Literal(NamedTuple):
    """What replaces a clock function: ``template`` around the instant ``which``, written in ``style``
    ("pg": a timestamptz literal; "sqlite": SQLite's time string; else a strftime format)."""

    which: str
    template: str
    style: str

    def render(self, clock: Clock) -> str:
        moment = clock.at(self.which)
        if self.style == "pg":
            value = _pg_timestamptz(moment)
        elif self.style == "sqlite":
            value = _sqlite_time(moment)
        else:
            value = moment.strftime(self.style)
        return self.template.format(value)


def _pg_timestamptz(moment: datetime) -> str:
    return f"'{moment.isoformat(sep=' ', timespec='microseconds')}'::timestamptz"


def _sqlite_time(moment: datetime) -> str:
    """SQLite's 'now' is kept to the millisecond."""
    return f"'{moment.strftime('%Y-%m-%d %H:%M:%S')}.{moment.microsecond // 1000:03d}'"


# -- tokens -----------------------------------------------------------------------------------
class Token(NamedTuple):
    kind: str      # word, string, qident, param, cast, number, punct
    start: int
    end: int
    value: str     # word: lower-cased; string / qident: the text inside the quotes; else the text


_PG_TOKEN = re.compile(r"""
    (?P<skip>\s+|--[^\n]*)
  | (?P<block>/\*)
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*'?)
  | (?P<string>'(?:[^']|'')*'?)
  | (?P<dollar>\$(?P<tag>(?:[^\W\d]\w*)?)\$)
  | (?P<qident>"(?:[^"]|"")*"?)
  | (?P<param>%(?:\([^)]*\))?[s%])
  | (?P<word>[^\W\d][\w$]*)
  | (?P<cast>::)
  | (?P<number>\d[\w.]*)
  | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)

_SQLITE_TOKEN = re.compile(r"""
    (?P<skip>\s+|--[^\n]*)
  | (?P<block>/\*)
  | (?P<string>'(?:[^']|'')*'?)
  | (?P<qident>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<param>%(?:\([^)]*\))?[s%])
  | (?P<word>[^\W\d]\w*)
  | (?P<number>\d[\w.]*)
  | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)


def tokenize(sql: str, vendor: str) -> list[Token]:
    """The significant tokens of ``sql`` (no whitespace, no comments)."""
    postgresql = vendor == POSTGRESQL
    match = (_PG_TOKEN if postgresql else _SQLITE_TOKEN).match
    out: list[Token] = []
    pos, size = 0, len(sql)
    while pos < size:
        m = match(sql, pos)
        kind, end = m.lastgroup, m.end()
        if kind == "block":
            end = _comment_end(sql, pos, nested=postgresql)
        elif kind == "dollar":
            closing = sql.find(m.group(), end)
            end = size if closing < 0 else closing + len(m.group())
            out.append(Token("string", pos, end, sql[m.end():closing if closing >= 0 else size]))
        elif kind == "word":
            out.append(Token(kind, pos, end, sql[pos:end].lower()))
        elif kind in ("string", "estring"):
            body = sql[pos + (2 if kind == "estring" else 1):end]
            body = body[:-1] if body.endswith("'") else body
            out.append(Token("string", pos, end, body.replace("''", "'")))
        elif kind == "qident":
            out.append(Token(kind, pos, end, sql[pos + 1:end - 1]))
        elif kind != "skip":
            out.append(Token(kind, pos, end, sql[pos:end]))
        pos = end
    return out


def _comment_end(sql: str, pos: int, nested: bool) -> int:
    """End of the /* comment */ at ``pos`` (PostgreSQL's nest); the end of ``sql`` if it is not closed."""
    depth, i = 0, pos
    while i < len(sql):
        two = sql[i:i + 2]
        if two == "/*" and (nested or depth == 0):
            depth, i = depth + 1, i + 2
        elif two == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)


# -- rewriting --------------------------------------------------------------------------------
Plan = tuple   # ((start, end, Literal), ...) in text order: how to rewrite one SQL text


class _Rewriter:
    """Walks the tokens of one statement and plans its edits; raises NonDeterministicWrite."""

    def __init__(self, sql: str, vendor: str):
        self.sql = sql
        self.tokens = tokenize(sql, vendor)
        self.edits: list[tuple[int, int, Literal]] = []

    def plan(self) -> Plan:
        self.walk()
        return tuple(sorted(self.edits))

    def walk(self) -> None:
        raise NotImplementedError

    # token helpers
    def token(self, i: int) -> Optional[Token]:
        return self.tokens[i] if 0 <= i < len(self.tokens) else None

    def is_kind(self, i: int, kind: str) -> bool:
        t = self.token(i)
        return t is not None and t.kind == kind

    def is_punct(self, i: int, char: str) -> bool:
        t = self.token(i)
        return t is not None and t.kind == "punct" and t.value == char

    def is_word(self, i: int, *words: str) -> bool:
        t = self.token(i)
        return t is not None and t.kind == "word" and (not words or t.value in words)

    def is_call(self, i: int) -> bool:
        """Word ``i`` is a function called here (not the table of ``INSERT INTO name (columns)``)."""
        if not self.is_punct(i + 1, "("):
            return False
        first = i
        while self.is_punct(first - 1, ".") and self.token(first - 2) is not None:
            first -= 2
        return not self.is_word(first - 1, "into")

    def name_start(self, i: int) -> int:
        """Where the (possibly schema-qualified) name at token ``i`` starts in the text."""
        first = i
        while self.is_punct(first - 1, ".") and self.token(first - 2) is not None:
            first -= 2
        return self.tokens[first].start

    def closing(self, open_index: int) -> tuple[int, int]:
        """(index of the ``)`` matching the ``(`` at ``open_index``, number of arguments)."""
        depth, commas = 0, 0
        for i in range(open_index, len(self.tokens)):
            t = self.tokens[i]
            if t.kind != "punct":
                continue
            if t.value == "(":
                depth += 1
            elif t.value == ")":
                depth -= 1
                if depth == 0:
                    empty = i == open_index + 1
                    return i, 0 if empty else commas + 1
            elif t.value == "," and depth == 1:
                commas += 1
        return len(self.tokens) - 1, commas + 1

    def refuse(self, what: str, hint: str) -> None:
        raise NonDeterministicWrite(
            f"{what} in a write would be evaluated by each database copy separately and leave the "
            f"copies different, so the load balancer refuses it; {hint}."
        )


class _PostgresqlRewriter(_Rewriter):
    def walk(self) -> None:
        tokens, i = self.tokens, 0
        while i < len(tokens):
            t = tokens[i]
            if t.kind == "word":
                i = self.word(i, t)
            elif t.kind == "qident" and self.is_punct(i + 1, "("):
                i = self.function(i, t.value)   # "now"() calls now() (case-sensitive when quoted)
            elif t.kind == "string" and t.value.strip().lower() in _PG_SPECIAL_DATES:
                self.special_date(i, t)
            i += 1

    def word(self, i: int, t: Token) -> int:
        """Handle word ``i``; the index of the last token it consumed."""
        if t.value in _PG_KEYWORDS and not self.is_punct(i - 1, ".") and not self.is_word(i - 1, "as"):
            return self.keyword(i, t)
        return self.function(i, t.value)

    def function(self, i: int, name: str) -> int:
        """Handle ``name`` at token ``i`` if it is a call; the index of the last token it consumed."""
        if name in _PG_CLOCKS and self.is_call(i):
            close, count = self.closing(i + 1)
            if count:
                self.refuse(f"{name.upper()}() with arguments", _TYPED_NOW)
            self.edits.append((self.name_start(i), self.tokens[close].end, Literal(_PG_CLOCKS[name], "({})", "pg")))
            return close
        if name in _PG_REFUSED and self.is_call(i):
            self.refuse(f"{name.upper()}()", _PG_REFUSED[name])
        if name == "age" and self.is_call(i) and self.closing(i + 1)[1] == 1:
            self.refuse("AGE() with one argument (it reads CURRENT_DATE)", _AGE)
        return i

    def keyword(self, i: int, t: Token) -> int:
        which, kind = _PG_KEYWORDS[t.value]
        cast = "" if kind == "timestamptz" else "::" + kind
        last = i
        precision = self.token(i + 2)
        if (kind != "date" and self.is_punct(i + 1, "(") and precision is not None and precision.kind == "number"
                and precision.value.isdigit() and self.is_punct(i + 3, ")")):
            cast += f"({precision.value})"
            last = i + 3
        self.edits.append((t.start, self.tokens[last].end, Literal(which, "({}" + cast + ")", "pg")))
        return last

    def special_date(self, i: int, t: Token) -> None:
        """'now'::timestamptz, CAST('today' AS date)...: the text PostgreSQL reads the clock for."""
        to_datetime = self.is_word(i + 2, *_PG_DATETIME_TYPES)
        cast = to_datetime and (self.is_kind(i + 1, "cast")
                                or self.is_word(i + 1, "as") and self.is_punct(i - 1, "(") and self.is_word(i - 2, "cast"))
        if cast:
            self.edits.append((t.start, t.end, Literal("transaction", _PG_SPECIAL_DATES[t.value.strip().lower()], "pg")))
        elif self.is_word(i - 1, "zone", *_PG_DATETIME_TYPES):
            self.refuse(f"the typed literal {self.sql[self.tokens[i - 1].start:t.end]}", _TYPED_NOW)


class _SqliteRewriter(_Rewriter):
    def walk(self) -> None:
        tokens = self.tokens
        frames: list[list] = []   # per open parenthesis: [its function or "", commas so far]
        in_date = 0               # how many of them are date functions
        for i, t in enumerate(tokens):
            kind, value = t.kind, t.value
            if kind == "punct" and value in "(),":
                in_date += self.parenthesis(i, value, frames)
            elif kind == "word":
                self.word(i, t)
            elif kind == "qident" and self.is_punct(i + 1, "("):
                self.function(i, value.lower())   # "random"() calls random()
            elif in_date and value.lower() == "now" and not (frames[-1][0] == "strftime" and frames[-1][1] == 0):
                if kind == "string":
                    self.edits.append((t.start, t.end, Literal("statement", "{}", "sqlite")))
                elif kind == "qident":
                    self.refuse(f"the quoted {self.sql[t.start:t.end]} in a date function", _SQLITE_QUOTED_NOW)

    def parenthesis(self, i: int, char: str, frames: list) -> int:
        """Track ( ) and , in ``frames``; how the count of open date functions changes."""
        if char == "(":
            previous = self.token(i - 1)
            name = previous.value.lower() if previous and previous.kind in ("word", "qident") and self.is_call(i - 1) else ""
            frames.append([name, 0])
            return name in _SQLITE_DATE_FUNCTIONS
        if not frames:
            return 0
        if char == ",":
            frames[-1][1] += 1
            return 0
        return -(frames.pop()[0] in _SQLITE_DATE_FUNCTIONS)

    def word(self, i: int, t: Token) -> None:
        if t.value in _SQLITE_KEYWORDS and not self.is_punct(i - 1, "."):
            self.edits.append((t.start, t.end, Literal("statement", "'{}'", _SQLITE_KEYWORDS[t.value])))
        else:
            self.function(i, t.value)

    def function(self, i: int, name: str) -> None:
        if name in _SQLITE_REFUSED and self.is_call(i):
            self.refuse(f"{name.upper()}()", _SQLITE_REFUSED[name])
        elif name in _SQLITE_NOW_WITHOUT_ARGUMENT and self.is_call(i) and self.is_punct(i + 2, ")"):
            self.edits.append((self.tokens[i + 1].start, self.tokens[i + 2].end, Literal("statement", "({})", "sqlite")))


_REWRITERS = {POSTGRESQL: _PostgresqlRewriter, SQLITE: _SqliteRewriter}


def rewrite_sql(sql: str, vendor: str, clock: Clock) -> str:
    """``sql`` with its time functions replaced by literals from ``clock``.

    Raises NonDeterministicWrite for a function that cannot be one literal (random numbers,
    random UUIDs).  Returns ``sql`` itself when there is nothing to change.
    """
    if not may_vary(sql, vendor):
        return sql
    plan = _plan(sql, vendor)
    if isinstance(plan, str):
        raise NonDeterministicWrite(plan)
    if not plan:
        return sql
    parts, pos = [], 0
    for start, end, literal in plan:
        parts.append(sql[pos:start])
        parts.append(literal.render(clock))
        pos = end
    parts.append(sql[pos:])
    return "".join(parts)


def _plan(sql: str, vendor: str) -> "Plan | str":
    """The edits of ``sql``, or why it is refused; kept per SQL text (Now() in an ORM query repeats)."""
    plans = _PLANS[vendor]
    plan = plans.get(sql)
    if plan is None:
        try:
            plan = _REWRITERS[vendor](sql, vendor).plan()
        except NonDeterministicWrite as exc:
            plan = str(exc)
        if len(plans) >= _PLANS_MAX:
            plans.clear()
        plans[sql] = plan
    return plan


def deterministic(statement: Statement, vendor: str, clock: Clock) -> Statement:
    """``statement`` as every copy can run it: its forms (the leader's, and the followers'
    explicit-key INSERT) rewritten with the same ``clock``."""
    sql = rewrite_sql(statement.sql, vendor, clock)
    keys = statement.insert_keys
    if keys is not None:
        follower_sql = rewrite_sql(keys.follower_sql, vendor, clock)
        if follower_sql is not keys.follower_sql:
            keys = replace(keys, follower_sql=follower_sql)
    if sql is statement.sql and keys is statement.insert_keys:
        return statement
    return Statement(sql, statement.params, statement.many, keys)
