"""Three tables with the same columns, so every target runs the same SQL shape.

* ``Item`` (LoadBalancerModel): the load-balanced path, through the coordinator.
* ``DirectItem`` (plain models.Model): the direct-ORM baseline on ONE database
  (``DirectItem.objects.using(alias)``), the floor of any overhead.
* ``PoolItem`` (plain models.Model): the Pgpool-II comparison, through a Django
  alias pointing at pgpool (native replication), kept apart so pgpool's own
  writes never touch the baseline's table.
"""
from django.db import models
from django.utils import timezone

from django_lb_shm import LoadBalancerModel


class Item(LoadBalancerModel):
    name = models.CharField(max_length=100)
    value = models.IntegerField(default=0)
    group = models.IntegerField(db_index=True)
    created = models.DateTimeField(default=timezone.now)


class DirectItem(models.Model):
    name = models.CharField(max_length=100)
    value = models.IntegerField(default=0)
    group = models.IntegerField(db_index=True)
    created = models.DateTimeField(default=timezone.now)


class PoolItem(models.Model):
    name = models.CharField(max_length=100)
    value = models.IntegerField(default=0)
    group = models.IntegerField(db_index=True)
    created = models.DateTimeField(default=timezone.now)
