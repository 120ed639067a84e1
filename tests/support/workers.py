"""Functions run in separate app processes (multiprocessing 'spawn' targets).

This module imports no models at import time: a spawned child must configure
Django first (``setup_child``), then do its work.
"""
from __future__ import annotations

import os
from typing import Any


def setup_child(settings_json: str, lb_overrides: dict | None = None) -> None:
    os.environ["LB_TEST_CONFIG"] = settings_json
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.testproject.settings"
    import django
    from django.conf import settings

    django.setup()
    if lb_overrides:
        settings.LOAD_BALANCER = dict(settings.LOAD_BALANCER, **lb_overrides)


def insert_authors(settings_json: str, prefix: str, count: int, lb_overrides: dict | None = None) -> None:
    setup_child(settings_json, lb_overrides)
    from tests.testapp.models import Author

    for i in range(count):
        Author.objects.create(name=f"{prefix}-{i}")


def mixed_workload(settings_json: str, prefix: str, count: int, results: Any = None,
                   lb_overrides: dict | None = None) -> None:
    """Writes and reads; records every acknowledged write's name and every error seen."""
    setup_child(settings_json, lb_overrides)
    from tests.testapp.models import Author

    acked, errors = [], []
    for i in range(count):
        name = f"{prefix}-{i}"
        try:
            author = Author.objects.create(name=name)
            acked.append(name)
            Author.objects.filter(pk=author.pk).update(rating=i)
            assert Author.objects.get(pk=author.pk).rating == i
            Author.objects.filter(name__startswith=prefix).count()
        except Exception as exc:  # recorded, the test decides
            errors.append(f"{type(exc).__name__}: {exc}")
            if len(errors) >= 3:
                break  # the coordinator is gone for good (a stop test): bounded
    if results is not None:
        results.put((prefix, acked, errors))


def atomic_blocks(settings_json: str, prefix: str, count: int) -> None:
    """Alternating committed and rolled-back blocks of several writes each."""
    setup_child(settings_json)
    import django_lb_shm
    from tests.testapp.models import Author

    for i in range(count):
        with django_lb_shm.atomic():
            author = Author.objects.create(name=f"{prefix}-{i}")
            Author.objects.filter(pk=author.pk).update(rating=i)
        try:
            with django_lb_shm.atomic():
                Author.objects.create(name=f"{prefix}-{i}-rolled-back")
                raise ValueError("roll back")
        except ValueError:
            pass


def write_and_announce(settings_json: str, prefix: str, count: int, announce: Any, done: Any = None) -> None:
    """Create rows one by one; put each acknowledged row's pk on ``announce`` at once (None at the end).

    With ``done``: wait for the reader to be ready first, then for it to have read each row
    back before the next write (lockstep: each read runs right after its write's ack).
    """
    setup_child(settings_json)
    from tests.testapp.models import Author

    try:
        if done is not None:
            done.get(timeout=60)
        for i in range(count):
            author = Author.objects.create(name=f"{prefix}-{i}")
            announce.put(author.pk)
            if done is not None:
                done.get(timeout=30)
    finally:
        announce.put(None)


def read_back_announced(settings_json: str, announce: Any, results: Any, timeout: float = 60,
                        done: Any = None) -> None:
    """Read back every announced pk as soon as it arrives; report misses and how reads were routed."""
    import queue as queue_module
    import time

    setup_child(settings_json)
    from django_lb_shm.client.reads import zero_hop_reader
    from tests.testapp.models import Author

    Author.objects.filter(pk=0).exists()   # connections open, reader slot claimed
    if done is not None:
        done.put("ready")
    seen, misses, errors = 0, [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pk = announce.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_module.Empty:
            break
        if pk is None:
            break
        seen += 1
        try:
            if not Author.objects.filter(pk=pk).exists():
                misses.append(pk)
        except Exception as exc:  # reported, the test decides
            errors.append(f"{type(exc).__name__}: {exc}")
        if done is not None:
            done.put(pk)
    results.put({"seen": seen, "misses": misses, "errors": errors, "zero_hop": zero_hop_reader() is not None})


def count_reads(settings_json: str, count: int, results: Any) -> None:
    """``count`` reads; reports whether this process could route reads itself."""
    setup_child(settings_json)
    from django_lb_shm.client.reads import zero_hop_reader
    from tests.testapp.models import Author

    total = 0
    for _ in range(count):
        total += Author.objects.filter(name__startswith="x").count() >= 0
    results.put({"reads": total, "zero_hop": zero_hop_reader() is not None})
