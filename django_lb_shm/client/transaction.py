"""The load-balanced transaction as one app thread's session sees it (``client.session.ClientSession``).

States:

* AUTOCOMMIT -- autocommit on: every statement is a request of its own.
* PENDING -- autocommit off, nothing of the transaction sent yet: reads are balanced as
  usual, savepoints are only recorded (the *prelude*), the coordinator holds nothing.
* OPEN -- its first write (or locking read) was handed to the coordinator, with the prelude:
  from then on the coordinator may hold the write order for it, whatever the answer.
* BROKEN -- a call of the open transaction went unanswered and its connection was dropped,
  which rolled it back on the coordinator; its statements raise TransactionError until it ends.

Events (``ClientTransaction`` has one method each): ``autocommit_off`` / ``autocommit_on``
(Django's ``set_autocommit``/``begin``), ``savepoint`` (a SAVEPOINT, RELEASE or ROLLBACK TO
before the first write), ``statement`` (a statement of the transaction is to be sent),
``opened`` (the first one is handed to the coordinator), ``lost`` (a call of it went
unanswered), ``commit``/``rollback`` (Django ends the transaction) and ``ending`` (the
COMMIT/ROLLBACK request is handed to the coordinator: an exception before leaves it OPEN,
to be rolled back later).  Any other (state, event) raises TransitionError.

    state       event          next        action
    -- transitions --
    AUTOCOMMIT  autocommit_off PENDING     -
    AUTOCOMMIT  autocommit_on  AUTOCOMMIT  -
    AUTOCOMMIT  commit         AUTOCOMMIT  nothing to send
    AUTOCOMMIT  rollback       AUTOCOMMIT  nothing to send
    PENDING     autocommit_off PENDING     -
    PENDING     autocommit_on  AUTOCOMMIT  recorded savepoints dropped
    PENDING     savepoint      PENDING     SAVEPOINT recorded; RELEASE / ROLLBACK TO trims the record
    PENDING     statement      PENDING     it will open the transaction
    PENDING     opened         OPEN        the prelude goes with it, and is forgotten here
    PENDING     commit         PENDING     nothing to send; recorded savepoints dropped
    PENDING     rollback       PENDING     nothing to send; recorded savepoints dropped
    OPEN        autocommit_off OPEN        -
    OPEN        statement      OPEN        sent in the coordinator's transaction
    OPEN        lost           BROKEN      why, kept for every later statement
    OPEN        commit         OPEN        build the COMMIT request, then ``ending``
    OPEN        rollback       OPEN        build the ROLLBACK request, then ``ending``
    OPEN        ending         PENDING     send it
    BROKEN      autocommit_off BROKEN      -
    BROKEN      statement      BROKEN      raise TransactionError (why it broke)
    BROKEN      commit         PENDING     raise TransactionError (why it broke)
    BROKEN      rollback       PENDING     nothing to send: the dropped connection rolled it back
    -- end --

``autocommit_on`` in OPEN or BROKEN is not in the table: the session rolls the transaction
back first (``ClientSession.set_autocommit``).
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

from django_lb_shm.errors import TransactionError
from django_lb_shm.wire.state_table import move


class ClientState(Enum):
    AUTOCOMMIT = "autocommit"
    PENDING = "pending"
    OPEN = "open"
    BROKEN = "broken"


A, P, O, B = ClientState.AUTOCOMMIT, ClientState.PENDING, ClientState.OPEN, ClientState.BROKEN

TRANSITIONS = {
    (A, "autocommit_off"): frozenset({P}),
    (A, "autocommit_on"): frozenset({A}),
    (A, "commit"): frozenset({A}),
    (A, "rollback"): frozenset({A}),
    (P, "autocommit_off"): frozenset({P}),
    (P, "autocommit_on"): frozenset({A}),
    (P, "savepoint"): frozenset({P}),
    (P, "statement"): frozenset({P}),
    (P, "opened"): frozenset({O}),
    (P, "commit"): frozenset({P}),
    (P, "rollback"): frozenset({P}),
    (O, "autocommit_off"): frozenset({O}),
    (O, "statement"): frozenset({O}),
    (O, "lost"): frozenset({B}),
    (O, "commit"): frozenset({O}),
    (O, "rollback"): frozenset({O}),
    (O, "ending"): frozenset({P}),
    (B, "autocommit_off"): frozenset({B}),
    (B, "statement"): frozenset({B}),
    (B, "commit"): frozenset({P}),
    (B, "rollback"): frozenset({P}),
}

# What ``commit``/``rollback`` ask of the session.
NOTHING, SEND = "nothing", "send"


class ClientTransaction:
    """The state of one session's load-balanced transaction, and the savepoints recorded before it opens."""

    def __init__(self) -> None:
        self.state = ClientState.AUTOCOMMIT
        self.prelude: list[tuple[str, str]] = []   # (savepoint name, sql) recorded in PENDING
        self.broken = ""                             # why, in BROKEN

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.state.name}>"

    @property
    def autocommit(self) -> bool:
        return self.state is ClientState.AUTOCOMMIT

    @property
    def is_open(self) -> bool:
        """The coordinator may hold it (OPEN), or held it until its connection dropped (BROKEN)."""
        return self.state is ClientState.OPEN or self.state is ClientState.BROKEN

    def _to(self, event: str, to: ClientState) -> None:
        self.state = move("ClientTransaction", TRANSITIONS, self.state, event, to)

    # -- events ----------------------------------------------------------------------
    def autocommit_off(self) -> None:
        self._to("autocommit_off", P if self.state is A else self.state)

    def autocommit_on(self) -> None:
        self._to("autocommit_on", A)
        self.prelude.clear()

    def savepoint(self, sql: str) -> None:
        self._to("savepoint", P)
        words = sql.split()
        name = words[-1]
        if words[0].upper() == "SAVEPOINT":
            self.prelude.append((name, sql))
            return
        names = [n for n, _sql in self.prelude]
        if name in names:
            # RELEASE drops the savepoint and later ones; ROLLBACK TO keeps it.
            del self.prelude[names.index(name) + (0 if words[0].upper() == "RELEASE" else 1):]

    def statement(self) -> None:
        """A statement of the transaction is to be sent; TransactionError when it is BROKEN."""
        self._to("statement", self.state)
        if self.state is B:
            raise TransactionError(self.broken)

    def prelude_sql(self) -> tuple[str, ...]:
        return tuple(sql for _name, sql in self.prelude)

    def opened(self) -> None:
        self._to("opened", O)
        self.prelude.clear()

    def lost(self, what: str) -> str:
        self._to("lost", B)
        self.broken = (f"the load-balanced transaction was aborted: {what}. Its connection to the coordinator "
                       "was dropped, which rolled it back: none of its writes were applied. Roll back (leave the "
                       "atomic block) before using the connection again")
        return self.broken

    def commit(self) -> str:
        """NOTHING or SEND (then ``ending``); TransactionError when it is BROKEN."""
        reason = self._end("commit")
        if reason:
            raise TransactionError(reason)
        return SEND if self.state is O else NOTHING

    def rollback(self) -> str:
        """NOTHING or SEND (then ``ending``)."""
        self._end("rollback")
        return SEND if self.state is O else NOTHING

    def ending(self) -> None:
        self._to("ending", P)

    def _end(self, event: str) -> Optional[str]:
        self.prelude.clear()
        reason = self.broken
        self._to(event, P if self.state is B else self.state)
        self.broken = ""
        return reason
