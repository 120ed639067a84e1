"""Races of the write order, forced at one point, each in a process of its own
(tests/support/race_scenarios.py: real SQLite files, threads, journal and sequencer)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.lb import REPO
from tests.support.race_scenarios_names import SCENARIOS


@pytest.mark.parametrize("name", SCENARIOS)
def test_race(name):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "-m", "tests.support.race_scenarios", name], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "scenario passed" in done.stdout, done.stdout + done.stderr
