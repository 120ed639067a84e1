"""Spawn targets for tests/test_holds.py: an app process that holds the write order.

Files, not multiprocessing primitives, carry the hand-offs: the process is SIGSTOPped
by the test, and a stopped process must hold no lock the test needs.
"""
from __future__ import annotations

import time
from pathlib import Path

from tests.support.workers import setup_child


def write_then_wait_inside_atomic(settings_json: str, workdir: str, timeout: float = 60.0) -> None:
    """Open a load-balanced transaction with a write, say so, wait for "go", then write again.

    Writes to ``workdir/outcome`` what the second write raised (or "ok") and what
    leaving the block raised.
    """
    setup_child(settings_json)
    import django_lb_shm
    from tests.testapp.models import Author

    work = Path(workdir)
    outcome = []
    try:
        with django_lb_shm.atomic():
            Author.objects.create(name="held-1")
            (work / "ready").write_text("ready")
            deadline = time.monotonic() + timeout
            while not (work / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            try:
                Author.objects.create(name="held-2")
                outcome.append("ok")
            except Exception as exc:
                outcome.append(type(exc).__name__)
                raise
    except Exception as exc:
        outcome.append(f"block: {type(exc).__name__}")
    (work / "outcome").write_text("\n".join(outcome))
