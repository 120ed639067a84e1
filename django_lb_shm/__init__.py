"""django_lb_shm: load-balance a Django project's ORM work over copies of one database.

Public names are imported lazily so that importing the package (for example in
settings.py or INSTALLED_APPS) never imports Django models before apps are ready.

The folders are the boxes of the README's architecture picture:

    (top level)   the public surface: LoadBalancerModel, query, routers, transactions (atomic),
                  plain_atomic, balancing (read algorithms), checks, apps, testing, errors, cli
    backend/      the virtual Django database backend behind the load-balanced alias
    client/       the app side: connection, session (DB-API), statements, transaction, reads
    wire/         what crosses between processes: descriptors, protocol, exit codes
    shm/          the shared-memory segment (depends on nothing but errors)
    settings/     LOAD_BALANCER: validation, config, overrides
    databases/    what every process knows about the copies: failures, probes, ownership, schema
    supervisor/   the djangoloadbalancer process: spawns and watches the coordinator; metrics
    coordinator/  the manager process: process -> server -> router -> sequencer -> journal, db_thread
    ops/          operator tools: verify, resync, logging set-up

Which box may import which is in tests/test_layering.py (MAY_IMPORT).  Within that, a module's
top-level imports of the package point to lower layers only (tests/test_layering.py reads this
list; a new module must be placed in it):

    L0  __about__ client.statements coordinator.read_pool databases.probes errors periodic
        ops.logging_setup wire.exit_codes wire.mp_private wire.state_table
    L1  client.transaction databases.failures settings.validation shm.state wire.descriptors
        wire.protocol
    L2  backend.compiler balancing client.breaker client.determinism coordinator.group_commit
        coordinator.journal coordinator.outcomes coordinator.server coordinator.watchers
        databases.ownership settings.config settings.overrides supervisor.metrics
    L3  backend.alias cli client.connection coordinator.db_thread coordinator.transaction
    L4  client.reads coordinator.resync coordinator.sequencer management.commands.loadbalancer
        plain_atomic routers transactions
    L5  client.session coordinator.write_guard databases.schema ops.verify query
    L6  backend.base checks coordinator.router
    L7  apps coordinator.process load_balancer_model
    L8  ops.resync supervisor.supervisor testing

An import inside a function points up only to break a cycle (routers and checks need
load_balancer_model, settings.validation needs balancing) or to keep what an app process imports
at start-up (``__init__``, apps, settings, checks, routers, query, plain_atomic, backend.alias)
light: cli imports the rest once Django is set up.
"""
from __future__ import annotations

from typing import Any

from django_lb_shm.__about__ import __version__

__all__ = [
    "LoadBalancerModel",
    "LoadBalancerManager",
    "LoadBalancerQuerySet",
    "atomic",
    "__version__",
]

_LAZY = {
    "LoadBalancerModel": ".load_balancer_model",
    "LoadBalancerManager": ".query",
    "LoadBalancerQuerySet": ".query",
    "atomic": ".transactions",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'django_lb_shm' has no attribute {name!r}")
