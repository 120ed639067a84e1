"""What a statement is, read from its SQL: a read, a write, a lock, a savepoint or a boundary.
"""
from __future__ import annotations

import re

READ, WRITE, LOCK, SAVEPOINT, BOUNDARY = "read", "write", "lock", "savepoint", "boundary"
_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)
_WRITING_CTE = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
# PostgreSQL's sequence reset (loaddata, sqlsequencereset) is a SELECT that changes a sequence.
_SEQUENCE_RESET = re.compile(r"\bsetval\s*\(", re.IGNORECASE)


_KINDS: dict = {}   # sql -> kind: an ORM query's SQL repeats (its parameters are apart)
_KINDS_MAX = 2048


def classify(sql: str) -> str:
    """What a statement does: READ, WRITE, LOCK (locking read), SAVEPOINT or BOUNDARY."""
    kind = _KINDS.get(sql)
    if kind is None:
        kind = _classify(sql)
        if len(_KINDS) >= _KINDS_MAX:
            _KINDS.clear()
        _KINDS[sql] = kind
    return kind


# The statement an EXPLAIN explains: after its options ("EXPLAIN (ANALYZE, FORMAT JSON) UPDATE ...").
_EXPLAINED = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE|MERGE|WITH|VALUES|TABLE|EXECUTE|DECLARE|CREATE)\b",
                        re.IGNORECASE)
_ANALYZE = re.compile(r"\bANALY[SZ]E\b(\s+(?:FALSE|OFF|0)\b)?", re.IGNORECASE)


def _classify_explain(sql: str) -> str:
    """EXPLAIN only plans (READ), but PostgreSQL's EXPLAIN ANALYZE runs the statement: then it
    is what the explained statement is (an INSERT under it would change one copy only)."""
    inner = _EXPLAINED.search(sql)
    if inner is None:
        return READ
    analyze = _ANALYZE.search(sql, 0, inner.start())
    if analyze is None or analyze.group(1):
        return READ
    return _classify(sql[inner.start():])


def _classify(sql: str) -> str:
    words = sql.lstrip(" \t\r\n(").split(None, 2)
    head = words[0].upper() if words else ""
    if head == "EXPLAIN":
        return _classify_explain(sql)
    if head in ("SELECT", "VALUES", "SHOW", "WITH", "TABLE"):
        # Substring tests first: the regexes scan the whole statement (~5 µs each per read).
        upper = sql.upper()
        if head == "WITH" and _WRITING_CTE.search(sql) or "SETVAL" in upper and _SEQUENCE_RESET.search(sql):
            return WRITE
        return LOCK if "FOR" in upper and _LOCKING.search(sql) else READ
    if head == "PRAGMA":
        return WRITE if "=" in sql else READ
    if head in ("SAVEPOINT", "RELEASE") or (head == "ROLLBACK" and len(words) > 1 and words[1].upper() == "TO"):
        return SAVEPOINT
    if head in ("BEGIN", "COMMIT", "ROLLBACK", "START", "END", "ABORT"):
        return BOUNDARY
    return WRITE


