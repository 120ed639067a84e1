"""Issue 14 item 6: other local users cannot block or mislead the load balancer.

Real coordinator processes and a real throw-away OS user (root only: the tests add the
user and always remove it, and what it planted in /dev/shm).  The shared-memory segment's
name carries the uid, and a segment another user owns (or could write) is never used,
trusted or reclaimed: the coordinator refuses it clearly, app processes take the
coordinator path.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from django_lb_shm.client import reads
from django_lb_shm.settings.config import get_config
from django_lb_shm.errors import SharedMemoryNotOwned
from django_lb_shm.client.reads import zero_hop_reader
from django_lb_shm.shm.state import SharedState, segment_name
from tests.support.lb import ALIASES, LAUNCHER, REPO
from tests.support.users import fake_segment, plant, throwaway_user
from tests.testapp.models import Author

SEGMENT_SIZE = SharedState.size_for(len(ALIASES))


@pytest.fixture
def other_user():
    if os.getuid() != 0:
        pytest.skip("needs root to add a throw-away user")
    with throwaway_user() as user:
        yield user


def reset_reader() -> None:
    reads._reader, reads._reader_key, reads._next_try = None, (), 0.0
    reads._warned.clear()


def a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def per_copy(handle, field: str) -> int:
    return sum(d[field] for d in handle.status()["databases"])


# An app process of the other user.  The suite's interpreter may not be runnable by that
# user (here it lives under /root, mode 0700): then the process starts as root, loads what
# its reads need on the coordinator path, closes every connection and becomes that user for
# good (uid, gid, no supplementary groups) before its first read with READ_PATH 'AUTO'.
APP_OF_THE_OTHER_USER = textwrap.dedent("""
    import json, os, pwd, sys
    from tests.support.workers import setup_child
    setup_child(sys.argv[1], {"READ_PATH": "COORDINATOR"})
    from django.conf import settings
    from django.db import connections
    from django_lb_shm.client.connection import get_client
    from django_lb_shm.client.reads import zero_hop_reader
    from tests.support.users import drop_to
    from tests.testapp.models import Author
    user = pwd.getpwnam(sys.argv[2])
    warm_up = int(os.getuid() != user.pw_uid)
    if warm_up:
        list(Author.objects.filter(name__startswith="x").values_list("name", flat=True))
        get_client().forget_connection()
        connections.close_all()
        drop_to(user)
    settings.LOAD_BALANCER = dict(settings.LOAD_BALANCER, READ_PATH="AUTO")
    names = [sorted(Author.objects.filter(name__startswith="x").values_list("name", flat=True)) for _ in range(12)]
    print(json.dumps({"uid": os.getuid(), "names": names, "zero_hop": zero_hop_reader() is not None,
                      "warm_up_reads": warm_up}))
""")


def run_app_of(user, settings_json: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", HOME="/tmp")
    as_that_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        subprocess.run([sys.executable, "-c", "import django"], cwd="/tmp", env=env, capture_output=True,
                       timeout=60, check=True, **as_that_user)
    except (PermissionError, subprocess.CalledProcessError):
        as_that_user = {}   # the script drops to the user itself
    done = subprocess.run([sys.executable, "-c", APP_OF_THE_OTHER_USER, str(settings_json), user.pw_name],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120, **as_that_user)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_segment_another_user_planted_under_the_port_blocks_nothing(lb_factory, other_user):
    # The name the segment had before it carried the uid, with a live "supervisor" (pid 1) in it:
    # it used to keep the coordinator from starting (exit 3).
    handle = lb_factory("planted", start=False)
    port = handle.lb["ADDRESS"]["PORT"]
    planted = plant(other_user, f"django_lb_shm_{port}", fake_segment(len(ALIASES), 1, SEGMENT_SIZE))
    content = planted.read_bytes()
    handle.start()
    assert handle.segment_name == f"django_lb_shm_{os.getuid()}_{port}"
    assert Path("/dev/shm", handle.segment_name).stat().st_uid == os.getuid()

    names = [f"x-{n}" for n in range(3)]
    for name in names:
        Author.objects.create(name=name)
    handle.wait_drained()

    # This (root's) app process reads zero-hop, from the coordinator's segment only.
    reset_reader()
    zero_hop_before = per_copy(handle, "zero_hop_reads")
    for _ in range(9):
        assert sorted(Author.objects.values_list("name", flat=True)) == names
    reader = zero_hop_reader()
    assert reader is not None and reader.shared.shm.name == handle.segment_name
    assert per_copy(handle, "zero_hop_reads") - zero_hop_before == 9

    # An app process of the other user: its own uid's segment does not exist; the coordinator path answers.
    coordinator_before = per_copy(handle, "coordinator_reads")
    outcome = run_app_of(other_user, handle.config_path)
    warm_up = outcome.pop("warm_up_reads")
    assert outcome == {"uid": other_user.pw_uid, "names": [names] * 12, "zero_hop": False}, outcome
    assert per_copy(handle, "coordinator_reads") - coordinator_before == 12 + warm_up

    assert planted.read_bytes() == content and planted.stat().st_uid == other_user.pw_uid   # untouched


def test_a_segment_under_this_users_name_planted_by_another_user_is_refused_and_left_alone(lb_factory,
                                                                                           other_user):
    # A dead "supervisor" in it: the coordinator's own stale segment would be reclaimed, this one must not be.
    handle = lb_factory("refused", start=False)
    name = handle.segment_name
    planted = plant(other_user, name, fake_segment(len(ALIASES), a_dead_pid(), SEGMENT_SIZE))
    content = planted.read_bytes()
    result = subprocess.run([sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=handle.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    owner = f"{other_user.pw_name} (uid {other_user.pw_uid})"
    assert f"shared memory segment /dev/shm/{name} belongs to {owner}, not to this user, root (uid 0)" \
        in result.stderr, result.stderr
    assert "neither used nor removed" in result.stderr
    assert planted.read_bytes() == content and planted.stat().st_uid == other_user.pw_uid


def test_an_app_process_never_attaches_a_segment_another_user_owns(lb_factory, other_user, caplog):
    lb_factory("foreign", start=False)   # nobody serves this address: the planted segment is all there is
    name = segment_name(get_config().address)
    planted = plant(other_user, name, fake_segment(len(ALIASES), 1, SEGMENT_SIZE))
    with pytest.raises(SharedMemoryNotOwned, match=f"belongs to {other_user.pw_name}"):
        SharedState.attach_untracked(name)
    with pytest.raises(SharedMemoryNotOwned, match=f"belongs to {other_user.pw_name}"):
        SharedState.attach(name)   # the coordinator's way (resource tracker)
    reset_reader()
    with caplog.at_level(logging.WARNING, logger="django_lb_shm.reads"):
        assert zero_hop_reader() is None
    assert f"reads go through the coordinator: cannot use shared memory segment {name!r}" in caplog.text
    assert f"/dev/shm/{name} belongs to {other_user.pw_name}" in caplog.text
    assert planted.exists() and planted.stat().st_uid == other_user.pw_uid


def test_a_segment_of_this_user_that_others_could_write_is_not_read():
    name = f"django_lb_shm_{os.getuid()}_writable{os.getpid()}"
    path = Path("/dev/shm", name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, fake_segment(len(ALIASES), os.getpid(), SEGMENT_SIZE))
        os.fchmod(fd, 0o666)
        with pytest.raises(SharedMemoryNotOwned, match="is writable by other users"):
            SharedState.attach_untracked(name)
        os.fchmod(fd, 0o600)
        SharedState.attach_untracked(name).close()
    finally:
        os.close(fd)
        path.unlink()
