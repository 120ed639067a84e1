"""What the transaction state machines share (``client.transaction``, ``coordinator.transaction``).

Each machine declares ``TRANSITIONS``: ``{(state, event): {next states}}``, and its docstring
holds the same table, one ``state  event  next  action`` row per transition between the
``TABLE_START`` and ``TABLE_END`` lines (tests/test_transaction_states.py checks they agree).
"""
from __future__ import annotations

from enum import Enum
from typing import Mapping

TABLE_START = "-- transitions --"
TABLE_END = "-- end --"

Transitions = Mapping[tuple[Enum, str], frozenset]


class TransitionError(RuntimeError):
    """An event the state machine does not allow in its state: a bug of django_lb_shm, not the app's."""


def move(machine: str, transitions: Transitions, state: Enum, event: str, to: Enum) -> Enum:
    """``to``, when ``event`` may take ``state`` there; else TransitionError naming all three."""
    allowed = transitions.get((state, event))
    if allowed is None or to not in allowed:
        reachable = ", ".join(sorted(s.name for s in allowed)) if allowed else "none: the event is not expected here"
        raise TransitionError(
            f"{machine}: event {event!r} in state {state.name} cannot lead to {to.name} (allowed: {reachable}); "
            "this is a bug of django_lb_shm, please report it with the traceback"
        )
    return to


def documented(doc: str) -> set[tuple[str, str, str]]:
    """The (state, event, next) rows of the table in ``doc``."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_START)
    end = next(i for i, line in enumerate(lines) if line.strip() == TABLE_END)
    rows = set()
    for line in lines[start + 1:end]:
        words = line.split()
        if len(words) >= 3 and words[0].isupper():
            rows.add((words[0], words[1], words[2]))
    return rows


def implemented(transitions: Transitions) -> set[tuple[str, str, str]]:
    return {(state.name, event, to.name) for (state, event), targets in transitions.items() for to in targets}
