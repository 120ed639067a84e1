"""The private names of multiprocessing that django_lb_shm relies on (django_lb_shm/wire/mp_private.py,
and shm/state.py for shared memory): one test each, so that a Python upgrade that removes or
changes one fails here, naming the attribute and the Python version, before anything subtler."""
from __future__ import annotations

import inspect
import os
import platform
import secrets
import threading
from multiprocessing import connection as mp_connection
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.managers import BaseManager, BaseProxy, Server, State

import pytest

from django_lb_shm.wire import mp_private

PY = f"Python {platform.python_version()}"


def lost(name: str, what: str) -> str:
    return f"{name} {what} on {PY}: django_lb_shm/wire/mp_private.py (or shm/state.py) must follow the change"


class _Manager(BaseManager):
    pass


class _Served:
    def hello(self) -> str:
        return "hi"


_Manager.register("served", callable=_Served, exposed=("hello",))


def _serve(server: Server) -> None:
    try:
        server.serve_forever()
    except SystemExit:   # how serve_forever ends once stop_event is set
        pass


@pytest.fixture
def server_and_proxy():
    """A real Manager server on a loopback port, and a proxy of its object."""
    authkey = secrets.token_bytes(16)
    manager = _Manager(address=("127.0.0.1", 0), authkey=authkey)
    server = manager.get_server()
    thread = threading.Thread(target=_serve, args=(server,), daemon=True)
    thread.start()
    client = _Manager(address=server.address, authkey=authkey)
    client.connect()
    proxy = client.served()
    try:
        yield server, client, proxy
    finally:
        server.stop_event.set()
        try:   # wake the accept loop
            mp_connection.Client(server.address, authkey=authkey).close()
        except Exception:
            pass
        thread.join(5)


def test_basemanager_client_attribute():
    manager = _Manager(address=("127.0.0.1", 1), authkey=b"k")
    assert hasattr(manager, "_Client"), lost("BaseManager._Client", "is gone")
    mp_private.set_manager_client(manager, len)
    assert manager._Client is len


def test_basemanager_state_attribute():
    manager = _Manager(address=("127.0.0.1", 1), authkey=b"k")
    assert hasattr(manager, "_state") and hasattr(manager._state, "value"), lost("BaseManager._state", "is gone")
    assert manager._state.value == State.INITIAL, lost("BaseManager._state.value", "starts elsewhere")
    mp_private.mark_manager_started(manager)
    assert manager._state.value == State.STARTED


def test_baseproxy_address_to_local():
    assert isinstance(getattr(BaseProxy, "_address_to_local", None), dict), \
        lost("BaseProxy._address_to_local", "is no longer a dict")
    mp_private.forget_proxy_connections()
    assert BaseProxy._address_to_local == {}


@pytest.mark.parametrize("name", ["_Client", "_connect", "_id", "_token", "_tls"])
def test_baseproxy_attribute(server_and_proxy, name):
    _server, _client, proxy = server_and_proxy
    assert hasattr(proxy, name), lost(f"BaseProxy.{name}", "is gone")


def test_baseproxy_client_connect_id_token(server_and_proxy):
    server, _client, proxy = server_and_proxy
    assert mp_private.proxy_address(proxy) == server.address, lost("BaseProxy._token.address", "changed")
    assert mp_private.served_object(server, mp_private.proxy_object_id(proxy)) is not None, \
        lost("BaseProxy._id / Server.id_to_obj", "no longer match")
    mp_private.set_proxy_client(proxy, mp_connection.Client)
    proxy._tls.__dict__.pop("connection", None)
    mp_private.connect_proxy(proxy)
    assert hasattr(proxy._tls, "connection"), lost("BaseProxy._connect", "no longer sets _tls.connection")
    assert proxy.hello() == "hi"


def test_server_id_to_obj_and_public(server_and_proxy):
    server, _client, proxy = server_and_proxy
    assert isinstance(getattr(server, "id_to_obj", None), dict), lost("Server.id_to_obj", "is gone")
    obj, exposed = mp_private.served_object(server, mp_private.proxy_object_id(proxy))
    assert isinstance(obj, _Served) and "hello" in exposed, lost("Server.id_to_obj's (obj, exposed, ...)", "changed")
    assert mp_private.served_object(server, "no such id") is None
    assert "create" in mp_private.server_public_calls(server), lost("Server.public", "changed")


def test_server_handle_request_and_serve_client_exist():
    # ManagerServer overrides handle_request and calls serve_client (SystemExit at the end).
    assert list(inspect.signature(Server.handle_request).parameters) == ["self", "conn"], \
        lost("Server.handle_request(conn)", "changed its signature")
    assert callable(getattr(Server, "serve_client", None)), lost("Server.serve_client", "is gone")


def test_listener_socket_backlog():
    listener = mp_connection.Listener(("127.0.0.1", 0))
    try:
        assert hasattr(getattr(listener, "_listener", None), "_socket"), lost("Listener._listener._socket", "is gone")
        mp_private.set_listen_backlog(listener, 64)
    finally:
        listener.close()


def test_connection_class_can_be_adopted_and_its_private_reads():
    class Sub(mp_connection.Connection):
        pass

    left, right = mp_connection.Pipe()
    try:
        mp_private.adopt_connection(left, Sub)
        assert isinstance(left, Sub), lost("Connection.__class__ assignment", "is refused")
        for name in ("_recv_bytes", "_poll"):
            assert callable(getattr(mp_connection.Connection, name, None)), lost(f"Connection.{name}", "is gone")
        right.send_bytes(b"x" * 100)
        assert mp_private.poll(left, 1.0), lost("Connection._poll", "no longer reports a waiting frame")
        assert mp_private.recv_bytes_upto(left, 10) is None, \
            lost("Connection._recv_bytes(maxsize)", "no longer returns None for a frame over maxsize")
    finally:
        left.close()
        right.close()


def test_handshake_functions():
    left, right = mp_connection.Pipe()
    key = b"secret"
    try:
        t = threading.Thread(target=lambda: (mp_private.answer_challenge(right, key),
                                             mp_private.deliver_challenge(right, key)))
        t.start()
        mp_private.deliver_challenge(left, key)
        mp_private.answer_challenge(left, key)
        t.join(5)
        assert not t.is_alive()
    except AttributeError as exc:
        pytest.fail(lost("multiprocessing.connection.deliver_challenge/answer_challenge", f"are gone ({exc})"))
    finally:
        left.close()
        right.close()


def test_shared_memory_fd_name_and_tracker():
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        assert isinstance(getattr(shm, "_fd", None), int), lost("SharedMemory._fd", "is gone")
        os.fstat(shm._fd)
        assert getattr(shm, "_name", "") == "/" + shm.name, lost("SharedMemory._name", "changed (no leading '/')")
        assert callable(getattr(resource_tracker, "unregister", None)), lost("resource_tracker.unregister", "is gone")
    finally:
        shm.close()
        shm.unlink()


def test_posixshmem_shm_open():
    try:
        import _posixshmem
    except ImportError:
        pytest.skip(f"no _posixshmem on {PY} here (not POSIX): shared_state uses SharedMemory")
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        fd = _posixshmem.shm_open("/" + shm.name, os.O_RDONLY, mode=0o600)
        os.close(fd)
    except TypeError as exc:
        pytest.fail(lost("_posixshmem.shm_open(name, flags, mode=)", f"changed ({exc})"))
    finally:
        shm.close()
        shm.unlink()
