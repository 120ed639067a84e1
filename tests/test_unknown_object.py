"""A request naming an object the coordinator process does not have (a proxy made with a previous
coordinator process) gets the explicit #UNKNOWN_OBJECT reply, and the client takes it as
"reconnect": no traceback text is matched.  Against the suite's real coordinator."""
from __future__ import annotations

import pickle

import pytest
from multiprocessing.managers import Token

from django_lb_shm.wire import mp_private
from django_lb_shm.settings.config import build_config
from django_lb_shm.wire.protocol import TYPEID, UNKNOWN_OBJECT, RouterProxy, connect, timed_client
from tests.testapp.models import Author


def _address(handle):
    return build_config(handle.lb, handle.settings["DATABASES"]).address


def test_the_coordinator_answers_an_unknown_object_with_its_own_reply_kind(coordinator):
    address = _address(coordinator)
    conn = connect(address.tuple, address.authkey, timeout=5)
    try:
        conn.send((None, "accept_connection", ("test_unknown_object",), {}))
        assert conn.recv()[0] == "#RETURN"
        conn.send_bytes(pickle.dumps(("no-such-object", "ping", (), {})))
        assert conn.poll(5)
        kind, result = pickle.loads(conn.recv_bytes())
        assert (kind, result) == (UNKNOWN_OBJECT, "no-such-object")
        conn.send_bytes(pickle.dumps((_served_id(coordinator), "ping", (), {})))   # the connection goes on
        assert conn.poll(5) and pickle.loads(conn.recv_bytes()) == ("#RETURN", "pong")
    finally:
        conn.close()


def _served_id(handle) -> str:
    client = handle.client()
    try:
        return mp_private.proxy_object_id(client.proxy())
    finally:
        client.forget_connection()


def test_a_proxy_of_a_previous_coordinator_is_told_to_reconnect(coordinator):
    address = _address(coordinator)
    stale = RouterProxy(Token(TYPEID, address.tuple, "no-such-object"), "pickle",
                             authkey=address.authkey, incref=False)
    mp_private.set_proxy_client(stale, timed_client(5.0))
    try:
        with pytest.raises(ConnectionResetError, match="the coordinator restarted since this connection was made"):
            stale.call("ping", timeout=5)
    finally:
        stale.drop_connection()
    # the app's own client is untouched
    Author.objects.create(name="after an unknown object")
    assert Author.objects.filter(name="after an unknown object").count() == 1
