"""Plain ``transaction.atomic()`` on 'default' with load-balanced writes inside (issue 19).

With ``LOAD_BALANCER['PLAIN_ATOMIC'] = 'JOIN'`` (the default) every atomic block on
'default' -- ``with transaction.atomic():``, ``@transaction.atomic``,
``atomic(using='default')``, ``ATOMIC_REQUESTS`` -- gets a *twin*: an atomic block on the
load-balanced alias with the same ``savepoint`` and ``durable``, entered right after the
'default' block and left right before it.  The outermost twin is a load-balanced
transaction, which costs nothing until its first write (``ClientSession`` only records the
savepoints); nested twins are its savepoints, so a nested plain block that rolls back
undoes its load-balanced writes too.  While a twin is open, the two
connections share one rollback flag ('default''s ``needs_rollback``, see ``_pair``), so
``get_rollback``/``set_rollback``/``mark_for_rollback_on_error`` and the refusal of queries in
a broken transaction behave as on one connection, and ``transaction.savepoint()`` and its
``savepoint_rollback``/``savepoint_commit`` on 'default' cover the twin too.  ``on_commit`` callbacks stay where they were registered: on 'default' they run
after both commits, on the load-balanced alias after its commit; each runs once.

Commit order: the load-balanced part first, then 'default'.  The load-balanced commit is
the one that can fail for reasons of its own (a broken or timed-out transaction,
``WriteNotApplied``, the coordinator gone); committing it first means such a failure rolls
'default' back as well, and the block is applied nowhere.  If then the 'default' commit
fails, the load-balanced writes stay committed on every copy while 'default''s are rolled
back (Django has no atomicity across databases either); the exception carries a note saying so.

Why a wrapper around ``transaction.Atomic.__enter__``/``__exit__`` (installed in
AppConfig.ready): every form above builds a ``transaction.Atomic`` and goes through these
two methods (Django's TestCase calls ``__enter__`` itself), whose signatures are the same in
Django 4.2 and 5.2, and they see what a connection-level hook would not: ``durable``,
``_from_testcase`` and the exception leaving the block.  A connection-level hook would also
have to patch the vendor's DatabaseWrapper class of 'default', which is not the package's.

Django's TestCase blocks (``_from_testcase``) get no twin: under LoadBalancerTestRunner the
test case already holds its own atomic block on the load-balanced alias.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.errors import ConfigurationError, TransactionError
from django_lb_shm.settings.config import get_config

PARTNER = "_lb_plain_atomic_partner"   # on the load-balanced connection while paired: 'default'

_TWINS = "_lb_plain_atomic_twins"   # on connections['default'] (thread-local): one entry per open block
_COMMITTED_FIRST = ("django_lb_shm: the load-balanced writes of this transaction.atomic() block were committed on "
                    "every copy before this 'default' commit failed; the 'default' writes were rolled back.")


def install() -> None:
    """Wrap ``transaction.Atomic`` once (idempotent)."""
    atomic = transaction.Atomic
    if getattr(atomic, "_lb_plain_atomic", False):
        return
    atomic.__enter__ = _entering(atomic.__enter__, atomic.__exit__)
    atomic.__exit__ = _leaving(atomic.__exit__)
    atomic._lb_plain_atomic = True
    transaction.savepoint = _savepoint(transaction.savepoint)
    transaction.savepoint_rollback = _savepoint_end(transaction.savepoint_rollback, "savepoint_rollback", False)
    transaction.savepoint_commit = _savepoint_end(transaction.savepoint_commit, "savepoint_commit", True)


def _on_default(block: Any) -> bool:
    return block.using is None or block.using == DEFAULT_DB_ALIAS


def _twins() -> list:
    return connections[DEFAULT_DB_ALIAS].__dict__.setdefault(_TWINS, [])


def twin_for(block: Any) -> Optional[Any]:
    """The load-balanced block to open with ``block`` (on 'default'), or None."""
    if block._from_testcase:
        return None
    try:
        if get_config().plain_atomic != "JOIN":
            return None
        alias = lb_alias()
    except ConfigurationError:
        return None   # invalid settings: the system checks say so; 'default' works as in Django
    if alias == DEFAULT_DB_ALIAS:   # (only where a test makes 'default' stand in for the alias)
        return None
    return transaction.Atomic(alias, block.savepoint, block.durable)


def _entering(enter: Callable, leave: Callable) -> Callable:
    def __enter__(self: Any) -> None:
        if not _on_default(self):
            return enter(self)
        enter(self)
        twin = twin_for(self)
        if twin is not None:
            try:
                enter(twin)
            except BaseException as exc:   # e.g. durable=True inside django_lb_shm.atomic()
                leave(self, type(exc), exc, exc.__traceback__)
                raise
            _pair(connections[twin.using], connections[DEFAULT_DB_ALIAS])
        _twins().append(twin)

    return __enter__


def _leaving(leave: Callable) -> Callable:
    def __exit__(self: Any, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
        twins = _twins() if _on_default(self) else None
        twin = twins.pop() if twins else None
        if twin is None:
            own = connections[self.using or DEFAULT_DB_ALIAS]
            lost = lost_transaction(own)
            result = leave(self, exc_type, exc_value, traceback)
            _raise_if_lost(lost, own, exc_type)
            return result
        default, lb = connections[DEFAULT_DB_ALIAS], connections[twin.using]
        try:
            return _leave_both(leave, self, twin, default, lb, exc_type, exc_value, traceback)
        finally:
            _unpair(lb, default)
            if not any(twins):
                default.__dict__.pop(_SIDS, None)

    return __exit__


def _leave_both(leave: Callable, block: Any, twin: Any, default: Any, lb: Any,
                exc_type: Any, exc_value: Any, traceback: Any) -> Any:
    """Leave the twin, then ``block``; both read the one rollback flag they share (see ``_pair``)."""
    # Leaving a block rewrites the flag (cleared after a savepoint rollback): 'default' must
    # decide on what the flag was when the block ended, not on what the twin left in it.
    needs_rollback = default.needs_rollback
    committing = exc_type is None and not needs_rollback
    lost = lost_transaction(lb)
    try:
        leave(twin, exc_type, exc_value, traceback)
    except BaseException as exc:   # the load-balanced part failed: 'default' rolls back with it
        default.needs_rollback = needs_rollback
        leave(block, type(exc), exc, exc.__traceback__)
        raise
    twin_left_broken = default.needs_rollback   # its savepoint could not be rolled back, or it had none
    default.needs_rollback = needs_rollback
    try:
        result = leave(block, exc_type, exc_value, traceback)
    except BaseException as exc:
        if committing and not lb.in_atomic_block and hasattr(exc, "add_note"):
            exc.add_note(_COMMITTED_FIRST)
        raise
    finally:
        if twin_left_broken and default.in_atomic_block:
            default.needs_rollback = True
    _raise_if_lost(lost, lb, exc_type)
    return result


def lost_transaction(connection: Any) -> str:
    """Why the load-balanced transaction of ``connection`` was lost (its coordinator connection
    dropped mid-call), or '' (not lost, or not a load-balanced connection)."""
    # app start-up stays light: the client side loads on first use
    from django_lb_shm.client.session import ClientSession

    session = connection.connection
    return session.broken if isinstance(session, ClientSession) else ""


def _raise_if_lost(lost: str, lb: Any, exc_type: Any) -> None:
    """An outermost block that ends without an exception after its transaction was lost says so.

    Django ends such a block with a rollback and no exception when a savepoint rollback failed
    inside it -- the coordinator gone while the app caught an exception outside an inner block,
    as Django's docs advise -- so the app would take its block for committed.
    """
    if lost and exc_type is None and not lb.in_atomic_block:
        raise TransactionError(f"the atomic block was rolled back, not committed: {lost}")


# -- one rollback flag for the pair ----------------------------------------------------------------------
_PAIRS = "_lb_plain_atomic_pairs"   # on the load-balanced connection: open twins of 'default' blocks


def _pair(lb: Any, default: Any) -> None:
    """From the outermost twin on, the load-balanced connection's ``needs_rollback`` is 'default''s.

    So ``get_rollback()``/``set_rollback()``/``mark_for_rollback_on_error()`` on either alias, and
    the check that refuses queries in a broken transaction on either, see one flag, as on one
    connection: an IntegrityError of a load-balanced save marks 'default''s block, and a
    ``set_rollback(False)`` on 'default' lets the next load-balanced query run.
    """
    pairs = lb.__dict__.get(_PAIRS, 0)
    if not pairs:
        own = lb.needs_rollback
        lb.__dict__[PARTNER] = default
        default.needs_rollback = default.needs_rollback or own
    lb.__dict__[_PAIRS] = pairs + 1


def _unpair(lb: Any, default: Any) -> None:
    pairs = lb.__dict__.get(_PAIRS, 0) - 1
    lb.__dict__[_PAIRS] = max(pairs, 0)
    if pairs <= 0 and lb.__dict__.pop(PARTNER, None) is not None:
        # Still inside a block of its own (a TestCase's): that block ends as 'default''s would.
        lb.needs_rollback = default.needs_rollback if lb.in_atomic_block else False


# -- transaction.savepoint() inside a plain block ---------------------------------------------------------
_SIDS = "_lb_plain_atomic_sids"   # on connections['default']: {its savepoint id: the twin's savepoint id}


def _open_twin(using: Optional[str]) -> Optional[Any]:
    if using not in (None, DEFAULT_DB_ALIAS):
        return None
    return next((twin for twin in reversed(_twins()) if twin is not None), None)


def _savepoint(original: Callable) -> Callable:
    """``transaction.savepoint()`` on 'default' inside a block with a twin sets one on the twin too,
    so ``savepoint_rollback(sid)`` also undoes the load-balanced writes made since."""
    def savepoint(using: Optional[str] = None) -> Optional[str]:
        sid = original(using)
        twin = _open_twin(using)
        if sid is not None and twin is not None:
            connections[DEFAULT_DB_ALIAS].__dict__.setdefault(_SIDS, {})[sid] = connections[twin.using].savepoint()
        return sid

    return savepoint


def _savepoint_end(original: Callable, method: str, forget: bool) -> Callable:
    def end(sid: str, using: Optional[str] = None) -> None:
        original(sid, using)   # 'default' first: an unknown sid fails there, before the twin is touched
        twin = _open_twin(using)
        sids = connections[DEFAULT_DB_ALIAS].__dict__.get(_SIDS, {})
        twin_sid = sids.pop(sid, None) if forget else sids.get(sid)
        if twin is not None and twin_sid is not None:
            getattr(connections[twin.using], method)(twin_sid)

    end.__name__ = end.__qualname__ = original.__name__
    end.__doc__ = original.__doc__
    return end
