"""Keeps every LoadBalancerModel query on the load-balanced alias.

Installed automatically in front of settings.DATABASE_ROUTERS (AppConfig.ready),
so base managers, related managers and Django internals that ask the router
(rather than the model's default manager) also go through the coordinator.
"""
from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.utils import ConnectionRouter

from .backend.alias import lb_alias


_LOAD_BALANCED: dict = {}   # model class -> bool (asked by the router on every query)


def is_load_balanced(model: Any) -> bool:
    if isinstance(model, type):
        known = _LOAD_BALANCED.get(model)
        if known is None:
            known = _is_load_balanced(model)
            from django.apps import apps

            if apps.models_ready:   # relations resolved: the answer no longer changes
                _LOAD_BALANCED[model] = known
        return known
    return _is_load_balanced(model)


def _is_load_balanced(model: Any) -> bool:
    from .load_balancer_model import LoadBalancerModel

    if model is None:
        return False
    if isinstance(model, type) and issubclass(model, LoadBalancerModel):
        return True
    if _listed_in_models_setting(model):
        return True
    # Auto-created many-to-many tables between load-balanced models.
    meta = getattr(model, "_meta", None)
    if meta is not None and meta.auto_created:
        return any(
            is_load_balanced(f.related_model) for f in meta.fields if f.is_relation and f.related_model
        )
    return False


# STAND-IN (issue 19 part C, branch djsuite) for LOAD_BALANCER['MODELS'] -- the branch "models"
# version (with its checks) replaces this function at merge.
def _listed_in_models_setting(model: Any) -> bool:
    from django.conf import settings

    meta = getattr(model, "_meta", None)
    listed = (getattr(settings, "LOAD_BALANCER", None) or {}).get("MODELS", ())
    return meta is not None and (meta.app_label in listed or meta.label in listed)


class LoadBalancerRouter:
    def db_for_read(self, model: Any, **hints: Any):
        return lb_alias() if is_load_balanced(model) else None

    def db_for_write(self, model: Any, **hints: Any):
        return lb_alias() if is_load_balanced(model) else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any):
        # Load-balanced rows are reached through the virtual alias whichever database the other
        # object came from; which relations across the two kinds can hold is checked at
        # start-up (django_lb_shm.E023/E024), not per assignment.
        if is_load_balanced(type(obj1)) or is_load_balanced(type(obj2)):
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: Any = None, **hints: Any):
        # The virtual alias is no database of its own: schema changes go to the real ones
        # (`djangoloadbalancer migrate`).  Its load-balanced models' rows, though, may be
        # loaded through it (`loaddata --database loadbalancer` asks this for every object).
        try:
            alias = lb_alias()
        except Exception:
            return None
        if db != alias:
            return None
        return is_load_balanced(hints.get("model"))


class PlainModelRouter:
    """Last in the chain: a model that is not load-balanced, routed with a load-balanced
    instance as the hint (``author.notes.all()``, ``note.author = author``), goes to
    'default' when no router of the project chose: Django would take the instance's
    alias, the virtual one, which serves load-balanced tables only."""

    def db_for_read(self, model: Any, **hints: Any):
        return self._plain(model, hints)

    def db_for_write(self, model: Any, **hints: Any):
        return self._plain(model, hints)

    @staticmethod
    def _plain(model: Any, hints: dict):
        instance = hints.get("instance")
        if instance is not None and is_load_balanced(type(instance)) and not is_load_balanced(model):
            return DEFAULT_DB_ALIAS
        return None


def _add_ours(routers: list) -> list:
    if not any(isinstance(r, LoadBalancerRouter) for r in routers):
        routers.insert(0, LoadBalancerRouter())
    if not any(isinstance(r, PlainModelRouter) for r in routers):
        routers.append(PlainModelRouter())
    return routers


class _RouterKeepingOurs(ConnectionRouter):
    """Django's ``router``, whose list gets these routers back whenever it is rebuilt.

    Django replaces ``router.routers`` with a list built from DATABASE_ROUTERS alone when that
    setting changes (``override_settings`` in tests), and keeps that list after the override
    ends: load-balanced models would then silently use one copy for the rest of the process.
    """

    @property
    def routers(self) -> list:
        found = self.__dict__.get("_lb_routers")
        if found is None:
            found = self.__dict__["_lb_routers"] = _add_ours(ConnectionRouter(self._routers).routers)
        return found

    @routers.setter
    def routers(self, value: list) -> None:
        self.__dict__["_lb_routers"] = _add_ours(list(value))


def install_router() -> None:
    from django.db import router

    if not isinstance(router, _RouterKeepingOurs):
        current = router.routers   # cached list built from settings.DATABASE_ROUTERS
        router.__class__ = _RouterKeepingOurs
        router.routers = current
    _add_ours(router.routers)
