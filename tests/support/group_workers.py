"""Writers for the group-commit tests (spawned app processes): each records what it was told."""
from __future__ import annotations

import json
from pathlib import Path

from tests.support.workers import setup_child


def create_authors(settings_json: str, prefix: str, count: int, shared_names: list, out: str) -> None:
    """``count`` creates of its own names, each followed by a create of a name every writer
    tries (only one of them may succeed); one JSON line per outcome."""
    setup_child(settings_json)
    from django.db import IntegrityError

    from tests.testapp.models import Author

    with Path(out).open("w") as log:
        for i in range(count):
            for name in (f"{prefix}-{i}", shared_names[i % len(shared_names)]):
                try:
                    pk = Author.objects.create(name=name).pk
                    record = {"name": name, "ok": True, "pk": pk}
                except IntegrityError as exc:
                    record = {"name": name, "ok": False, "error": type(exc).__name__, "message": str(exc)[:200]}
                log.write(json.dumps(record) + "\n")
                log.flush()
