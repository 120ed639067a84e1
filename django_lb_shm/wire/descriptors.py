"""Query descriptors: what an app process sends to the coordinator, and what comes back.

The app process compiles the ORM query to SQL and parameters itself (Django's own
compiler, for the databases' vendor) and ships this small, version-stamped
descriptor; the coordinator only executes it.  Descriptors are serialized with
the plain pickler when it can, and with cloudpickle when a parameter needs it
(objects defined in local scopes, lambdas...).  Both outputs load with
``pickle.loads``.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import cloudpickle

from django_lb_shm.errors import ProtocolVersionMismatch, SerializationError

PROTOCOL_VERSION = 1

# Operations a request may carry.
OP_READ = "read"          # one statement on one database, chosen by the read algorithm
OP_WRITE = "write"        # one statement on every database, in the global write order
OP_COMMIT = "commit"      # end the caller's transaction: apply it everywhere
OP_ROLLBACK = "rollback"  # end the caller's transaction: apply it nowhere
OP_OUTCOME = "outcome"    # what became of the write (or commit) ``request_id`` whose answer was not received
OPERATIONS = (OP_READ, OP_WRITE, OP_COMMIT, OP_ROLLBACK, OP_OUTCOME)


@dataclass
class InsertKeys:
    """How to give followers the primary keys the first database generated.

    ``follower_sql``/``follower_params`` is the same INSERT with the primary key
    column added; its parameters hold ``markers[i]`` where row i's key goes.
    """

    follower_sql: str
    follower_params: Any
    markers: tuple
    pk_index: int = 0                 # column of the key in the rows the INSERT returns
    after: tuple = ()                 # statements run on followers afterwards (sequence resets)
    # ON CONFLICT DO NOTHING, one row: the leader may insert nothing (no key returned), and
    # then the followers run nothing either.
    may_skip: bool = False
    # ON CONFLICT DO NOTHING, several rows of a many-to-many table: the leader returns (key, *identity)
    # for the rows it inserted; each follower inserts those rows only, from (identity, sql, params)
    # entries whose params hold markers[0] where the key goes.
    rows: tuple = ()


@dataclass
class Statement:
    sql: str
    params: Any = None
    many: bool = False                # executemany: params is a list of parameter sets
    insert_keys: Optional[InsertKeys] = None
    # A follower's INSERT carrying the leader's keys: it reads no sequence (see db_thread's
    # without_superseded_resets).
    keyed: bool = False

    def __reduce__(self) -> tuple:  # a constructor call pickles and loads twice as fast as a __dict__
        # Four arguments unless keyed: the form journals of earlier versions hold.
        args = (self.sql, self.params, self.many, self.insert_keys)
        return Statement, (args + (True,) if self.keyed else args)


@dataclass
class Request:
    op: str
    statement: Optional[Statement] = None
    in_transaction: bool = False
    opens: bool = False               # this statement opens the caller's transaction on the coordinator
    prelude: tuple = ()               # savepoint statements issued before the transaction reached the coordinator
    request_id: str = ""
    version: int = PROTOCOL_VERSION
    # Set by the coordinator, not sent inside the request: the client sent these bytes before (on a
    # connection that died); only then can its write id already be decided, and the journal is asked.
    resent: bool = False

    def __reduce__(self) -> tuple:
        return Request, (self.op, self.statement, self.in_transaction, self.opens, self.prelude,
                         self.request_id, self.version)


@dataclass
class Result:
    rows: list = field(default_factory=list)
    description: Optional[tuple] = None
    rowcount: int = -1
    lastrowid: Any = None
    database: str = ""                # which database answered (for tests and status)

    def __reduce__(self) -> tuple:
        return Result, (self.rows, self.description, self.rowcount, self.lastrowid, self.database)


def encode(obj: Any) -> bytes:
    """Serialize a descriptor: pickle first, cloudpickle when pickle cannot."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        pass
    try:
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(_describe_unpicklable(obj, exc)) from exc


def decode(data: bytes) -> Any:
    return pickle.loads(data)


def check_version(request: Request) -> None:
    version = getattr(request, "version", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionMismatch(
            f"request uses django_lb_shm protocol {version}, the coordinator speaks {PROTOCOL_VERSION}; "
            "run the same django_lb_shm version in the app and the coordinator."
        )


def _describe_unpicklable(obj: Any, exc: Exception) -> str:
    statement = getattr(obj, "statement", None)
    params = getattr(statement, "params", None)
    values = params.values() if isinstance(params, dict) else (params or ())
    for value in values:
        try:
            cloudpickle.dump(value, io.BytesIO())
        except Exception:
            return (
                f"query parameter {value!r} of type {type(value).__name__} cannot be sent to the "
                f"load balancer coordinator ({exc}); pass plain values (str, int, date, Decimal...)."
            )
    return f"request cannot be serialized for the load balancer coordinator: {exc}"
