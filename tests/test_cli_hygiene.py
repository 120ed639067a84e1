"""The command line as operators use it: pipes, --help, exit codes for monitoring, --watch, migrate's summary."""
from __future__ import annotations

import argparse
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from django_lb_shm import cli
from tests.support.lb import ALIASES, BACKEND, REPO
from tests.support.pg_cluster import free_port
from tests.test_cli import STATUS, run, settings_env

LAUNCHER = [sys.executable, "bin/djangoloadbalancer"]
MANAGE = [sys.executable, "-m", "django", "loadbalancer"]


# -- help ---------------------------------------------------------------------------------------
def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_every_option_of_every_subcommand_has_help():
    missing = [
        f"{name or '(top)'} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in subparsers(cli.build_parser()).items()
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []
    assert set(subparsers(cli.build_parser())) == {"", "run", "status", "migrate", "verify", "resync", "check"}


def fresh_sqlite_env(tmp_path: Path) -> tuple[dict, list[Path]]:
    """Settings whose load-balanced databases are new SQLite files (whatever the suite's backend)."""
    config = json.loads(Path(os.environ["LB_TEST_CONFIG"]).read_text())
    files = [tmp_path / f"{alias}.sqlite3" for alias in ALIASES]
    config["DATABASES"] = {alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}
                           for alias, path in zip(ALIASES, files)}
    path = tmp_path / "fresh.json"
    path.write_text(json.dumps(config))
    return dict(os.environ, LB_TEST_CONFIG=str(path), DJANGO_SETTINGS_MODULE="tests.testproject.settings"), files


@pytest.mark.parametrize("command", [LAUNCHER, MANAGE], ids=["djangoloadbalancer", "manage.py"])
def test_migrate_help_prints_usage_and_migrates_nothing(tmp_path, command):
    env, files = fresh_sqlite_env(tmp_path)
    result = run(command + ["migrate", "--help"], env)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "migrate" in result.stdout
    assert "manage.py help migrate" in result.stdout   # where its other options are listed
    assert "== migrating" not in result.stdout
    assert not any(f.exists() for f in files), "migrate --help created or migrated a database"


def summary(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return lines[lines.index("== summary") + 1:]


def test_migrate_ends_with_one_line_per_copy(tmp_path):
    env, _files = fresh_sqlite_env(tmp_path)
    first = run(LAUNCHER + ["migrate"], env)
    assert first.returncode == 0, first.stderr
    lines = summary(first.stdout)
    assert [line.split()[0] for line in lines] == [f"{alias}:" for alias in ALIASES]
    assert all(" migrations applied" in line for line in lines), lines
    again = run(LAUNCHER + ["migrate"], env)
    assert again.returncode == 0, again.stderr
    assert all("nothing applied" in line for line in summary(again.stdout)), again.stdout


def test_a_failed_migrate_says_which_copies_were_not_migrated(tmp_path):
    env, _files = fresh_sqlite_env(tmp_path)
    result = run(LAUNCHER + ["migrate", "no_such_app"], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = summary(result.stdout)
    assert lines[0].startswith(f"{ALIASES[0]}: FAILED") and "no_such_app" in lines[0]
    assert all("not migrated" in line for line in lines[1:]), lines


# -- pipes -------------------------------------------------------------------------------------
def test_output_to_a_closed_pipe_ends_quietly(coordinator):
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader is gone before the first line: `status | head -0`
    try:
        result = subprocess.run(STATUS, env=coordinator.env(), cwd=str(REPO), stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize("command", ["status | head -1", "status --watch 0.1 | head -2"])
def test_status_piped_to_head(coordinator, command):
    # --watch writes again after head is gone: the broken pipe is certain there.
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} bin/djangoloadbalancer {command}"],
                            env=coordinator.env(), cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert "coordinator " in result.stdout and result.stdout.count("\n") == int(command[-1])
    assert result.stderr == ""
    assert result.returncode in (0, 128 + signal.SIGPIPE)


# -- exit codes and why a copy is not RUNNING --------------------------------------------------
def test_status_exit_codes_are_stated_in_its_help():
    text = run(STATUS + ["--help"], dict(os.environ)).stdout
    for line in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {line}" in text or f"\n {line}" in text, text


def test_status_exit_1_without_a_coordinator(tmp_path):
    env, _ = settings_env(tmp_path, "nobody-home", PORT=free_port())
    assert run(STATUS, env).returncode == 1


def test_status_exit_0_when_every_copy_runs(coordinator):
    assert run(STATUS, coordinator.env()).returncode == 0


def test_a_copy_not_running_is_exit_3_and_status_says_why_and_when(lb_factory, tmp_path):
    broken = ({"NAME": str(tmp_path / "missing.sqlite3")} if BACKEND == "sqlite"
              else {"PORT": free_port()})
    handle = lb_factory("degraded", start=False, databases={"DB2": broken})
    handle.start()   # once this process's settings name the same databases (handle.status() checks)
    handle.wait_state("DB2", "DOWN", timeout=30)
    table = run(STATUS, handle.env())
    assert table.returncode == 3, table.stderr
    why = [line for line in table.stdout.splitlines() if line.startswith("DB2 is DOWN")]
    assert len(why) == 1, table.stdout
    assert "last error" in why[0] and "s ago" in why[0], why
    as_json = run(STATUS + ["--json"], handle.env())
    assert as_json.returncode == 3
    db2 = next(db for db in json.loads(as_json.stdout)["databases"] if db["name"] == "DB2")
    assert db2["last_error"] and db2["last_error_at"] > 0 and db2["state_age_s"] >= 0
    running = [db for db in json.loads(as_json.stdout)["databases"] if db["name"] != "DB2"]
    assert all(db["last_error"] == "" for db in running)


# -- --watch -------------------------------------------------------------------------------------
def test_watch_without_a_terminal_prints_each_refresh_and_stops_after_count(coordinator):
    result = run(STATUS + ["--watch", "0.2", "--count", "3"], coordinator.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\ncoordinator ") + result.stdout.startswith("coordinator ") == 3
    assert "\x1b[" not in result.stdout


def test_watch_on_a_terminal_redraws_in_place_and_ctrl_c_exits_0(coordinator):
    main, child = pty.openpty()
    env = {**coordinator.env(), "PYTHONFAULTHANDLER": "1"}   # a hang shows its stack (SIGABRT below)
    # As from a terminal: SIGINT not ignored (a shell's background job, as CI may run the suite,
    # ignores it, and a child that inherits SIG_IGN never sees the Ctrl-C below).
    process = subprocess.Popen(STATUS + ["--watch", "0.2"], env=env, cwd=str(REPO),
                               stdin=child, stdout=child, stderr=child, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H") < 2 and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 65536)
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < deadline:   # a terminal reads on: its last
            if select.select([main], [], [], 0.1)[0]:                   # redraw must not block its exit
                try:
                    seen += os.read(main, 65536)
                except OSError:   # the child side is closed: it has exited
                    break
        if process.poll() is None:   # still running 15 s after Ctrl-C: where it hangs, then fail
            process.send_signal(signal.SIGABRT)
            time.sleep(1.0)
            while select.select([main], [], [], 0.2)[0]:
                try:
                    seen += os.read(main, 65536)
                except OSError:
                    break
            raise AssertionError(f"status --watch did not exit after Ctrl-C:\n{seen[-6000:].decode(errors='replace')}")
        assert process.wait(5) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)
    assert seen.count(b"\x1b[H") >= 2, seen[-2000:]
    assert b"coordinator " in seen and b"Traceback" not in seen
