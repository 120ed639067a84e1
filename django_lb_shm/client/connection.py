"""The per-process connection to the coordinator.

Every process (and every thread, via the Manager proxy's thread-local socket) gets its own
connection, opened lazily on the first query and rebuilt after a fork, so gunicorn or celery
workers never share a socket.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
import time
import uuid
from multiprocessing import AuthenticationError
from typing import Any, Optional

from django_lb_shm.client.breaker import ConnectBreaker
from django_lb_shm.errors import (
    AnswerTimeout,
    AuthenticationFailed,
    ConfigurationError,
    CoordinatorDown,
    CoordinatorUnavailable,
    ProtocolError,
    RequestRejected,
    WriteOutcomeUnknown,
    from_dict,
)
from django_lb_shm.settings.config import (
    LoadBalancerConfig,
    database_identity,
    get_config,
)
from django_lb_shm.shm.state import live_supervisor
from django_lb_shm.wire import descriptors as d
from django_lb_shm.wire import mp_private
from django_lb_shm.wire.protocol import (
    SETTLE_WAIT,
    CoordinatorManager,
    private_directory,
    timed_client,
)

logger = logging.getLogger("django_lb_shm.client")

_CONNECTION_LOST = (EOFError, ConnectionError, BrokenPipeError, OSError)
_UNREADABLE = (pickle.UnpicklingError, EOFError, AttributeError, ImportError)
SETTLE_MARGIN = 3.0   # on top of the coordinator's SETTLE_WAIT: its answer's way back


class ClientConnection:
    """This process's connection to the coordinator (one Manager proxy; one socket per thread)."""

    _ids = itertools.count(1)

    def __init__(self, config: LoadBalancerConfig, verify_databases: bool = True):
        self.config = config
        self.verify_databases = verify_databases   # see check_same_databases(); `status` skips it
        self.pid = os.getpid()
        self._proxy = None
        self._lock = threading.Lock()
        self.breaker = ConnectBreaker(config)   # fail fast when nothing will answer (client/breaker.py)

    # -- connection -------------------------------------------------------
    def _connect(self):
        address = self.config.address
        manager = CoordinatorManager(address=address.tuple, authkey=address.authkey)
        local_path = address.local_socket_path
        if local_path and not private_directory(local_path):
            local_path = ""
        client = timed_client(self.config.connect_timeout, local_path)
        mp_private.set_manager_client(manager, client)
        mp_private.mark_manager_started(manager)
        try:
            proxy = manager.coordinator()
            mp_private.set_proxy_client(proxy, client)  # each thread's own connection: bounded handshake too
            return proxy
        except AuthenticationError as exc:
            raise AuthenticationFailed(
                f"the load balancer coordinator at {address} refused the AUTHKEY ({exc}); "
                "the app and the coordinator must use the same LOAD_BALANCER['ADDRESS']['AUTHKEY']."
            ) from None
        except _CONNECTION_LOST as exc:
            raise CoordinatorUnavailable(
                f"no load balancer coordinator answers at {address} ({exc.__class__.__name__}: {exc}); "
                "start it with `djangoloadbalancer` (or `python manage.py loadbalancer run`) "
                "in the Django project directory."
            ) from None

    def proxy(self, deadline: Optional[float] = None):
        """The connected proxy; connecting retries until ``deadline`` (default: CONNECT_TIMEOUT from now)."""
        if self._proxy is None:
            with self._lock:
                if self._proxy is None:
                    proxy = self._connect_with_retry(deadline)
                    self.check_same_databases(proxy)
                    self._proxy = proxy
        return self._proxy

    def check_same_databases(self, proxy: Any) -> None:
        """The coordinator must serve the databases this process names (same vendor and NAME).

        ``manage.py test`` renames them to test databases in this process only: without
        this check the coordinator would run the tests' queries on the real ones.
        """
        if not self.verify_databases:
            return
        try:
            theirs = proxy.call("identity", (), self.config.client_timeout)["databases"]
        except AttributeError as exc:
            if "not exposed" in str(exc):
                return   # a coordinator of an earlier version (no `identity`): nothing to compare
            raise
        # Copies added or removed on the coordinator's side first (settings + SIGHUP) are not a mismatch;
        # the same alias naming another database is, and so is no alias in common.
        common = [alias for alias in self.config.databases if alias in theirs]
        differ = [
            f"{alias!r} is {database_identity(alias)[1]!r} here, {theirs[alias][1]!r} there"
            for alias in common if list(theirs[alias]) != database_identity(alias)
        ] or ([] if common else [f"it serves {', '.join(theirs) or 'none'}, this process names "
                                 f"{', '.join(self.config.databases)}"])
        if differ:
            proxy.drop_connection()
            raise ConfigurationError(
                f"the load balancer coordinator at {self.config.address} serves other databases than this "
                f"process's settings name: {'; '.join(differ)}. It would run these queries on its own. "
                "Under `manage.py test`, set TEST_RUNNER = 'django_lb_shm.testing.LoadBalancerTestRunner' "
                "(it starts a coordinator on the test databases); otherwise start the coordinator with "
                "the app's settings."
            )

    def _connect_with_retry(self, deadline: Optional[float] = None):
        if deadline is None:
            deadline = time.monotonic() + self.config.connect_timeout
        return self.breaker.connect(self._connect, deadline)

    def forget_connection(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            try:
                proxy.drop_connection()
            except Exception:
                pass

    # -- calls ------------------------------------------------------------
    def call(self, method: str, *args: Any, timeout: Optional[float] = None,
             deadline: Optional[float] = None) -> Any:
        """One call to the coordinator.

        ``execute`` is not re-sent here (``request`` decides what is safe to send
        again); the read-only calls (status, hello, ping) get one more try on a
        new connection when the old one died with a restarted coordinator.
        """
        timeout = self.config.client_timeout if timeout is None else timeout
        attempts = 1 if method == "execute" else 2
        for attempt in range(attempts):
            try:
                return self.proxy(deadline).call(method, args, timeout)
            except _CONNECTION_LOST:
                self.forget_connection()
                if attempt + 1 == attempts:
                    raise CoordinatorUnavailable(
                        f"lost the connection to the load balancer coordinator at {self.config.address}"
                    ) from None

    def request(self, request: d.Request, idempotent: bool) -> d.Result:
        ok, value = self.exchange(self.encode(request), idempotent)
        if ok:
            return value
        raise from_dict(value)

    def encode(self, request: d.Request) -> bytes:
        payload = d.encode(request)
        if len(payload) > self.config.max_request_bytes:
            raise RequestRejected(
                f"the query is {len(payload)} bytes once serialized, over LOAD_BALANCER['MAX_REQUEST_BYTES'] "
                f"({self.config.max_request_bytes}); send it in smaller parts or raise the limit"
            )
        return payload

    def exchange(self, payload: bytes, idempotent: bool, timeout: Optional[float] = None) -> tuple[bool, Any]:
        """The coordinator's answer to an encoded request: (True, Result) or (False, error as data).

        Raises only when no answer was received (the connection is then dropped): the
        coordinator unreachable, AnswerTimeout, or whatever interrupted the wait.
        """
        deadline = time.monotonic() + self.config.connect_timeout
        resent = False
        while True:
            try:
                args = (payload, True) if resent else (payload,)
                resent = True
                ok, value = decode_answer(self.call("execute", *args, timeout=timeout, deadline=deadline))
                if ok or value.get("error_type") != "CoordinatorUnavailable":
                    return ok, value
                raise from_dict(value)   # it is stopping: the request was not run
            except (AuthenticationFailed, CoordinatorDown):
                raise  # a wrong key stays wrong; nothing is there to answer a retry
            except CoordinatorUnavailable:
                # The connection was lost, or the coordinator answered that it is stopping (a
                # restart) and did not run the request.  Reads and writes carrying a request id
                # are safe to send again: the coordinator answers a repeated write id from its journal.
                if not idempotent or time.monotonic() > deadline:
                    raise
                self.forget_connection()
                time.sleep(0.05)

    def settle(self, request_id: str) -> d.Result:
        """What became of a write (or commit) whose answer did not come within CLIENT_TIMEOUT:
        its result, its error raised, or WriteOutcomeUnknown naming ``request_id``."""
        wait = min(SETTLE_WAIT, self.config.client_timeout)
        payload = d.encode(d.Request(op=d.OP_OUTCOME, request_id=request_id))
        try:
            ok, value = self.exchange(payload, idempotent=True, timeout=wait + SETTLE_MARGIN)
        except (CoordinatorUnavailable, AnswerTimeout, ProtocolError) as exc:
            raise WriteOutcomeUnknown(
                f"write request {request_id} got no answer within CLIENT_TIMEOUT and the coordinator could not "
                f"be asked about it ({exc}); it is applied on every copy or on none"
            ) from None
        if ok:
            return value
        error = from_dict(value)
        if isinstance(error, RequestRejected):   # a coordinator without OP_OUTCOME
            raise WriteOutcomeUnknown(f"write request {request_id} got no answer within CLIENT_TIMEOUT; it is "
                                      f"applied on every copy or on none ({error})") from None
        raise error

    def drop_thread_connection(self) -> None:
        """This thread's connection may be out of step: it is never used again (the coordinator
        rolls back the transaction it held, if any)."""
        proxy = self._proxy
        if proxy is not None:
            proxy.drop_connection()

    def new_request_id(self) -> str:
        return f"{self.pid}-{uuid.uuid4().hex[:12]}-{next(self._ids)}"


def decode_answer(reply: bytes) -> tuple[bool, Any]:
    try:
        ok, value = d.decode(reply)
    except _UNREADABLE as exc:   # (not Exception: an app's signal handler may raise here)
        raise ProtocolError(f"an answer of the coordinator could not be read ({type(exc).__name__}: {exc})") from None
    return ok, value


def read_status(config: LoadBalancerConfig, timeout: float = 5.0) -> dict:
    """The coordinator's status, whatever databases it serves (`status` and `verify` only look).

    Connecting is retried for CONNECT_TIMEOUT only while a supervisor of this user and host
    serves the address (it is restarting the coordinator); otherwise one attempt answers.
    """
    wait = config.connect_timeout if live_supervisor(config.address) else 0.0
    client = ClientConnection(config, verify_databases=False)
    try:
        return client.call("status", timeout=timeout, deadline=time.monotonic() + wait)
    finally:
        client.forget_connection()


_client: Optional[ClientConnection] = None
_client_lock = threading.Lock()


def get_client() -> ClientConnection:
    global _client
    config = get_config()
    client = _client
    if client is None or client.pid != os.getpid() or client.config is not config:
        with _client_lock:
            if _client is None or _client.pid != os.getpid() or _client.config is not config:
                _client = ClientConnection(config)
            client = _client
    return client


def _reset_after_fork() -> None:
    """A forked child must not reuse the parent's sockets (gunicorn, celery prefork)."""
    global _client
    _client = None
    mp_private.forget_proxy_connections()


os.register_at_fork(after_in_child=_reset_after_fork)


