"""Django system checks (ids django_lb_shm.E0xx / W0xx): settings.LOAD_BALANCER, how
load-balanced models relate to the others, and whether the copies have applied the same
migrations (W035).

Pure functions over settings and models, except W035: it reads each copy's
``django_migrations``, so, as Django's own database checks, only when the command names
databases (``migrate``, ``check --database``, the test runner; ``djangoloadbalancer check``,
``migrate`` and ``verify`` name every copy).  None of them asks the coordinator.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core import checks

from django_lb_shm.query import LoadBalancerQuerySet
from django_lb_shm.routers import is_load_balanced
from django_lb_shm.settings.config import get_config
from django_lb_shm.settings.validation import (
    SETTING_NAME,
    find_problems,
    models_setting,
)


def check_load_balancer_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, SETTING_NAME, None)
    messages: list[checks.CheckMessage] = []
    for problem in find_problems(raw, settings.DATABASES):
        level = checks.Error if problem.level == "error" else checks.Warning
        messages.append(level(problem.msg, hint=problem.hint, id=problem.id, obj=SETTING_NAME))
    return messages


# Tables every copy holds identically, written by `migrate` on each of them: a relation to
# them is as good on one copy as on another (GenericForeignKey's content type).
SHARED_BY_EVERY_COPY = {"contenttypes.contenttype"}


def check_load_balanced_models(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """A relation between a load-balanced model (a LoadBalancerModel, or listed in LOAD_BALANCER['MODELS'])
    and one that is not cannot hold on every copy."""
    from django.apps import apps

    messages: list[checks.CheckMessage] = []
    configs = app_configs or apps.get_app_configs()
    for model in (m for config in configs for m in config.get_models()):
        messages += _relation_problems(model)
        messages += _manager_problems(model)
    return messages


def _relation_problems(model: type) -> list[checks.CheckMessage]:
    from django.db import models

    problems = []
    fields = [f for f in model._meta.local_fields if f.is_relation and f.remote_field]
    fields += [f for f in model._meta.local_many_to_many if f.remote_field.through._meta.auto_created]
    for field in fields:
        related = field.related_model
        if not isinstance(related, type) or is_load_balanced(model) == is_load_balanced(related):
            continue
        label = f"{model._meta.label}.{field.name}"
        if is_load_balanced(model) or field.many_to_many:
            lb_side, plain = (model, related) if is_load_balanced(model) else (related, model)
            if plain._meta.label_lower in SHARED_BY_EVERY_COPY and _is_subclass_model(lb_side):
                continue
            problems.append(checks.Error(
                f"{label} relates the load-balanced {lb_side._meta.label} to {plain._meta.label}, which is "
                f"not load-balanced: {plain._meta.label}'s rows are in one database, the load-balanced rows in "
                "every copy, so foreign keys fail on the other copies, and joins and cascades see different rows.",
                hint=_make_it_load_balanced_hint(lb_side, plain)
                + " Or keep the key in a plain field (e.g. models.IntegerField). If every copy holds that table "
                  "identically by other means, silence django_lb_shm.E023.",
                obj=field, id="django_lb_shm.E023",
            ))
        elif field.db_constraint or field.remote_field.on_delete is not models.DO_NOTHING:
            problems.append(checks.Error(
                f"{label} points a model that is not load-balanced at the load-balanced "
                f"{related._meta.label}: deleting a {related._meta.object_name} would cascade into a table the "
                "load balancer does not write, and a foreign-key constraint on one copy would refuse deletes "
                "the other copies accept.",
                hint=_make_it_load_balanced_hint(related, model)
                + " Or declare it with on_delete=models.DO_NOTHING and db_constraint=False.",
                obj=field, id="django_lb_shm.E024",
            ))
    return problems


def _is_subclass_model(model: type) -> bool:
    # a cycle: it imports checks
    from django_lb_shm.load_balancer_model import LoadBalancerModel

    return issubclass(model, LoadBalancerModel)


def _make_it_load_balanced_hint(lb_side: type, plain: type) -> str:
    """How to load-balance the plain side too: by class, or by LOAD_BALANCER['MODELS']."""
    lb_meta, meta = lb_side._meta, plain._meta
    if _is_subclass_model(lb_side):
        return (f"Make {meta.object_name} a LoadBalancerModel, or list {meta.label!r} (or its app "
                f"{meta.app_label!r}) in LOAD_BALANCER['MODELS'].")
    if lb_meta.app_label != meta.app_label:
        return f"List both {lb_meta.app_label!r} and {meta.app_label!r} in LOAD_BALANCER['MODELS'] (or {meta.label!r})."
    return f"List {meta.label!r} in LOAD_BALANCER['MODELS'] too (or the whole app {meta.app_label!r})."


def check_models_setting(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """LOAD_BALANCER['MODELS'] names installed apps and models (E041); a proxy is listed with its
    concrete model (E042); an entry naming a LoadBalancerModel is redundant (W040)."""
    from django.apps import apps

    messages: list[checks.CheckMessage] = []
    for entry in models_setting(getattr(settings, SETTING_NAME, None)):
        if "." not in entry:
            if entry not in apps.app_configs:
                messages.append(_unknown_entry(entry, f"no installed app has the label {entry!r}",
                                               f"Installed app labels: {', '.join(sorted(apps.app_configs))}."))
            continue
        messages += _model_entry_problems(entry)
    return messages


def _model_entry_problems(entry: str) -> list[checks.CheckMessage]:
    from django.apps import apps

    app_label, name = entry.split(".")
    if app_label not in apps.app_configs:
        return [_unknown_entry(entry, f"no installed app has the label {app_label!r}",
                               f"Installed app labels: {', '.join(sorted(apps.app_configs))}.")]
    try:
        model = apps.get_model(app_label, name)
    except LookupError:
        names = ", ".join(sorted(m.__name__ for m in apps.get_app_config(app_label).get_models()))
        return [_unknown_entry(entry, f"app {app_label!r} has no model {name!r}",
                               f"Models of {app_label!r}: {names or '(none)'}; or list the whole app as {app_label!r}.")]
    if model._meta.proxy and not is_load_balanced(model):
        concrete = model._meta.concrete_model._meta.label
        return [checks.Error(
            f"LOAD_BALANCER['MODELS'] lists the proxy model {entry!r} but not its concrete model {concrete}: a proxy "
            "has no table of its own, its rows are those of the concrete model.",
            hint=f"List {concrete!r} (its proxies follow it).", obj=SETTING_NAME, id="django_lb_shm.E042",
        )]
    if _is_subclass_model(model):
        return [checks.Warning(
            f"LOAD_BALANCER['MODELS'] lists {entry!r}, a LoadBalancerModel: it is load-balanced anyway.",
            hint="Remove the entry.", obj=SETTING_NAME, id="django_lb_shm.W040",
        )]
    return []


def _unknown_entry(entry: str, what: str, hint: str) -> checks.CheckMessage:
    return checks.Error(
        f"LOAD_BALANCER['MODELS'] lists {entry!r}, but {what}: nothing is load-balanced for that entry.",
        hint=hint + " Entries are app labels ('auth') and 'app_label.ModelName' ('auth.User').",
        obj=SETTING_NAME, id="django_lb_shm.E041",
    )


def _manager_problems(model: type) -> list[checks.CheckMessage]:
    if not is_load_balanced(model) or not _is_subclass_model(model):
        return []   # a model listed in MODELS keeps its own managers
    return [
        checks.Warning(
            f"{model._meta.label}.{manager.name} is a manager whose querysets are not LoadBalancerQuerySets: "
            f"{model._meta.object_name}.{manager.name}.using('<a real alias>') can write one copy only.",
            hint="Base it on django_lb_shm.LoadBalancerManager, or build it with "
                 "Manager.from_queryset(<a subclass of django_lb_shm.LoadBalancerQuerySet>).",
            obj=model, id="django_lb_shm.W002",
        )
        for manager in model._meta.managers
        if not issubclass(getattr(manager, "_queryset_class", object), LoadBalancerQuerySet)
    ]


def check_app_installed(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """LoadBalancerModels in a project without 'django_lb_shm' in INSTALLED_APPS (E030).

    Registered when load_balancer_model.py is imported, not in ready(): without the app,
    ready() never runs, and neither would a check registered there.
    """
    from django.apps import apps

    if apps.is_installed("django_lb_shm"):
        return []
    models = [m for m in apps.get_models() if is_load_balanced(m) and _is_subclass_model(m)]
    if not models:
        return []
    labels = ", ".join(m._meta.label for m in models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")
    return [checks.Error(
        f"{labels} extend LoadBalancerModel, but 'django_lb_shm' is not in INSTALLED_APPS: its router is not "
        "installed, so router.db_for_write() answers 'default' for them while their writes still go to every "
        "copy through the coordinator, and the package's checks do not run.",
        hint="Add 'django_lb_shm' to INSTALLED_APPS.",
        obj=models[0], id="django_lb_shm.E030",
    )]


def check_metrics_dependency(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """METRICS set, but prometheus_client cannot be imported (E034).

    Not in settings.validation.find_problems: that also validates every app process's settings, which
    never serve metrics and need not have the supervisor's optional dependency.
    """
    raw = getattr(settings, SETTING_NAME, None)
    if not isinstance(raw, Mapping) or raw.get("METRICS") is None:
        return []
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        return [checks.Error(
            f"LOAD_BALANCER['METRICS'] is set, but prometheus_client cannot be imported ({exc}): the supervisor "
            "would serve no metrics.",
            hint="pip install 'django-lb-shm[metrics]' (or prometheus_client) where djangoloadbalancer runs, "
                 "or leave METRICS out.",
            obj=SETTING_NAME, id="django_lb_shm.E034",
        )]
    return []


def check_applied_migrations(app_configs: Any = None, databases: Any = None,
                             **kwargs: Any) -> list[checks.CheckMessage]:
    """W035: the copies differ in the applied migrations of the load-balanced apps.

    Only when ``databases`` names a load-balanced database (or the load-balanced alias);
    a copy that cannot be read (down, a SQLite file that does not exist) is left out.
    """
    from django_lb_shm.databases.schema import (  # app start-up stays light
        behind_copies,
        load_balanced_apps,
        missing_migrations,
    )

    try:
        config = get_config()
    except Exception:   # invalid settings: E0xx says so
        return []
    if not databases or not set(databases) & {*config.databases, config.alias}:
        return []
    app_labels = load_balanced_apps()
    applied = {alias: found for alias in config.databases
               if (found := _applied_migrations_of(alias, app_labels)) is not None}
    missing = {alias: names for alias, names in missing_migrations(applied).items() if names}
    if not missing:
        return []
    behind = behind_copies(applied)
    lacks = "; ".join(f"{alias} lacks {', '.join(names)}{'' if alias in behind else ' (but has others the rest lack)'}"
                      for alias, names in missing.items())
    return [checks.Warning(
        f"The load-balanced databases differ in applied migrations: {lacks}. The coordinator serves no reads "
        "from a copy that lacks migrations another copy has applied, and applies no writes there "
        "(SCHEMA_BEHIND: they wait in its journal), until it has them.",
        hint="Run `djangoloadbalancer migrate`: it migrates every copy (plain `manage.py migrate` migrates one).",
        obj=SETTING_NAME, id="django_lb_shm.W035",
    )]


def _applied_migrations_of(alias: str, app_labels: frozenset) -> Any:
    """The applied migrations of ``app_labels`` on ``alias`` (read directly), or None when it cannot be read.
    A connection this opens is closed again."""
    from django.db import connections

    # app start-up stays light (shared memory)
    from django_lb_shm.databases.ownership import sqlite_path
    from django_lb_shm.databases.schema import applied_migrations

    connection = connections[alias]
    if connection.vendor == "sqlite" and not os.path.exists(sqlite_path(connection.settings_dict)):
        return None   # connecting would create an empty database in its place
    was_open = connection.connection is not None
    try:
        with connection.cursor() as cursor:
            def query(sql: str, params: tuple) -> list:
                cursor.execute(sql, params)
                return cursor.fetchall()

            return applied_migrations(query, connection.vendor, app_labels)
    except Exception:
        return None
    finally:
        if not was_open:
            connection.close()


def register() -> None:
    checks.register(check_load_balancer_settings, "django_lb_shm")
    checks.register(check_metrics_dependency, "django_lb_shm")
    checks.register(check_load_balanced_models, checks.Tags.models)
    checks.register(check_models_setting, "django_lb_shm", checks.Tags.models)
    checks.register(check_applied_migrations, "django_lb_shm", checks.Tags.database)
