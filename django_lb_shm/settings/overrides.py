"""Run-time settings handed by ``LoadBalancerTestRunner`` to the coordinator it starts.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

from django_lb_shm.errors import ConfigurationError
from django_lb_shm.settings.validation import SETTING_NAME

# JSON {"DATABASES": {alias: {"NAME": ...}}, "LOAD_BALANCER": {...}, "SETTINGS": {...}}: set by
# LoadBalancerTestRunner (testing.py) for the coordinator it starts on the test databases.
# DATABASES and LOAD_BALANCER are applied in AppConfig.ready() of that coordinator's processes;
# SETTINGS (the test process's run-time settings: INSTALLED_APPS, MIDDLEWARE, ...) before django.setup().
OVERRIDES_ENV = "DJANGO_LB_SHM_SETTINGS_OVERRIDES"
# Never carried by SETTINGS: the two above have their own keys, and the coordinator logs its own way.
NOT_RUNTIME_SETTINGS = frozenset({"DATABASES", SETTING_NAME, "LOGGING", "LOGGING_CONFIG", "SETTINGS_MODULE"})


def _overrides_from_environment() -> dict:
    raw = os.environ.get(OVERRIDES_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{OVERRIDES_ENV} is not JSON ({exc}); it is set by LoadBalancerTestRunner "
                                 "for the coordinator it starts, and nowhere else") from None


def runtime_settings(settings: Any) -> dict:
    """The settings whose values differ from what the settings module gives, JSON-able ones only.

    Django's own runtests.py (and any test script that configures apps at run time) sets
    INSTALLED_APPS, MIDDLEWARE, TEMPLATES, ... after importing the settings module: the
    test coordinator, which imports that module itself, needs them to know the test apps'
    models and to pass the same system checks.
    """
    module = _settings_module(settings)
    declared = _declared_settings(module) if module else None   # None: settings.configure(), all run-time
    changed = {}
    for name in dir(settings):
        if not name.isupper() or name in NOT_RUNTIME_SETTINGS:
            continue
        value = getattr(settings, name)
        if declared is not None and getattr(declared, name, _MISSING) == value:
            continue
        try:
            changed[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue   # not JSON-able (a Path, a callable): the coordinator keeps the module's value
    return changed


_MISSING = object()


def _settings_module(settings: Any) -> Optional[str]:
    """Under override_settings the holder in front has SETTINGS_MODULE None: ask the one it wraps."""
    holder = getattr(settings, "_wrapped", settings)
    while holder is not None:
        module = getattr(holder, "SETTINGS_MODULE", None)
        if module:
            return module
        holder = getattr(holder, "default_settings", None)
    return None


def _declared_settings(module: str) -> Any:
    """A fresh Settings of ``module``; it sets TZ from TIME_ZONE as it loads, which must not leak."""
    from django.conf import Settings

    tz = os.environ.get("TZ")
    try:
        return Settings(module)
    finally:
        if tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = tz
        if hasattr(time, "tzset"):
            time.tzset()


def apply_runtime_settings_from_environment() -> None:
    """Before django.setup() in a coordinator of LoadBalancerTestRunner: the test process's settings."""
    from django.conf import settings

    for name, value in _overrides_from_environment().get("SETTINGS", {}).items():
        setattr(settings, name, value)


def apply_overrides_from_environment() -> None:
    from django.conf import settings

    overrides = _overrides_from_environment()
    if not overrides:
        return
    logging.getLogger("django_lb_shm").info("settings overridden by %s (a coordinator of LoadBalancerTestRunner)",
                                            OVERRIDES_ENV)
    for alias, changes in overrides.get("DATABASES", {}).items():
        if alias not in settings.DATABASES:
            raise ConfigurationError(f"{OVERRIDES_ENV} names database {alias!r}, not in settings.DATABASES")
        settings.DATABASES[alias].update(changes)   # in place: connections share these dicts
    if overrides.get(SETTING_NAME):
        setattr(settings, SETTING_NAME, {**getattr(settings, SETTING_NAME), **overrides[SETTING_NAME]})
