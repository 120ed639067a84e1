"""Registers the virtual load-balanced connection alias with Django's connection handler."""
from __future__ import annotations

import logging

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from django_lb_shm.settings.config import get_config
from django_lb_shm.settings.validation import SETTING_NAME, find_problems

logger = logging.getLogger("django_lb_shm")

ENGINE = "django_lb_shm.backend"


def install_alias() -> bool:
    """Add the alias to ``connections``; False (and no alias) while the settings are invalid.

    The system checks report invalid settings; queries then fail with a clear
    ConfigurationError from :func:`lb_alias`.
    """
    raw = getattr(settings, SETTING_NAME, None)
    if any(p.level == "error" for p in find_problems(raw, settings.DATABASES)):
        return False
    config = get_config()
    if config.alias in connections.settings:
        return True
    target = settings.DATABASES[config.databases[0]]
    entry = {
        "ENGINE": ENGINE,
        "NAME": target.get("NAME", ""),
        "TIME_ZONE": target.get("TIME_ZONE"),
        "LB_TARGET_ENGINE": target["ENGINE"],
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "CONN_MAX_AGE": None,
        "OPTIONS": {},
        "TEST": {"MIGRATE": False},
    }
    configured = connections.configure_settings(
        {DEFAULT_DB_ALIAS: dict(settings.DATABASES[DEFAULT_DB_ALIAS]), config.alias: entry}
    )
    # A copy: settings.DATABASES itself stays as the project wrote it.
    connections.__dict__["settings"] = {**connections.settings, config.alias: configured[config.alias]}
    return True


def lb_alias() -> str:
    """The alias of the load-balanced connection (installing it on first use)."""
    config = get_config()  # raises ConfigurationError naming the bad key
    if config.alias not in connections.settings:
        install_alias()
    return config.alias
