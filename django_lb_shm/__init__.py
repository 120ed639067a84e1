"""django_lb_shm: load-balance a Django project's ORM work over copies of one database.

Public names are imported lazily so that importing the package (for example in
settings.py or INSTALLED_APPS) never imports Django models before apps are ready.

Layering: a module's top-level imports of the package point to lower layers only
(tests/test_layering.py reads this list; a new module must be placed in it).
shared_state imports nothing of the package but errors.

    L0  __about__ errors exit_codes logging_setup mp_private probes read_pool state_table
    L1  client_transaction conf descriptors health shared_state
    L2  backend.alias backend.compiler balancing breaker determinism group_commit journal
        outcomes ownership protocol
    L3  manager_server metrics plain_atomic routers server_transaction transactions
    L4  db_thread query reads schema
    L5  checks client sequencer write_guard
    L6  apps backend.base load_balancer_model verify
    L7  resync testing
    L8  coordinator watchers
    L9  coordinator_process
    L10 supervisor
    L11 cli
    L12 management.commands.loadbalancer

An import inside a function points up only to break a cycle (routers and checks need
load_balancer_model, reads needs client, conf needs balancing) or to keep what an app
process imports at start-up (``__init__``, apps, conf, checks, routers, query,
plain_atomic, backend.alias) light: cli imports the rest once Django is set up.
"""
from __future__ import annotations

from typing import Any

from .__about__ import __version__

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
