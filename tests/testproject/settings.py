"""Settings for the test suite.

The databases and LOAD_BALANCER come from the JSON file named by LB_TEST_CONFIG
(written by tests/conftest.py, or by a test that starts its own coordinator), so
the pytest process and every coordinator it starts read the same settings.
"""
import json
import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "django_lb_shm-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_lb_shm",
    "tests.testapp",
    "tests.plainlbapp",
]


def _default_config():
    base = Path(os.environ.get("LB_TEST_DIR") or tempfile.gettempdir()) / "django_lb_shm_default"
    base.mkdir(parents=True, exist_ok=True)
    return {
        "DATABASES": {
            alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(base / f"{alias}.sqlite3")}
            for alias in ("default", "DB1", "DB2")
        },
        "LOAD_BALANCER": {
            "CUD_ALGORITHM": "MULTITHREADING",
            "R_ALGORITHM": {"NAME": "ROUND_ROBIN"},
            "DATABASES": ["default", "DB1", "DB2"],
            "WAIT_TIME": 1,
            "ADDRESS": {"HOST": "127.0.0.1", "PORT": 46000, "AUTHKEY": "test-authkey"},
            "JOURNAL_DIR": str(base / "journal"),
            "JOURNAL_FSYNC": False,
            "MODELS": ["plainlbapp"],
        },
    }


_config_path = os.environ.get("LB_TEST_CONFIG")
_config = json.loads(Path(_config_path).read_text()) if _config_path else _default_config()
DATABASES = _config["DATABASES"]
LOAD_BALANCER = _config["LOAD_BALANCER"]
# A test that adds a migration points the app at a copy of its migrations (tests/test_schema_drift.py).
MIGRATION_MODULES = _config.get("MIGRATION_MODULES", {})

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_lb_shm": {"handlers": ["console"], "level": os.environ.get("LB_LOG_LEVEL", "INFO")}},
}
