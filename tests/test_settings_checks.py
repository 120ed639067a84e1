"""System checks for settings.LOAD_BALANCER (django_lb_shm.E0xx / W0xx).

The checks are pure functions: called under override_settings(LOAD_BALANCER=...),
or through conf.find_problems(raw, databases) when settings.DATABASES would have
to change.  Then the same checks seen from `manage.py check` and from the
launcher, which must refuse to start anything.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.conf import settings
from django.core import checks
from django.test import override_settings

from django_lb_shm.checks import check_load_balancer_settings
from django_lb_shm.settings.validation import find_problems
from tests.support.lb import REPO
from tests.support.pg_cluster import free_port

# The seed README's example, verbatim.
SEED_LOAD_BALANCER = {
    'CUD_ALGORITHM': 'MULTITHREADING',
    'R_ALGORITHM': {
        'NAME': 'ROUND_ROBIN',
    },
    'DATABASES': ['default', 'DB1', 'DB2', 'DB3', 'DB4'],
    'WAIT_TIME': 2,
    'ADDRESS': {
        'HOST': 'localhost',
        'PORT': 6000,
        'AUTHKEY': 'pass'
    }
}


def sqlite_databases(*aliases: str) -> dict:
    return {a: {"ENGINE": "django.db.backends.sqlite3", "NAME": f"/srv/app/{a}.sqlite3"} for a in aliases}


SEED_DATABASES = sqlite_databases("default", "DB1", "DB2", "DB3", "DB4")


def valid() -> dict:
    """The test project's own (valid) LOAD_BALANCER, to break one key at a time."""
    return copy.deepcopy(settings.LOAD_BALANCER)


def run_check(load_balancer) -> list[checks.CheckMessage]:
    with override_settings(LOAD_BALANCER=load_balancer):
        return check_load_balancer_settings()


def ids(messages) -> list[str]:
    return [m.id for m in messages]


# -- valid settings -------------------------------------------------------------------------------
def test_seed_readme_settings_give_no_problem():
    assert find_problems(SEED_LOAD_BALANCER, SEED_DATABASES) == []


def test_the_test_project_settings_pass_the_registered_check():
    assert check_load_balancer_settings() == []
    assert run_check(valid()) == []
    registered = checks.run_checks(tags=["django_lb_shm"])
    assert [m for m in registered if m.id and m.id.startswith("django_lb_shm")] == []


@pytest.mark.parametrize("algorithm", [
    {"NAME": "INTERVAL_TIME", "INTERVAL": 5},
    {"NAME": "INTERVAL_TIME", "INTERVAL": 0.25},
    {"NAME": "INTERVAL_TIME"},
    {"NAME": "LEAST_CONNECTIONS"},
    {"NAME": "INTERVAL_NUMBER_OF_CONNECTIONS", "INTERVAL": 2},
])
def test_read_algorithms_with_an_interval_are_accepted(algorithm):
    assert run_check(dict(valid(), R_ALGORITHM=algorithm)) == []
    seed = dict(SEED_LOAD_BALANCER, R_ALGORITHM=algorithm)
    assert find_problems(seed, SEED_DATABASES) == []


def test_authkey_from_the_environment(monkeypatch):
    lb = valid()
    lb["ADDRESS"] = {"HOST": "127.0.0.1", "PORT": 6000, "AUTHKEY_ENV": "LB_TEST_SECRET_KEY"}
    monkeypatch.setenv("LB_TEST_SECRET_KEY", "from-the-environment")
    assert run_check(lb) == []
    monkeypatch.delenv("LB_TEST_SECRET_KEY")
    [message] = run_check(lb)
    assert message.id == "django_lb_shm.E010" and "AUTHKEY" in message.msg


# -- one bad key at a time --------------------------------------------------------------------------
def _with(path: tuple, value):
    lb = valid()
    target = lb
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return lb


_DELETE = object()

BAD = [
    # (path, value, id, text the message must contain)
    (("R_ALGORITHM", "NAME"), "FASTEST", "django_lb_shm.E005", "'FASTEST'"),
    (("R_ALGORITHM",), "ROUND_ROBIN", "django_lb_shm.E005", "R_ALGORITHM"),
    (("DATABASES",), ["default", "DB1", "DB9"], "django_lb_shm.E003", "'DB9'"),
    (("ADDRESS", "AUTHKEY"), _DELETE, "django_lb_shm.E010", "AUTHKEY"),
    (("ADDRESS", "AUTHKEY"), "", "django_lb_shm.E010", "AUTHKEY"),
    (("WAIT_TIME",), 0, "django_lb_shm.E007", "WAIT_TIME"),
    (("WAIT_TIME",), -2, "django_lb_shm.E007", "WAIT_TIME"),
    (("WAIT_TIME",), "2", "django_lb_shm.E007", "WAIT_TIME"),
    (("ADDRESS", "PORT"), 0, "django_lb_shm.E009", "PORT"),
    (("ADDRESS", "PORT"), 70000, "django_lb_shm.E009", "70000"),
    (("ADDRESS", "PORT"), "abc", "django_lb_shm.E009", "'abc'"),
    (("ADDRESS", "PORT"), True, "django_lb_shm.E009", "True"),
    (("CUD_ALGORITHM",), "SEQUENTIAL", "django_lb_shm.E004", "CUD_ALGORITHM"),
    (("WRITE_ACK",), "MOST", "django_lb_shm.E014", "WRITE_ACK"),
    (("R_ALGORITHM", "INTERVAL"), 0, "django_lb_shm.E006", "INTERVAL"),
]


@pytest.mark.parametrize("path,value,check_id,text", BAD,
                         ids=[f"{'.'.join(p)}={v if v is not _DELETE else 'missing'!r}" for p, v, *_ in BAD])
def test_each_bad_value_has_its_own_stable_id(path, value, check_id, text):
    messages = run_check(_with(path, value))
    assert ids(messages) == [check_id]
    [message] = messages
    assert isinstance(message, checks.Error) and message.is_serious()
    assert path[0] in message.msg and text in message.msg
    assert message.hint and message.obj == "LOAD_BALANCER"


def test_unknown_key_is_a_warning_naming_it():
    messages = run_check(dict(valid(), WAIT_TIMES=3))
    assert ids(messages) == ["django_lb_shm.W001"]
    assert isinstance(messages[0], checks.Warning) and not messages[0].is_serious()
    assert "WAIT_TIMES" in messages[0].msg and "WAIT_TIME" in messages[0].hint


def test_missing_load_balancer_setting():
    with override_settings():
        del settings.LOAD_BALANCER
        messages = check_load_balancer_settings()
    assert ids(messages) == ["django_lb_shm.E001"]
    assert "LOAD_BALANCER" in messages[0].msg and "not defined" in messages[0].msg
    assert ids(run_check("ROUND_ROBIN")) == ["django_lb_shm.E001"]


def test_mixed_engines():
    databases = sqlite_databases("default", "DB2")
    databases["DB1"] = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "db1"}
    problems = find_problems(dict(valid(), DATABASES=["default", "DB1", "DB2"]), databases)
    assert [p.id for p in problems] == ["django_lb_shm.E012"]
    assert "DB1=postgresql" in problems[0].msg and "default=sqlite" in problems[0].msg


@pytest.mark.parametrize("name", [":memory:", "file:memdb1?mode=memory&cache=shared", ""])
def test_in_memory_sqlite(name):
    databases = sqlite_databases("default", "DB1", "DB2")
    databases["DB1"]["NAME"] = name
    problems = find_problems(valid(), databases)
    assert [p.id for p in problems] == ["django_lb_shm.E013"]
    assert "'DB1'" in problems[0].msg


def test_alias_missing_from_settings_databases_names_the_defined_ones():
    problems = find_problems(SEED_LOAD_BALANCER, sqlite_databases("default", "DB1", "DB2"))
    assert [p.id for p in problems] == ["django_lb_shm.E003"]
    assert "'DB3'" in problems[0].msg and "'DB4'" in problems[0].msg
    assert "default" in problems[0].hint and "DB2" in problems[0].hint


def test_several_problems_are_all_reported():
    lb = dict(valid(), WAIT_TIME=0, WRITE_ACK="MOST", CUD_ALGORITHM="X")
    assert sorted(ids(run_check(lb))) == ["django_lb_shm.E004", "django_lb_shm.E007", "django_lb_shm.E014"]


def test_django_check_framework_runs_it():
    with override_settings(LOAD_BALANCER=dict(valid(), WAIT_TIME=-1)):
        found = checks.run_checks()
    assert "django_lb_shm.E007" in ids(found)


# -- the same checks from the command line -------------------------------------------------------
@pytest.fixture
def bad_wait_time(tmp_path) -> tuple[dict, dict]:
    """(env, LOAD_BALANCER) for a copy of the suite's settings JSON with WAIT_TIME = 0 on a fresh port."""
    config = json.loads(Path(os.environ["LB_TEST_CONFIG"]).read_text())
    lb = config["LOAD_BALANCER"]
    lb["WAIT_TIME"] = 0
    lb["ADDRESS"]["PORT"] = free_port()
    lb["JOURNAL_DIR"] = str(tmp_path / "journal")
    path = tmp_path / "bad-settings.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, LB_TEST_CONFIG=str(path), DJANGO_SETTINGS_MODULE="tests.testproject.settings")
    return env, lb


def test_manage_py_check_reports_the_id(bad_wait_time):
    env, _lb = bad_wait_time
    result = subprocess.run([sys.executable, "-m", "django", "check"], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "django_lb_shm.E007" in result.stderr and "WAIT_TIME" in result.stderr


def test_launcher_refuses_to_start_with_bad_settings(bad_wait_time):
    env, lb = bad_wait_time
    port = lb["ADDRESS"]["PORT"]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "bin/djangoloadbalancer", "run"], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    children: set[int] = set()
    while proc.poll() is None and time.monotonic() - started < 30:
        try:
            children.update(c.pid for c in launcher.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - started

    assert proc.returncode == 2, out + err
    assert elapsed < 15
    assert "django_lb_shm.E007" in err and "nothing was started" in err
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    assert not [p.pid for p in psutil.process_iter(["environ"])
                if (p.info.get("environ") or {}).get("LB_TEST_CONFIG") == env["LB_TEST_CONFIG"]]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    try:
        listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                     and c.status == psutil.CONN_LISTEN]
    except psutil.AccessDenied:  # not root: the connection attempt above must do
        listening = []
    assert listening == []
    assert not [p for p in Path("/dev/shm").glob(f"django_lb_shm_*{port}")]   # no segment, old or new name
    assert not Path(lb["JOURNAL_DIR"]).exists()


# -- relations between load-balanced models and the others (E023, E024, W002) ------------------------
from django.contrib.contenttypes.models import ContentType  # noqa: E402
from django.db import models  # noqa: E402
from django.test.utils import isolate_apps  # noqa: E402

from django_lb_shm import LoadBalancerManager, LoadBalancerModel  # noqa: E402
from django_lb_shm.checks import _manager_problems, _relation_problems, check_load_balanced_models  # noqa: E402


def test_the_suite_project_has_no_relation_or_manager_problems():
    assert check_load_balanced_models() == []


@isolate_apps("tests.testapp")
def test_a_load_balanced_model_pointing_at_a_plain_one_is_an_error():
    class Owner(models.Model):
        class Meta:
            app_label = "testapp"

    class Pet(LoadBalancerModel):
        owner = models.ForeignKey(Owner, on_delete=models.CASCADE)
        friends = models.ManyToManyField(Owner, related_name="friends")
        kind = models.ForeignKey(ContentType, on_delete=models.CASCADE)   # the same on every copy: fine

        class Meta:
            app_label = "testapp"

    problems = _relation_problems(Pet)
    assert ids(problems) == ["django_lb_shm.E023", "django_lb_shm.E023"]
    assert "testapp.Pet.owner relates the load-balanced testapp.Pet to testapp.Owner" in problems[0].msg
    assert "Make Owner a LoadBalancerModel" in problems[0].hint
    assert "testapp.Pet.friends" in problems[1].msg


@isolate_apps("tests.testapp")
def test_a_plain_model_may_point_at_load_balanced_rows_only_without_constraint_or_cascade():
    class Shelf(LoadBalancerModel):
        class Meta:
            app_label = "testapp"

    class Cascading(models.Model):
        shelf = models.ForeignKey(Shelf, on_delete=models.CASCADE)

        class Meta:
            app_label = "testapp"

    class Loose(models.Model):
        shelf = models.ForeignKey(Shelf, on_delete=models.DO_NOTHING, db_constraint=False)

        class Meta:
            app_label = "testapp"

    class Tagging(models.Model):
        shelves = models.ManyToManyField(Shelf)

        class Meta:
            app_label = "testapp"

    problems = _relation_problems(Cascading)
    assert ids(problems) == ["django_lb_shm.E024"]
    assert "on_delete=models.DO_NOTHING and db_constraint=False" in problems[0].hint
    assert _relation_problems(Loose) == []
    assert ids(_relation_problems(Tagging)) == ["django_lb_shm.E023"]


@isolate_apps("tests.testapp")
def test_a_plain_manager_on_a_load_balanced_model_is_a_warning():
    class Plain(LoadBalancerModel):
        objects = models.Manager()

        class Meta:
            app_label = "testapp"

    class Custom(LoadBalancerModel):
        objects = LoadBalancerManager()
        recent = type("RecentManager", (LoadBalancerManager,), {})()

        class Meta:
            app_label = "testapp"

    warnings = _manager_problems(Plain)
    assert ids(warnings) == ["django_lb_shm.W002"]
    assert "testapp.Plain.objects" in warnings[0].msg and "LoadBalancerManager" in warnings[0].hint
    assert _manager_problems(Custom) == []


def test_log_level_must_be_a_level_name_and_a_tiny_rss_limit_is_a_warning():
    from django.conf import settings

    from django_lb_shm.settings.config import build_config

    assert ids(run_check({**valid(), "LOG_LEVEL": "verbose"})) == ["django_lb_shm.E025"]
    assert run_check({**valid(), "LOG_LEVEL": "debug"}) == []
    assert build_config({**valid(), "LOG_LEVEL": "debug"}, settings.DATABASES).log_level == "DEBUG"
    assert ids(run_check({**valid(), "MAX_RSS_MB": 54})) == ["django_lb_shm.W003"]
    assert run_check({**valid(), "MAX_RSS_MB": 400}) == [] and run_check({**valid(), "MAX_RSS_MB": 0}) == []


def test_the_default_journal_dir_follows_the_databases_not_the_port(tmp_path):
    from django_lb_shm.settings.config import build_config

    base = valid()
    base.pop("JOURNAL_DIR", None)
    databases = sqlite_databases(*base["DATABASES"])
    first = dict(base, ADDRESS={"HOST": "127.0.0.1", "PORT": 5001, "AUTHKEY": "x"})
    moved = dict(base, ADDRESS={"HOST": "127.0.0.1", "PORT": 5002, "AUTHKEY": "x"})
    with override_settings(BASE_DIR=tmp_path):
        a, b = build_config(first, databases), build_config(moved, databases)
        other = build_config(first, dict(databases, DB1={**databases["DB1"], "NAME": "elsewhere.sqlite3"}))
    assert a.journal_dir == b.journal_dir and a.journal_dir.startswith(str(tmp_path / ".loadbalancer-journal"))
    assert other.journal_dir != a.journal_dir                       # other databases: another journal
    assert a.legacy_journal_dirs == (str(tmp_path / ".loadbalancer-journal" / "5001"),)   # imported once
    explicit = build_config(dict(first, JOURNAL_DIR=str(tmp_path / "j")), databases)
    assert explicit.journal_dir == str(tmp_path / "j") and explicit.legacy_journal_dirs == ()


# -- INSTALLED_APPS, with real settings modules ---------------------------------------------------
def project_check(tmp_path: Path, installed_apps: list[str], *command: str) -> subprocess.CompletedProcess:
    """`python -m django <command>` with the suite's settings but these INSTALLED_APPS."""
    (tmp_path / "apps_settings.py").write_text(
        "from tests.testproject.settings import *  # noqa\n"
        f"INSTALLED_APPS = {installed_apps!r}\n"
        "STATIC_URL = 'static/'\n"
    )
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="apps_settings",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "django", *(command or ("check",))], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=60)


def test_a_load_balanced_model_without_the_app_installed_is_an_error(tmp_path):
    result = project_check(tmp_path, ["django.contrib.contenttypes", "django.contrib.auth", "tests.testapp"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "django_lb_shm.E030" in result.stderr
    assert "'django_lb_shm' is not in INSTALLED_APPS" in result.stderr
    assert "testapp.Author" in result.stderr


def test_the_app_may_come_after_staticfiles(tmp_path):
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.staticfiles",
            "django_lb_shm", "tests.testapp", "tests.plainlbapp"]   # (the suite's LOAD_BALANCER['MODELS'])
    result = project_check(tmp_path, apps)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    assert project_check(tmp_path, apps, "help", "loadbalancer").returncode == 0
    assert "runserver" in project_check(tmp_path, apps, "help").stdout
