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
