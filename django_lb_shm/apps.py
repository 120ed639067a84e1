import sys
from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from django_lb_shm import checks
from django_lb_shm.backend.alias import install_alias
from django_lb_shm.plain_atomic import install as install_plain_atomic
from django_lb_shm.routers import install_router, watch_settings
from django_lb_shm.settings.config import get_config
from django_lb_shm.settings.overrides import apply_overrides_from_environment


class DjangoLbShmConfig(AppConfig):
    name = "django_lb_shm"
    label = "django_lb_shm"
    verbose_name = "Database load balancer"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # Checks only, the virtual connection alias (a settings entry; no I/O) and the plain atomic() twin.
        apply_overrides_from_environment()   # a coordinator started by LoadBalancerTestRunner
        checks.register()
        if install_alias():
            install_router()
        watch_settings()
        install_plain_atomic()   # a no-op per block while the settings are invalid or PLAIN_ATOMIC is AUTOCOMMIT
        post_migrate.connect(warn_one_copy_changed, dispatch_uid="django_lb_shm.warn_one_copy_changed")


# `djangoloadbalancer migrate` sets this: it migrates every copy in turn.
migrating_every_database = False
_warned: set = set()


def warn_one_copy_changed(sender: Any, verbosity: int = 1, using: str = "", **kwargs: Any) -> None:
    """After `manage.py migrate` (or `flush`) of ONE load-balanced database: say the others were not."""
    if verbosity < 1 or migrating_every_database or using in _warned:
        return
    try:
        databases = get_config().databases
    except Exception:  # invalid settings: the checks say so
        return
    if using not in databases:
        return
    _warned.add(using)
    others = ", ".join(repr(alias) for alias in databases if alias != using)
    stream = kwargs.get("stdout") or sys.stdout
    stream.write(
        f"django_lb_shm: only database {using!r} was changed; the other load-balanced databases ({others}) "
        "were not. Migrate every copy with `djangoloadbalancer migrate`; empty the load-balanced tables "
        "of every copy with `manage.py flush --database <the load-balanced alias>`.\n"
    )
