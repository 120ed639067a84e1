"""Plain Django: Django's own tests/test_sqlite.py (or with_postgres.py's first server), plus the recording runner."""
import json
import os

from test_sqlite import *  # noqa: F401,F403  (on the path: runtests.py runs in Django's tests/)

if os.environ.get("DJSUITE_DATABASES"):
    DATABASES = {alias: settings for alias, settings in json.loads(os.environ["DJSUITE_DATABASES"]).items()
                 if alias in ("default", "other")}
TEST_RUNNER = "djsuite_runner.RecordingRunner"
