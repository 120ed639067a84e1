"""django_lb_shm: load-balance a Django project's ORM work over copies of one database.

Public names are imported lazily so that importing the package (for example in
settings.py or INSTALLED_APPS) never imports Django models before apps are ready.
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
