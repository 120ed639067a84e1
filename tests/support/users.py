"""A throw-away OS user for the tests of what other local users can do (root only).

``throwaway_user`` adds one and always removes it (and what it planted under /dev/shm),
even when the test fails.  ``as_user`` runs a function in a forked child that has
dropped to that user (real, effective and saved uid and gid; no supplementary groups).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import struct
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def throwaway_user(prefix: str = "lbu") -> Iterator[pwd.struct_passwd]:
    name = f"{prefix}{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        user = pwd.getpwnam(name)
        try:
            yield user
        finally:
            remove_files_of(user.pw_uid, Path("/dev/shm"))
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def remove_files_of(uid: int, directory: Path) -> None:
    for path in directory.iterdir():
        try:
            if path.lstat().st_uid == uid:
                path.unlink()
        except OSError:
            pass


def drop_to(user: pwd.struct_passwd) -> None:
    """This process becomes ``user``, for good."""
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def as_user(user: pwd.struct_passwd, func: Callable[..., Any], *args: Any) -> int:
    """Run ``func(*args)`` in a forked child as ``user``; its exit code (0 when it returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            drop_to(user)
            func(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fake_segment(n_databases: int, supervisor_pid: int, size: int) -> bytes:
    """What a django_lb_shm segment's header looks like, with a chosen supervisor pid."""
    from django_lb_shm.shm.state import LAYOUT_VERSION, MAGIC

    header = struct.pack("4d", MAGIC, LAYOUT_VERSION, n_databases, supervisor_pid)
    return header + bytes(size - len(header))


def plant(user: pwd.struct_passwd, name: str, content: bytes, mode: int = 0o666) -> Path:
    """/dev/shm/<name>, created by ``user`` (as another user would, before the coordinator starts)."""
    path = Path("/dev/shm", name)

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)   # past the umask
            os.write(fd, content)
        finally:
            os.close(fd)

    assert as_user(user, write) == 0, f"{user.pw_name} could not create {path}"
    assert path.lstat().st_uid == user.pw_uid
    return path
