"""Plain Django: Django's own tests/test_sqlite.py, plus the recording runner."""
from test_sqlite import *  # noqa: F401,F403  (on the path: runtests.py runs in Django's tests/)

TEST_RUNNER = "djsuite_runner.RecordingRunner"
