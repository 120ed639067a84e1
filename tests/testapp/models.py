import uuid

import django
from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from django_lb_shm import LoadBalancerModel


class Destination(LoadBalancerModel):
    """The seed README's model."""

    name = models.CharField(max_length=100)
    desc = models.CharField(max_length=100)


class Author(LoadBalancerModel):
    name = models.CharField(max_length=100, unique=True)
    born = models.DateField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    token = models.UUIDField(default=uuid.uuid4)
    rating = models.IntegerField(default=0)

    class Meta:
        ordering = ["name"]


class Tag(LoadBalancerModel):
    label = models.CharField(max_length=50, unique=True)

    def __str__(self):
        return self.label


class Book(LoadBalancerModel):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    tags = models.ManyToManyField(Tag, related_name="books", blank=True)
    pages = models.IntegerField(default=100)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    published = models.DateField(default=timezone.now)

    class Meta:
        ordering = ["id"]


class Review(LoadBalancerModel):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="reviews")
    stars = models.IntegerField()
    text = models.TextField(blank=True)


class Token(LoadBalancerModel):
    """A model whose primary key the app chooses (no generated keys)."""

    key = models.UUIDField(primary_key=True, default=uuid.uuid4)
    label = models.CharField(max_length=50)


class Note(models.Model):
    """Not load-balanced (on 'default'), pointing at load-balanced rows the way check E024 allows."""

    author = models.ForeignKey(Author, on_delete=models.DO_NOTHING, db_constraint=False, related_name="notes")
    text = models.CharField(max_length=100)


class Stamp(LoadBalancerModel):
    """Values a database could compute itself: the clock, random numbers (tests/test_determinism.py)."""

    label = models.CharField(max_length=50)
    at = models.DateTimeField(null=True)
    day = models.DateField(null=True)
    number = models.FloatField(null=True)
    text = models.CharField(max_length=100, blank=True, default="")
    now = models.CharField(max_length=100, blank=True, default="")   # a column named like the function
    # Django 5: the database's own default (DEFAULT in a plain INSERT, evaluated by each copy)
    created = models.DateTimeField(**({"db_default": Now()} if django.VERSION >= (5, 0) else {"null": True}))
