"""Plain models (models.Model, no LoadBalancerModel) that the test settings load-balance
through LOAD_BALANCER['MODELS'] = ['plainlbapp'] (tests/conftest.py)."""
from django.db import models

from tests.testapp.models import Author, Tag


class PlainItem(models.Model):
    name = models.CharField(max_length=100, unique=True)
    qty = models.IntegerField(default=0)
    tags = models.ManyToManyField(Tag, related_name="plain_items", blank=True)   # auto-created through

    class Meta:
        ordering = ["id"]


class PlainOwned(models.Model):
    """A plain model pointing at a LoadBalancerModel, with a cascade and a constraint: both load-balanced."""

    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="plain_owned")
    label = models.CharField(max_length=50)


class PlainBundle(models.Model):
    name = models.CharField(max_length=50)
    items = models.ManyToManyField(PlainItem, through="BundleItem", related_name="bundles")


class BundleItem(models.Model):
    """An explicit many-to-many through table."""

    bundle = models.ForeignKey(PlainBundle, on_delete=models.CASCADE)
    item = models.ForeignKey(PlainItem, on_delete=models.CASCADE)
    count = models.IntegerField(default=1)


class PlainItemProxy(PlainItem):
    class Meta:
        proxy = True
        ordering = ["-id"]


class SpecialItem(PlainItem):
    """Multi-table inheritance: a row here and one in plainlbapp_plainitem."""

    power = models.IntegerField(default=0)
