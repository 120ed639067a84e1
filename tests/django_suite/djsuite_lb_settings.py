"""Django's test_sqlite.py with the test apps' models load-balanced over 3 SQLite files (or PostgreSQL).

'default', 'DB1' and 'DB2' are the copies; 'other' (Django's multi-database tests) stays plain.
runtests.py replaces INSTALLED_APPS at run time: run_lb.py adds 'django_lb_shm' to it.
"""
import json
import os

from test_sqlite import *  # noqa: F401,F403

_WORK = os.environ.get("DJSUITE_WORK") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "djsuite")
os.makedirs(_WORK, exist_ok=True)
DJSUITE_APPS = os.environ.get("DJSUITE_APPS", "").split()

DATABASES = json.loads(os.environ["DJSUITE_DATABASES"]) if os.environ.get("DJSUITE_DATABASES") else {
    alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(_WORK, f"{alias}.sqlite3")}
    for alias in ("default", "other", "DB1", "DB2")
}   # DJSUITE_DATABASES: with_postgres.py's servers
LOAD_BALANCER = {
    "DATABASES": ["default", "DB1", "DB2"],
    "ADDRESS": {"HOST": "127.0.0.1", "PORT": 46999, "AUTHKEY": "djsuite-not-secret"},   # the runner picks a port
    "JOURNAL_DIR": os.path.join(_WORK, "journal"),
    "JOURNAL_FSYNC": False,
    # Their generic relations point at ContentType, which auth and admin point at: all load-balanced
    # (checks E023/E024 otherwise).
    "MODELS": DJSUITE_APPS + ["contenttypes", "auth", "admin"],
}
TEST_RUNNER = "djsuite_runner.VerifyingLoadBalancerRunner"
