"""LoadBalancerQuerySet and LoadBalancerManager.

Chaining stays Django's own; the only change is *where* queries run: on the
virtual load-balanced alias, i.e. through the coordinator.  Pointing a query at
one copy with ``using()`` is allowed for reads (a direct look at one copy) and
refused for writes, which must reach every copy.  A database that is no copy
(not in LOAD_BALANCER['DATABASES']) is the app's own business: reads and writes
with ``using()`` go there, as in Django.
"""
from __future__ import annotations

from typing import Any

from django.db import models

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.errors import NotSupportedError
from django_lb_shm.routers import chosen_alias, write_alias
from django_lb_shm.settings.config import get_config


def is_copy(alias: str | None) -> bool:
    """Whether ``alias`` is one of the load-balanced copies (LOAD_BALANCER['DATABASES'])."""
    return alias is not None and alias in get_config().databases


def refuse_direct_write(model: type, using: str | None, method: str) -> None:
    """A write to one copy alone would make the copies differ.  Other real databases are
    not copies: writing there changes no copy (Django's multi-db use of ``using()``)."""
    if is_copy(using):
        raise NotSupportedError(
            f"{model.__name__}.{method}() with using={using!r} would write to one copy only "
            "(an alias of LOAD_BALANCER['DATABASES']); the writes of load-balanced models (LoadBalancerModel, "
            "LOAD_BALANCER['MODELS']) go through the load balancer to every copy. "
            "Remove using= (or use the load-balanced alias; for fixtures: "
            f"`manage.py loaddata <fixture> --database {lb_alias()}`)."
        )


class LoadBalancerQuerySet(models.QuerySet):
    def __init__(self, model: Any = None, query: Any = None, using: str | None = None, hints: Any = None):
        super().__init__(model=model, query=query, using=using, hints=hints)

    @property
    def db(self) -> str:
        if self._db is None:
            if self._hints:   # a related manager of an instance read (or saved) with using()

                chosen = write_alias(self._hints) if self._for_write else chosen_alias(self._hints)
                return chosen or lb_alias()
            return lb_alias()
        return self._db

    # -- METHODS THAT DO DATABASE WRITES: refuse one-database writes ----------
    def _check_write(self, method: str) -> None:
        refuse_direct_write(self.model, self._db, method)

    def create(self, **kwargs: Any):
        self._check_write("create")
        return super().create(**kwargs)

    def bulk_create(self, objs: Any, batch_size: Any = None, ignore_conflicts: bool = False, *args: Any,
                    **kwargs: Any):
        self._check_write("bulk_create")
        return super().bulk_create(objs, batch_size, ignore_conflicts, *args, **kwargs)

    def bulk_update(self, objs: Any, fields: Any, batch_size: Any = None):
        self._check_write("bulk_update")
        return super().bulk_update(objs, fields, batch_size=batch_size)

    def get_or_create(self, defaults: Any = None, **kwargs: Any):
        self._check_write("get_or_create")
        return super().get_or_create(defaults=defaults, **kwargs)

    def update_or_create(self, defaults: Any = None, **kwargs: Any):
        self._check_write("update_or_create")
        return super().update_or_create(defaults=defaults, **kwargs)

    def update(self, **kwargs: Any):
        self._check_write("update")
        return super().update(**kwargs)

    def delete(self):
        self._check_write("delete")
        return super().delete()

    def _raw_delete(self, using: str):
        refuse_direct_write(self.model, using, "delete")
        return super()._raw_delete(using)


class LoadBalancerManager(models.Manager.from_queryset(LoadBalancerQuerySet)):
    """Default manager of LoadBalancerModel: queries go through the coordinator."""

    use_in_migrations = False
