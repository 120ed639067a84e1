"""LoadBalancerModel: extend it instead of models.Model (the seed README's module path)."""
from __future__ import annotations

from typing import Any

from django.core import checks
from django.db import models, router
from django.db.models.signals import pre_save

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.checks import check_app_installed
from django_lb_shm.query import LoadBalancerManager, refuse_direct_write
from django_lb_shm.routers import is_load_balanced


class LoadBalancerModel(models.Model):
    """Abstract base: every query runs through the load balancer coordinator.

    Reads go to one database picked by the read algorithm; creates, updates and
    deletes go to every database in LOAD_BALANCER['DATABASES'], in one order.
    """

    objects = LoadBalancerManager()

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        kwargs["using"] = self._load_balanced_using(kwargs.get("using"), "save")
        super().save(*args, **kwargs)

    save.alters_data = True

    def delete(self, using: str | None = None, keep_parents: bool = False):
        return super().delete(using=self._load_balanced_using(using, "delete"), keep_parents=keep_parents)

    delete.alters_data = True

    def _load_balanced_using(self, using: str | None, method: str) -> str:
        """The load-balanced alias, or a database that is no copy when given (or read from)."""
        refuse_direct_write(type(self), using, method)
        if using is None:
            return router.db_for_write(type(self), instance=self) or lb_alias()
        return using


def _refuse_direct_save(sender: type, instance: Any, using: str | None = None, **kwargs: Any) -> None:
    """Every save of a load-balanced model (a LoadBalancerModel, or a plain one LOAD_BALANCER['MODELS']
    lists) names its database here, including the ones that bypass save(): serializers (``loaddata``)
    call ``Model.save_base(obj, using=...)`` directly."""
    if isinstance(instance, LoadBalancerModel) or is_load_balanced(sender):
        refuse_direct_write(sender, using, "save_base")


pre_save.connect(_refuse_direct_save, dispatch_uid="django_lb_shm.refuse_direct_save")
# Here rather than in AppConfig.ready(): it reports a project that forgot to install the app.
checks.register(check_app_installed, checks.Tags.models)
