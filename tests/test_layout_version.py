"""LAYOUT_VERSION is checked on attach, with a real shared memory segment: another version's
segment is refused with an error that names both versions and what to do, and an app process
keeps the coordinator path instead of misreading it (a whole coordinator: test_zero_hop_reads)."""
from __future__ import annotations

import logging
import os
import socket
import types

import pytest

from django_lb_shm.client import reads
from django_lb_shm.settings.config import Address
from django_lb_shm.shm.state import LAYOUT_VERSION, Header, LayoutMismatch, SharedState, segment_name


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def other_version_segment():
    """A segment laid out by this version, then stamped with the next one; the address it serves."""
    address = Address(host="127.0.0.1", port=_unused_port(), authkey=b"k" * 32)
    name = segment_name(address)
    state = SharedState.create(name, 1, aliases=("default",))
    state.set_header(Header.VERSION, LAYOUT_VERSION + 1)
    try:
        yield address, name
    finally:
        state.unlink()


def test_another_layout_version_is_refused_naming_both_and_what_to_do(other_version_segment):
    _address, name = other_version_segment
    with pytest.raises(LayoutMismatch) as caught:
        SharedState.attach_untracked(name)   # as an app process attaches
    message = str(caught.value)
    assert f"layout version {LAYOUT_VERSION + 1}, this django_lb_shm reads version {LAYOUT_VERSION}" in message
    assert "restart the coordinator" in message and "app processes" in message


def test_an_app_process_keeps_the_coordinator_path(other_version_segment, caplog):
    address, name = other_version_segment
    config = types.SimpleNamespace(address=address, databases=("default",))
    saved = reads._reader, reads._reader_key, reads._next_try
    reads._reader, reads._reader_key, reads._next_try = None, (), 0.0
    try:
        with caplog.at_level(logging.WARNING, logger="django_lb_shm.reads"):
            assert reads._build(config) is None
        assert reads._reader is None
        assert f"cannot use shared memory segment {name!r} (LayoutMismatch" in caplog.text
        assert "restart the coordinator" in caplog.text
    finally:
        reads._warned.clear()
        reads._reader, reads._reader_key, reads._next_try = saved
    assert os.path.exists(os.path.join("/dev/shm", name)) or not os.path.isdir("/dev/shm")
