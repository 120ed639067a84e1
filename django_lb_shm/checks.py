"""Django system checks for settings.LOAD_BALANCER (ids django_lb_shm.E0xx / W0xx).

Pure functions over settings: they never touch a database or the coordinator.
"""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .conf import SETTING_NAME, find_problems


def check_load_balancer_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, SETTING_NAME, None)
    messages: list[checks.CheckMessage] = []
    for problem in find_problems(raw, settings.DATABASES):
        level = checks.Error if problem.level == "error" else checks.Warning
        messages.append(level(problem.msg, hint=problem.hint, id=problem.id, obj=SETTING_NAME))
    return messages


def register() -> None:
    checks.register(check_load_balancer_settings, "django_lb_shm")
