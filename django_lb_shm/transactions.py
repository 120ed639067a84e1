"""Transactions over the load-balanced alias.

``django_lb_shm.atomic()`` is ``django.db.transaction.atomic`` on the
load-balanced alias: the block's writes reach every database as one
transaction each, in the global write order, or reach none.  Inside the block,
reads before the first write are balanced as usual; the first write (or a
``select_for_update()``) opens the transaction on the first database, which
then serves the block's reads (so they see its writes) and holds the global
write order until the block ends.  Nested blocks are savepoints, as in Django.

A plain ``transaction.atomic()`` targets settings.DATABASES['default']; its
load-balanced writes join it through a twin block on the load-balanced alias
(``plain_atomic.py``) unless ``LOAD_BALANCER['PLAIN_ATOMIC']`` is ``'AUTOCOMMIT'``.
Load-balanced writes inside an atomic block of any other alias (or of 'default'
with ``'AUTOCOMMIT'``) are applied at once and are not undone if that block rolls
back: the client warns when it sees this.
"""
from __future__ import annotations

import warnings
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from django_lb_shm.backend.alias import lb_alias


class LoadBalancerTransactionWarning(RuntimeWarning):
    """A load-balanced write inside a transaction of another alias, which cannot include it."""


def atomic(using: Any = None, savepoint: bool = True, durable: bool = False) -> Any:
    """``transaction.atomic`` on the load-balanced alias (usable bare, called, or as a decorator)."""
    if callable(using):
        return transaction.atomic(lb_alias(), savepoint, durable)(using)
    return transaction.atomic(using=using or lb_alias(), savepoint=savepoint, durable=durable)


def warn_if_in_foreign_atomic(alias: str) -> None:
    """Warn when a load-balanced write runs inside another alias's atomic block."""
    for connection in connections.all(initialized_only=True):
        if connection.alias != alias and connection.in_atomic_block:
            warnings.warn(
                f"a load-balanced write inside transaction.atomic() on {connection.alias!r} is applied "
                "through the load balancer at once and is not rolled back with that block; use "
                "django_lb_shm.atomic() (transaction.atomic(using=<load-balanced alias>)) instead"
                + (" (or LOAD_BALANCER['PLAIN_ATOMIC'] = 'JOIN', the default, for blocks on 'default')."
                   if connection.alias == DEFAULT_DB_ALIAS else "."),
                LoadBalancerTransactionWarning,
                stacklevel=8,
            )
            return

