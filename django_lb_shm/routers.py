"""Keeps every query of a load-balanced model on the load-balanced alias.

Installed automatically in front of settings.DATABASE_ROUTERS (AppConfig.ready),
so base managers, related managers and Django internals that ask the router
(rather than the model's default manager) also go through the coordinator.
"""
from __future__ import annotations

from typing import Any, Optional

from django.db import DEFAULT_DB_ALIAS

from django_lb_shm.backend.alias import install_alias, lb_alias
from django_lb_shm.settings.validation import SETTING_NAME, models_setting

_LOAD_BALANCED: dict = {}   # model class -> bool (asked by the router on every query)
_LISTED: list = [None]      # LOAD_BALANCER['MODELS'] as (app labels, 'app_label.modelname's), parsed once


def is_load_balanced(model: Any) -> bool:
    """Whether ``model``'s rows are on every copy: a LoadBalancerModel, a model that
    LOAD_BALANCER['MODELS'] lists, their proxies and multi-table children, and the
    auto-created many-to-many tables of either."""
    if isinstance(model, type):
        known = _LOAD_BALANCED.get(model)
        if known is None:
            known = _is_load_balanced(model)
            from django.apps import apps

            # Relations resolved: the answer no longer changes.  Not kept for migrations' historical
            # models: a migrate builds many, used once.
            if apps.models_ready and model.__module__ != "__fake__":
                _LOAD_BALANCED[model] = known
        return known
    return _is_load_balanced(model)


def listed_in_models(meta: Any) -> bool:
    """Whether LOAD_BALANCER['MODELS'] names this model or its app."""
    parsed = _LISTED[0]
    if parsed is None:
        from django.conf import settings

        entries = models_setting(getattr(settings, SETTING_NAME, None))
        parsed = _LISTED[0] = (
            frozenset(e for e in entries if "." not in e),
            frozenset(f"{e.split('.')[0]}.{e.split('.')[1].lower()}" for e in entries if "." in e),
        )
    return meta.app_label in parsed[0] or meta.label_lower in parsed[1]


def forget_answers() -> None:
    """LOAD_BALANCER changed (override_settings): MODELS may list other models now."""
    _LOAD_BALANCED.clear()
    _LISTED[0] = None


def _is_load_balanced(model: Any) -> bool:
    # a cycle: it imports routers
    from django_lb_shm.load_balancer_model import LoadBalancerModel

    if model is None:
        return False
    if isinstance(model, type) and issubclass(model, LoadBalancerModel):
        return True
    meta = getattr(model, "_meta", None)
    # Migrations' historical models ("__fake__") run on the one copy being migrated.
    if meta is None or getattr(model, "__module__", "") == "__fake__":
        return False
    if meta.proxy:
        return is_load_balanced(meta.concrete_model)
    if listed_in_models(meta) or any(is_load_balanced(parent) for parent in meta.parents):
        return True
    # Auto-created many-to-many tables between load-balanced models.
    if meta.auto_created:
        return any(
            is_load_balanced(f.related_model) for f in meta.fields if f.is_relation and f.related_model
        )
    return False


def chosen_alias(hints: dict) -> Optional[str]:
    """The real alias a load-balanced instance was read from with ``using()`` (a choice of the
    app): its related objects are read there too, as Django does.  None otherwise."""
    instance = hints.get("instance")
    if instance is None or not is_load_balanced(type(instance)):
        return None
    db = instance._state.db
    return db if db is not None and db != lb_alias() else None


def write_alias(hints: dict) -> Optional[str]:
    """The real alias a load-balanced instance's writes stay on: the database it was read from or
    saved to with ``using()`` when that is no copy (Django's multi-db).  None for the copies:
    writes to them go through the load balancer, whichever copy the instance was read from."""
    from django_lb_shm.query import is_copy  # a cycle: query imports routers

    chosen = chosen_alias(hints)
    return None if chosen is None or is_copy(chosen) else chosen


class LoadBalancerRouter:
    def db_for_read(self, model: Any, **hints: Any):
        if not is_load_balanced(model):
            return None
        return chosen_alias(hints) or lb_alias()

    def db_for_write(self, model: Any, **hints: Any):
        if not is_load_balanced(model):
            return None
        return write_alias(hints) or lb_alias()

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
        if instance is not None and is_load_balanced(type(instance)) and not is_load_balanced(model) \
                and not chosen_alias(hints):
            return DEFAULT_DB_ALIAS
        return None


def install_router() -> None:
    """Put the package's routers in Django's cached router list (again: see watch_settings)."""
    from django.db import router

    routers = router.routers  # cached list built from settings.DATABASE_ROUTERS
    if not any(isinstance(r, LoadBalancerRouter) for r in routers):
        routers.insert(0, LoadBalancerRouter())
    if not any(isinstance(r, PlainModelRouter) for r in routers):
        routers.append(PlainModelRouter())


def watch_settings() -> None:
    """Keep the routers and the MODELS answers right when a test overrides settings.

    override_settings(DATABASE_ROUTERS=...) makes Django rebuild its router list from that
    setting alone (django.test.signals), silently dropping the package's routers: they are put
    back after Django's own receiver -- imported first so that it is connected, and runs, first.
    """
    import django.test.signals  # noqa: F401
    from django.core.signals import setting_changed

    setting_changed.connect(_on_setting_changed, dispatch_uid="django_lb_shm.routers.setting_changed")


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "DATABASE_ROUTERS":
        if install_alias():   # as in AppConfig.ready(): no routers while the settings are invalid
            install_router()
    elif setting == SETTING_NAME:
        forget_answers()
