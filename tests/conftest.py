"""Test suite set-up: real databases, real coordinator processes.

LB_TEST_BACKEND=sqlite (default) uses three SQLite files; LB_TEST_BACKEND=postgres
starts three PostgreSQL servers on 127.0.0.1 (tests/support/pg_cluster.py).
Django is configured once per pytest process from a JSON file that every
coordinator started by the suite reads too (tests/testproject/settings.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.support.lb import (  # noqa: F401  (fixtures)
    ALIASES,
    BACKEND,
    CoordinatorHandle,
    coordinator,
    coordinator_path,
    lb_factory,
    replicas,
)

REPO = Path(__file__).resolve().parent.parent


def _databases(base: Path) -> dict:
    if BACKEND == "postgres":
        from tests.support.pg_cluster import PgCluster

        # fsync off for speed, but synchronous_commit on: a server crash (pg_ctl stop -m
        # immediate) must not lose commits it acknowledged, or no replica could be trusted.
        cluster = PgCluster(count=len(ALIASES), base_dir=str(base / "pg"),
                            extra_options={"synchronous_commit": "on"}).start()
        pytest.lb_pg_cluster = cluster  # type: ignore[attr-defined]
        return cluster.django_databases(ALIASES)
    return {
        alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(base / f"{alias}.sqlite3")}
        for alias in ALIASES
    }


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("LB_TEST_SKIP_SETUP"):
        return
    from tests.support.pg_cluster import free_port

    base = Path(tempfile.mkdtemp(prefix="lb_tests_"))
    os.chmod(base, 0o755)
    pytest.lb_base = base  # type: ignore[attr-defined]
    settings = {
        "DATABASES": _databases(base),
        "LOAD_BALANCER": {
            "CUD_ALGORITHM": "MULTITHREADING",
            "R_ALGORITHM": {"NAME": "ROUND_ROBIN"},
            "DATABASES": list(ALIASES),
            "WAIT_TIME": 0.5,
            "ADDRESS": {"HOST": "127.0.0.1", "PORT": free_port(), "AUTHKEY": "lb-test-authkey"},
            "JOURNAL_DIR": str(base / "journal"),
            "JOURNAL_FSYNC": False,
            "CLIENT_TIMEOUT": 20,
            "CONNECT_TIMEOUT": 5,
            "MODELS": ["plainlbapp"],   # plain models load-balanced by setting (tests/plainlbapp)
        },
    }
    config_path = base / "settings.json"
    config_path.write_text(json.dumps(settings, indent=1))
    os.environ["LB_TEST_CONFIG"] = str(config_path)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.testproject.settings"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    import django
    from django.core.management import call_command

    django.setup()
    for alias in ALIASES:
        call_command("migrate", database=alias, verbosity=0, interactive=False)


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.support.lb import stop_all_coordinators

    stop_all_coordinators()
    cluster = getattr(pytest, "lb_pg_cluster", None)
    if cluster is not None:
        cluster.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip_pg = pytest.mark.skip(reason="PostgreSQL-only test; run with LB_TEST_BACKEND=postgres")
    skip_sqlite = pytest.mark.skip(reason="SQLite-only test; run with LB_TEST_BACKEND=sqlite")
    for item in items:
        if "postgres_only" in item.keywords and BACKEND != "postgres":
            item.add_marker(skip_pg)
        if "sqlite_only" in item.keywords and BACKEND != "sqlite":
            item.add_marker(skip_sqlite)
