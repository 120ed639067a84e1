"""App processes for tests/test_resync.py (multiprocessing 'spawn' targets; no models at import)."""
from __future__ import annotations

import time
from typing import Any

from tests.support.workers import setup_child


def app_loop(settings_json: str, prefix: str, max_ops: int, max_seconds: float, static_rows: int,
             stop: Any, results: Any, atomic_every: int = 10) -> None:
    """Write, read back, and count rows nobody changes, until ``stop`` (bounded by ``max_ops`` and
    ``max_seconds``).  A read served by a half-copied, empty or lagging copy shows up as a wrong
    count of the static rows, or as a write that cannot be read back.  Every ``atomic_every``-th
    round also runs an ``atomic()`` block (0: none; a coordinator restart fails an open one)."""
    setup_child(settings_json)
    import django_lb_shm
    from tests.testapp.models import Author, Destination

    errors: list[str] = []
    wrong: list[str] = []
    ops = reads = 0
    worst_write = 0.0
    deadline = time.monotonic() + max_seconds
    for i in range(max_ops):
        if stop.is_set() or time.monotonic() > deadline:
            break
        try:
            t0 = time.monotonic()
            author = Author.objects.create(name=f"{prefix}-{i}")
            worst_write = max(worst_write, time.monotonic() - t0)
            Author.objects.filter(pk=author.pk).update(rating=i)
            if Author.objects.get(pk=author.pk).rating != i:
                wrong.append(f"{prefix}-{i}: its own update not read back")
            count = Destination.objects.count()
            if count != static_rows:
                wrong.append(f"{prefix}-{i}: {count} static rows, not {static_rows}")
            if atomic_every and i % atomic_every == 0:
                with django_lb_shm.atomic():
                    Author.objects.filter(pk=author.pk).update(rating=i + 1)
                    Author.objects.filter(pk=author.pk).update(rating=i)
            reads += 2
            ops += 1
        except Exception as exc:  # recorded: the test wants none
            errors.append(f"{type(exc).__name__}: {exc}")
            if len(errors) >= 5:
                break
    results.put({"prefix": prefix, "ops": ops, "reads": reads, "errors": errors, "wrong": wrong[:10],
                 "wrong_count": len(wrong), "worst_write_s": worst_write})
