"""One error tree for django_lb_shm, rooted in Django's own database errors.

Application code that already handles ``django.db.OperationalError`` or
``django.db.IntegrityError`` keeps working: every error raised to a caller is a
subclass of the matching Django class.  Errors cross the coordinator's queues
as plain data (``to_dict`` / ``from_dict``), never as live exception objects.
"""
from __future__ import annotations

from typing import Any

from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import utils as db_utils


class LoadBalancerError(db_utils.Error):
    """Root of every error django_lb_shm raises."""


class ConfigurationError(LoadBalancerError, ImproperlyConfigured):
    """settings.LOAD_BALANCER is missing or invalid."""


class ProtocolError(LoadBalancerError):
    """A request or reply did not follow the coordinator protocol."""


class ProtocolVersionMismatch(ProtocolError):
    """Client and coordinator run different django_lb_shm protocol versions."""


class RequestRejected(LoadBalancerError, db_utils.ProgrammingError):
    """The coordinator refused a request (unknown operation, too large, not a LoadBalancerModel...)."""


class DataValueError(LoadBalancerError, db_utils.DataError, ValueError):
    """A value the driver cannot bind (a lone surrogate in a string...): a ValueError in plain Django."""


class DataOverflowError(LoadBalancerError, db_utils.DataError, OverflowError):
    """A number the driver cannot bind (sqlite3: an int over 64 bits): an OverflowError in plain Django."""


class ParameterTypeError(LoadBalancerError, db_utils.ProgrammingError, TypeError):
    """A parameter of a type the driver cannot bind: a TypeError in plain Django."""


class SerializationError(ParameterTypeError):
    """An argument could not be serialized for the coordinator."""


class NotSupportedError(LoadBalancerError, db_utils.NotSupportedError):
    """An ORM feature that cannot be load balanced safely."""


class NonDeterministicWrite(NotSupportedError):
    """A write calls a function each copy would evaluate itself (random(), gen_random_uuid()...)."""


class CoordinatorUnavailable(LoadBalancerError, db_utils.OperationalError):
    """No coordinator answers at ADDRESS (not started, crashed, or restarting)."""


class AuthenticationFailed(CoordinatorUnavailable):
    """The coordinator refused the AUTHKEY."""


class CoordinatorDown(CoordinatorUnavailable):
    """Nothing can answer at ADDRESS now, so the client did not wait CONNECT_TIMEOUT: no
    supervisor serves it on this host, or the last wait failed (the circuit breaker is open)."""


class QueryTimeout(LoadBalancerError, db_utils.OperationalError):
    """A read got no answer in time (CLIENT_TIMEOUT, or READ_TIMEOUT on two databases)."""


class AnswerTimeout(QueryTimeout):
    """Client side: no answer within CLIENT_TIMEOUT; the connection was dropped.  A read's
    error as it is; a write's is turned into its settled outcome or WriteOutcomeUnknown."""


class NoDatabaseAvailable(LoadBalancerError, db_utils.OperationalError):
    """No database in LOAD_BALANCER['DATABASES'] can serve the request."""


class DatabaseDown(LoadBalancerError, db_utils.OperationalError):
    """One database failed at the connection level (used inside the coordinator)."""


class DatabaseOwnedElsewhere(DatabaseDown):
    """Another coordinator already serves this database (two would hand out the same write numbers)."""


class WriteNotApplied(LoadBalancerError, db_utils.OperationalError):
    """A write was not applied anywhere; it is safe to retry."""


class WriteOutcomeUnknown(LoadBalancerError, db_utils.OperationalError):
    """The coordinator went away while a write was in flight and no retry could settle it."""


class TransactionError(LoadBalancerError, db_utils.OperationalError):
    """A load-balanced transaction could not be started or finished."""


class SharedMemoryNotOwned(LoadBalancerError):
    """The shared-memory segment named for this user and ADDRESS belongs to another OS user, or
    another user could write it: never read, used or removed (someone else planted it)."""


class JournalError(WriteNotApplied):
    """The write journal (JOURNAL_DIR) could not record a write: it was applied nowhere."""


class JournalCorrupt(LoadBalancerError):
    """The journal holds a damaged record followed by valid ones: the coordinator will not guess."""


class ResyncError(LoadBalancerError, db_utils.OperationalError):
    """A resync could not start, go on or finish; the copy is left out of reads."""


# Database errors raised by a database thread keep their Django class on the
# client side; these names are the ones allowed to cross the queue.
_DJANGO_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        db_utils.Error,
        db_utils.InterfaceError,
        db_utils.DatabaseError,
        db_utils.DataError,
        db_utils.OperationalError,
        db_utils.IntegrityError,
        db_utils.InternalError,
        db_utils.ProgrammingError,
        db_utils.NotSupportedError,
        FieldError,
    )
}
# Drivers raise these builtins for a value they cannot bind (a lone surrogate, an int over
# 64 bits in sqlite3); plain Django lets them through.  Here they are both the builtin and a
# django.db error, so `except ValueError` and `except DatabaseError` both catch them.
_BUILTIN_ERRORS: dict[type[Exception], type[Exception]] = {
    ValueError: DataValueError,
    OverflowError: DataOverflowError,
    TypeError: ParameterTypeError,
}
_DJANGO_ERRORS.update({builtin.__name__: typed for builtin, typed in _BUILTIN_ERRORS.items()})
_OWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        LoadBalancerError,
        ConfigurationError,
        ProtocolError,
        ProtocolVersionMismatch,
        RequestRejected,
        DataValueError,
        DataOverflowError,
        ParameterTypeError,
        SerializationError,
        NotSupportedError,
        NonDeterministicWrite,
        CoordinatorUnavailable,
        AuthenticationFailed,
        CoordinatorDown,
        QueryTimeout,
        NoDatabaseAvailable,
        DatabaseDown,
        DatabaseOwnedElsewhere,
        WriteNotApplied,
        WriteOutcomeUnknown,
        TransactionError,
        JournalError,
        JournalCorrupt,
        ResyncError,
        SharedMemoryNotOwned,
    )
}


def to_dict(exc: BaseException, **details: Any) -> dict[str, Any]:
    """Describe an exception as plain data that can cross a queue."""
    name = type(exc).__name__
    if name not in _OWN_ERRORS and name not in _DJANGO_ERRORS:
        name = _nearest_known_name(exc)
    return {"error_type": name, "message": str(exc), "details": details}


def from_dict(data: dict[str, Any]) -> Exception:
    """Rebuild the exception described by :func:`to_dict`."""
    name = data.get("error_type", "LoadBalancerError")
    cls = _OWN_ERRORS.get(name) or _DJANGO_ERRORS.get(name) or LoadBalancerError
    exc = cls(data.get("message", ""))
    exc.details = data.get("details") or {}  # type: ignore[attr-defined]
    return exc


def as_database_error(exc: BaseException) -> BaseException:
    """A builtin ValueError/OverflowError/TypeError raised by a driver, as its django.db twin
    (anything else as it is: an app's own exception class is never replaced)."""
    if type(exc).__module__ != "builtins":
        return exc
    for builtin, typed in _BUILTIN_ERRORS.items():
        if isinstance(exc, builtin):
            twin = typed(str(exc))
            twin.__cause__ = exc
            return twin
    return exc


def _nearest_known_name(exc: BaseException) -> str:
    # PEP 249 class names are the same in every driver (sqlite3, psycopg...).
    for klass in type(exc).__mro__:
        if klass.__name__ in _OWN_ERRORS and klass.__module__ == __name__:
            return klass.__name__
        if klass.__name__ in _DJANGO_ERRORS:
            return klass.__name__
    return "DatabaseError"
