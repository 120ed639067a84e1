"""A miniature Jepsen-style history: what the app asked, what it was told, what the copies hold.

Every process that issues writes records them in its own JSON-lines file (one
``invoke`` line before the operation, one ``complete`` line after it, both
flushed at once), so a process killed mid-operation leaves an operation with no
completion: its outcome is *unknown*.

Every write is identified by a client-generated token stored in a unique
column: ``Author.name`` and ``Tag.label`` of the test app.  A token is written
by one process only, so its operations are ordered by that process's file.

``History(dir).check(aliases)`` reads every file and the real databases
(direct connections, never the coordinator) and asserts:

- an acknowledged create is on every copy exactly once, with the primary key
  the app was told, and the values the history allows;
- a write reported as definitely not applied is on no copy;
- a write whose outcome is unknown is either on every copy or on none
  (the copies are compared row by row: identical tables);
- no copy holds a row no operation could have written.

A failure raises AssertionError with a readable report of every problem.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

# model label -> (table, token column, value column or None)
TABLES = {
    "author": ("testapp_author", "name", "rating"),
    "tag": ("testapp_tag", "label", None),
}

# Error classes that say the write was applied nowhere.
DEFINITE_ERRORS = {"IntegrityError", "WriteNotApplied", "NoDatabaseAvailable", "DataError",
                   "ProgrammingError", "RequestRejected", "NotSupportedError", "SerializationError",
                   "ValueError", "TypeError", "DataValueError", "DataOverflowError", "ParameterTypeError",
                   "BlockAborted"}   # the app's own exception out of a plain atomic block: rolled back
# Messages that say so whatever the class (TransactionError "... none of its writes were applied").
DEFINITE_PHRASES = ("none of its writes were applied", "nothing was applied", "was not applied",
                    "journal_dir")


def is_definite_failure(error: str, message: str) -> bool:
    if error in DEFINITE_ERRORS:
        return True
    low = message.lower()
    return any(phrase in low for phrase in DEFINITE_PHRASES)


def new_token(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Write:
    """One row-level write inside an operation."""

    model: str            # "author" | "tag"
    action: str           # "create" | "update" | "delete"
    token: str
    value: Any = None     # Author.rating (create/update)

    def to_json(self) -> dict:
        return {"model": self.model, "action": self.action, "token": self.token, "value": self.value}


@dataclass
class Op:
    id: str
    process: str
    index: int
    kind: str                       # create | update | delete | atomic | bulk_create | plain...
    writes: list[Write]
    outcome: str = "unknown"        # ok | fail | unknown
    pks: dict = field(default_factory=dict)   # token -> pk the app was told (creates)
    error: str = ""
    message: str = ""
    started: float = 0.0
    finished: float = 0.0

    def describe(self) -> str:
        told = {"ok": f"ok pks={self.pks}", "fail": f"failed {self.error}: {self.message[:160]}",
                "unknown": f"unknown {self.error}: {self.message[:160]}" if self.error else "unknown (no answer)"}
        return f"op {self.id} [{self.kind}] {[w.to_json() for w in self.writes]} -> {told[self.outcome]}"


class Recorder:
    """The log of one process; thread-unsafe by design (one per process)."""

    def __init__(self, path: str | os.PathLike, process: str):
        self.path = Path(path)
        self.process = process
        self.count = 0
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._file.close()

    def _line(self, data: dict) -> None:
        self._file.write(json.dumps(data, default=str) + "\n")
        self._file.flush()

    def invoke(self, kind: str, writes: list[Write]) -> str:
        self.count += 1
        op_id = f"{self.process}:{self.count}"
        self._line({"type": "invoke", "id": op_id, "process": self.process, "index": self.count, "kind": kind,
                    "writes": [w.to_json() for w in writes], "time": time.time()})
        return op_id

    def ok(self, op_id: str, pks: Optional[dict] = None) -> None:
        self._line({"type": "complete", "id": op_id, "outcome": "ok", "pks": pks or {}, "time": time.time()})

    def failed(self, op_id: str, exc: BaseException) -> str:
        error, message = type(exc).__name__, str(exc)
        outcome = "fail" if is_definite_failure(error, message) else "unknown"
        self._line({"type": "complete", "id": op_id, "outcome": outcome, "error": error, "message": message,
                    "time": time.time()})
        return outcome

    def run(self, kind: str, writes: list[Write], action: Callable[[], Optional[dict]]) -> tuple[str, Any]:
        """Record, run ``action`` (returns {token: pk} for creates), record what it was told."""
        op_id = self.invoke(kind, writes)
        try:
            pks = action()
        except Exception as exc:
            return self.failed(op_id, exc), exc
        self.ok(op_id, pks)
        return "ok", pks


class History:
    """All the JSON-lines files of one test in ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def recorder(self, process: str) -> Recorder:
        return Recorder(self.directory / f"{process}.jsonl", process)

    def path_for(self, process: str) -> str:
        return str(self.directory / f"{process}.jsonl")

    def ops(self) -> list[Op]:
        ops: dict[str, Op] = {}
        for path in sorted(self.directory.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    data = json.loads(line)
                except ValueError:
                    continue   # a line torn by kill -9
                if data["type"] == "invoke":
                    ops[data["id"]] = Op(data["id"], data["process"], data["index"], data["kind"],
                                         [Write(**w) for w in data["writes"]], started=data["time"])
                elif data["id"] in ops:
                    op = ops[data["id"]]
                    op.outcome = data["outcome"]
                    op.pks = data.get("pks") or {}
                    op.error = data.get("error", "")
                    op.message = data.get("message", "")
                    op.finished = data["time"]
        return sorted(ops.values(), key=lambda o: (o.process, o.index))

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for op in self.ops():
            counts[op.outcome] = counts.get(op.outcome, 0) + 1
        return counts

    # -- the check -------------------------------------------------------------------
    def check(self, aliases: Iterable[str], raise_on_failure: bool = True) -> list[str]:
        aliases = list(aliases)
        ops = self.ops()
        problems: list[str] = []
        actual = {model: {alias: _read_table(alias, *spec[:3]) for alias in aliases}
                  for model, spec in TABLES.items()}
        full = {model: {alias: _full_rows(alias, spec[0]) for alias in aliases} for model, spec in TABLES.items()}

        # 1. copies identical, row by row
        for model, per_alias in full.items():
            first = per_alias[aliases[0]]
            for alias in aliases[1:]:
                if per_alias[alias] != first:
                    only_here = sorted(set(per_alias[alias]) - set(first), key=str)[:5]
                    missing = sorted(set(first) - set(per_alias[alias]), key=str)[:5]
                    problems.append(f"{TABLES[model][0]}: {alias} differs from {aliases[0]} "
                                    f"({len(per_alias[alias])} vs {len(first)} rows): only on {alias} {only_here}, "
                                    f"missing on {alias} {missing}")

        # 2. every token: the copies' state is one the history allows
        possible: dict[tuple[str, str], list[tuple]] = {}
        writers: dict[tuple[str, str], list[Op]] = {}
        for op in ops:
            for write in op.writes:
                key = (write.model, write.token)
                states = possible.setdefault(key, [("absent",)])
                writers.setdefault(key, []).append(op)
                after = [_apply(state, write, op) for state in states]
                if op.outcome == "ok":
                    states[:] = _unique(after)
                elif op.outcome == "unknown":
                    states[:] = _unique(states + after)
                # fail: unchanged
        for (model, token), states in possible.items():
            for alias in aliases:
                rows = actual[model][alias].get(token, [])
                if len(rows) > 1:
                    problems.append(f"{model} {token!r}: {len(rows)} rows on {alias}: {rows}")
                state = ("present", rows[0][0], rows[0][1]) if rows else ("absent",)
                if not any(_matches(state, allowed) for allowed in states):
                    history = "\n      ".join(op.describe() for op in writers[(model, token)])
                    problems.append(f"{model} {token!r} on {alias}: {_show(state)}; the history allows "
                                    f"{' or '.join(_show(s) for s in states)}\n      {history}")

        # 3. rows no operation wrote
        for model, per_alias in actual.items():
            for alias, rows in per_alias.items():
                stray = sorted(t for t in rows if (model, t) not in possible)
                if stray:
                    problems.append(f"{model}: {len(stray)} row(s) on {alias} that no recorded operation wrote: "
                                    f"{stray[:5]}")

        # 4. a primary key told to the app for two different tokens
        told: dict[tuple[str, Any], str] = {}
        for op in ops:
            if op.outcome != "ok":
                continue
            for write in op.writes:
                pk = op.pks.get(write.token) if write.action == "create" else None
                if pk is None:
                    continue
                other = told.setdefault((write.model, pk), write.token)
                if other != write.token:
                    problems.append(f"{write.model} pk {pk} was told to the app for {other!r} and for {write.token!r}")

        if problems and raise_on_failure:
            counts = self.summary()
            raise AssertionError(f"history check failed ({len(ops)} ops: {counts}); {len(problems)} problem(s):\n  - "
                                 + "\n  - ".join(problems[:40]))
        return problems


def _apply(state: tuple, write: Write, op: Op) -> tuple:
    if write.action == "create":
        pk = op.pks.get(write.token) if op.outcome == "ok" else None
        return ("present", pk, write.value)
    if write.action == "update":
        return ("present", state[1], write.value) if state[0] == "present" else state
    if write.action == "delete":
        return ("absent",)
    raise ValueError(write.action)


def _unique(states: list[tuple]) -> list[tuple]:
    seen, out = set(), []
    for s in states:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _matches(state: tuple, allowed: tuple) -> bool:
    if state[0] != allowed[0]:
        return False
    if state[0] == "absent":
        return True
    _, pk, value = state
    _, want_pk, want_value = allowed
    return (want_pk is None or want_pk == pk) and (want_value is None or want_value == value)


def _show(state: tuple) -> str:
    if state[0] == "absent":
        return "absent"
    return f"present(pk={'any' if state[1] is None else state[1]}, value={state[2]})"


def _read_table(alias: str, table: str, token_column: str, value_column: Optional[str]) -> dict[str, list[tuple]]:
    from django.db import connections

    value = f', "{value_column}"' if value_column else ", NULL"
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT "{token_column}", "id"{value} FROM "{table}"')
        rows: dict[str, list[tuple]] = {}
        for token, pk, val in cursor.fetchall():
            rows.setdefault(token, []).append((pk, val))
    return rows


def _full_rows(alias: str, table: str) -> list[tuple]:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT * FROM "{table}" ORDER BY 1')
        return [tuple(str(v) for v in row) for row in cursor.fetchall()]
