"""LOAD_BALANCER['MODELS'] (issue 19): plain models load-balanced by setting -- tests/plainlbapp is
listed in the suite's settings --, the routers surviving a rebuilt router list, and related
objects of an instance read with using() staying on that alias."""
from __future__ import annotations

import io
import json

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections, router
from django.test import override_settings

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.checks import check_load_balanced_models, check_models_setting
from django_lb_shm.settings.validation import find_problems
from django_lb_shm.errors import NotSupportedError
from django_lb_shm.routers import is_load_balanced
from tests.plainlbapp.models import BundleItem, PlainBundle, PlainItem, PlainItemProxy, PlainOwned, SpecialItem
from tests.support.lb import ALIASES, table_rows
from tests.testapp.models import Author, Book, Note, Tag

PLAIN_TABLES = ["plainlbapp_plainitem", "plainlbapp_plainitem_tags", "plainlbapp_plainowned",
                "plainlbapp_plainbundle", "plainlbapp_bundleitem", "plainlbapp_specialitem"]


def rows_everywhere(handle, table: str) -> list:
    """The rows of ``table``, asserted the same on every copy (once the coordinator has applied every write)."""
    handle.wait_drained()
    rows = {alias: table_rows(alias, table) for alias in ALIASES}
    assert all(found == rows["default"] for found in rows.values()), rows
    return rows["default"]


def ids(messages: list) -> list[str]:
    return [m.id for m in messages]


def with_models(*entries: str) -> dict:
    return dict(settings.LOAD_BALANCER, MODELS=list(entries))


# -- what is load-balanced -------------------------------------------------------------------------
def test_listed_models_their_proxies_children_and_through_tables_are_load_balanced():
    from django.db.migrations.loader import MigrationLoader

    for model in (PlainItem, PlainOwned, PlainBundle, BundleItem, PlainItemProxy, SpecialItem,
                  PlainItem.tags.through):
        assert is_load_balanced(model), model
        assert router.db_for_read(model) == lb_alias() and router.db_for_write(model) == lb_alias()
    assert not is_load_balanced(Note) and router.db_for_write(Note) == "default"
    # Migrations' historical models run on the one copy being migrated.
    state = MigrationLoader(None, ignore_no_migrations=True).project_state(("plainlbapp", "0001_initial"))
    historical = state.apps.get_model("plainlbapp", "PlainItem")
    assert not is_load_balanced(historical)
    row = historical(name="by a data migration")
    row.save(using="DB1")                                     # not refused, as RunPython needs
    assert "by a data migration" in [r[1] for r in table_rows("DB1", "plainlbapp_plainitem")]
    row.delete()
    assert "by a data migration" not in [r[1] for r in table_rows("DB1", "plainlbapp_plainitem")]


def test_the_answers_follow_an_overridden_models_setting():
    with override_settings(LOAD_BALANCER=with_models()):
        assert not is_load_balanced(PlainItem) and not is_load_balanced(SpecialItem)
        assert router.db_for_write(PlainItem) == "default"
    with override_settings(LOAD_BALANCER=with_models("plainlbapp.PlainItem")):
        assert is_load_balanced(PlainItem) and is_load_balanced(SpecialItem)   # a child of a listed model
        assert is_load_balanced(PlainItem.tags.through) and not is_load_balanced(PlainBundle)
    assert is_load_balanced(PlainBundle)


def test_the_coordinators_write_guard_schema_verify_and_resync_see_the_listed_tables():
    from django_lb_shm.coordinator.write_guard import WriteGuard
    from django_lb_shm.ops.resync import copy_plan
    from django_lb_shm.databases.schema import load_balanced_apps
    from django_lb_shm.ops.verify import load_balanced_tables

    assert set(PLAIN_TABLES) <= WriteGuard.for_installed_models().tables
    assert "plainlbapp" in load_balanced_apps()
    assert set(PLAIN_TABLES) <= {spec.table for spec in load_balanced_tables()}
    order = [spec.table for spec in copy_plan("default")[0]]
    for child, parent in (("plainlbapp_plainowned", "testapp_author"), ("plainlbapp_bundleitem", "plainlbapp_plainitem"),
                          ("plainlbapp_specialitem", "plainlbapp_plainitem"),
                          ("plainlbapp_plainitem_tags", "testapp_tag")):
        assert order.index(parent) < order.index(child), order


# -- reads and writes through the load balancer ------------------------------------------------------
def test_plain_models_are_written_to_every_copy_and_read_back(coordinator, replicas):
    item = PlainItem.objects.create(name="bolt", qty=3)
    PlainItem.objects.filter(pk=item.pk).update(qty=5)
    item.refresh_from_db()
    assert item.qty == 5 and item._state.db == lb_alias()
    item.qty = 7
    item.save()
    assert [PlainItem.objects.get(name="bolt").qty for _ in range(6)] == [7] * 6   # every copy answers the same
    doomed = PlainItem.objects.create(name="nut")
    doomed.delete()
    assert rows_everywhere(coordinator, "plainlbapp_plainitem") == [(item.pk, "bolt", 7)]
    replicas.assert_identical(PLAIN_TABLES)


def test_relations_m2m_proxies_and_children(coordinator, replicas):
    author = Author.objects.create(name="Ann")
    tags = [Tag.objects.create(label=f"t{i}") for i in range(3)]
    item = PlainItem.objects.create(name="bolt")
    item.tags.add(*tags[:2])                                    # auto-created through table
    bundle = PlainBundle.objects.create(name="kit")
    bundle.items.add(item, through_defaults={"count": 4})       # explicit through model
    PlainOwned.objects.create(author=author, label="mine")
    proxied = PlainItemProxy.objects.create(name="proxied")
    special = SpecialItem.objects.create(name="special", power=9)   # a row in two tables

    assert sorted(t.label for t in item.tags.all()) == ["t0", "t1"]
    assert list(tags[0].plain_items.all()) == [item]
    assert BundleItem.objects.get().count == 4 and list(bundle.items.all()) == [item]
    assert [p.name for p in PlainItemProxy.objects.all()] == ["special", "proxied", "bolt"]
    assert PlainItem.objects.get(pk=special.pk).specialitem.power == 9
    assert proxied.pk in PlainItem.objects.values_list("pk", flat=True)
    assert [o.label for o in author.plain_owned.all()] == ["mine"]

    author.delete()                                             # cascades into the plain model, everywhere
    special.delete()                                            # both of its rows
    tags[0].delete()
    assert rows_everywhere(coordinator, "plainlbapp_plainowned") == []
    assert rows_everywhere(coordinator, "plainlbapp_specialitem") == []
    assert [row[1] for row in rows_everywhere(coordinator, "plainlbapp_plainitem")] == ["bolt", "proxied"]
    assert [row[2] for row in rows_everywhere(coordinator, "plainlbapp_plainitem_tags")] == [tags[1].pk]
    replicas.assert_identical(PLAIN_TABLES)


def test_a_listed_plain_model_saved_on_one_database_is_refused_like_a_load_balancer_model(coordinator):
    with pytest.raises(NotSupportedError, match=r"PlainItem.save_base\(\) with using='default' would write to one"):
        PlainItem(name="lonely").save(using="default")
    with pytest.raises(NotSupportedError, match="SpecialItem"):
        SpecialItem(name="lonely").save(using="DB1")
    assert all(table_rows(alias, "plainlbapp_plainitem") == [] for alias in ALIASES)


def test_a_plain_model_inside_a_load_balanced_transaction(coordinator, replicas):
    with pytest.raises(RuntimeError):
        with django_lb_shm.atomic():
            PlainItem.objects.create(name="rolled back")
            raise RuntimeError("undo")
    with django_lb_shm.atomic():
        PlainItem.objects.create(name="kept")
        assert PlainItem.objects.filter(name="kept").exists()
    assert [row[1] for row in rows_everywhere(coordinator, "plainlbapp_plainitem")] == ["kept"]


def test_fixtures_of_plain_models_load_through_the_load_balanced_alias(coordinator, replicas, tmp_path):
    fixture = tmp_path / "plain.json"
    fixture.write_text(json.dumps([
        {"model": "testapp.tag", "pk": 50, "fields": {"label": "fixed"}},
        {"model": "plainlbapp.plainitem", "pk": 7, "fields": {"name": "from fixture", "qty": 2, "tags": [50]}},
        {"model": "plainlbapp.specialitem", "pk": 8, "fields": {"power": 3}},
        {"model": "plainlbapp.plainitem", "pk": 8, "fields": {"name": "special fixture", "qty": 0, "tags": []}},
    ]))
    with pytest.raises(NotSupportedError, match=rf"--database {lb_alias()}"):
        call_command("loaddata", str(fixture), stdout=io.StringIO())   # into 'default' alone
    assert all(table_rows(alias, "plainlbapp_plainitem") == [] for alias in ALIASES)
    call_command("loaddata", str(fixture), database=lb_alias(), stdout=io.StringIO())
    assert rows_everywhere(coordinator, "plainlbapp_plainitem") == [(7, "from fixture", 2), (8, "special fixture", 0)]
    assert rows_everywhere(coordinator, "plainlbapp_plainitem_tags")[0][1:] == (7, 50)
    assert SpecialItem.objects.get().power == 3
    replicas.assert_identical(PLAIN_TABLES)


def test_verify_compares_the_plain_tables(coordinator):
    from django_lb_shm.ops.verify import compare_tables

    PlainItem.objects.create(name="bolt", qty=1)
    coordinator.wait_drained()
    with connections["DB2"].cursor() as cursor:
        cursor.execute("UPDATE plainlbapp_plainitem SET qty = 99")   # behind the coordinator's back
    reports = {r.table: r for r in compare_tables(tables=PLAIN_TABLES, recheck_delay=None)}
    assert set(reports) == set(PLAIN_TABLES)
    assert not reports["plainlbapp_plainitem"].ok and reports["plainlbapp_plainitem"].odd_ones == ("DB2",)
    assert all(r.ok for table, r in reports.items() if table != "plainlbapp_plainitem")


# -- system checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["auth", {"auth": True}, ["auth", 3], ["auth.User.extra"], [".User"]])
def test_a_models_setting_of_the_wrong_shape_is_a_settings_error(value):
    problems = find_problems(dict(settings.LOAD_BALANCER, MODELS=value), settings.DATABASES)
    assert [p.id for p in problems] == ["django_lb_shm.E040"]
    assert "LOAD_BALANCER['MODELS']" in problems[0].msg


def test_the_suite_settings_pass_the_models_checks():
    assert check_models_setting() == []
    assert check_load_balanced_models() == []


def test_unknown_apps_and_models_are_errors_naming_the_entry_and_what_is_installed():
    with override_settings(LOAD_BALANCER=with_models("shop", "plainlbapp.Nope", "nowhere.Model")):
        messages = check_models_setting()
    assert ids(messages) == ["django_lb_shm.E041"] * 3
    assert "'shop'" in messages[0].msg and "plainlbapp" in messages[0].hint and "contenttypes" in messages[0].hint
    assert "has no model 'Nope'" in messages[1].msg and "PlainItem" in messages[1].hint
    assert "'nowhere'" in messages[2].msg


def test_a_proxy_alone_is_an_error_and_a_load_balancer_model_entry_a_warning():
    with override_settings(LOAD_BALANCER=with_models("plainlbapp.PlainItemProxy", "testapp.Author")):
        messages = check_models_setting()
    assert ids(messages) == ["django_lb_shm.E042", "django_lb_shm.W040"]
    assert "'plainlbapp.PlainItem'" in messages[0].hint


def test_auth_without_contenttypes_is_a_relation_that_cannot_hold():
    with override_settings(LOAD_BALANCER=with_models("plainlbapp", "auth")):
        messages = [m for m in check_load_balanced_models() if m.obj.model._meta.app_label == "auth"]
    assert ids(messages) == ["django_lb_shm.E023"]
    assert "auth.Permission.content_type" in messages[0].msg and "contenttypes.ContentType" in messages[0].msg
    assert "'auth' and 'contenttypes'" in messages[0].hint
    with override_settings(LOAD_BALANCER=with_models("plainlbapp", "contenttypes")):
        messages = [m for m in check_load_balanced_models() if m.obj.model._meta.app_label == "auth"]
    assert ids(messages) == ["django_lb_shm.E024"] and "'contenttypes' and 'auth'" in messages[0].hint
    with override_settings(LOAD_BALANCER=with_models("plainlbapp", "auth", "contenttypes")):
        assert check_load_balanced_models() == [] and check_models_setting() == []


def test_a_listed_model_pointing_at_an_unlisted_one_is_an_error():
    with override_settings(LOAD_BALANCER=with_models("plainlbapp.PlainBundle", "plainlbapp.BundleItem")):
        messages = {f"{m.obj.model._meta.label}.{m.obj.name}": m for m in check_load_balanced_models()}
        assert check_models_setting() == []
    assert sorted(messages) == ["plainlbapp.BundleItem.item", "plainlbapp.PlainItem.tags", "plainlbapp.PlainOwned.author"]
    assert messages["plainlbapp.BundleItem.item"].id == "django_lb_shm.E023"
    assert "List 'plainlbapp.PlainItem' in LOAD_BALANCER['MODELS'] too" in messages["plainlbapp.BundleItem.item"].hint
    # Unlisted plain models next to LoadBalancerModels, as before MODELS existed:
    assert messages["plainlbapp.PlainItem.tags"].id == "django_lb_shm.E023"
    assert messages["plainlbapp.PlainOwned.author"].id == "django_lb_shm.E024"
    assert "Make PlainOwned a LoadBalancerModel, or list 'plainlbapp.PlainOwned'" in \
        messages["plainlbapp.PlainOwned.author"].hint


# -- routers that survive a rebuilt router list -------------------------------------------------------
class ReadOnlyElsewhere:
    """A project router: Note rows are read from DB1."""

    def db_for_read(self, model, **hints):
        return "DB1" if model is Note else None


def test_the_routers_survive_override_settings_of_database_routers(coordinator, replicas):
    project_router = ReadOnlyElsewhere()
    with override_settings(DATABASE_ROUTERS=[project_router]):
        assert project_router in router.routers
        assert router.db_for_write(PlainItem) == lb_alias() and router.db_for_read(Note) == "DB1"
        PlainItem.objects.create(name="under override")
        Book.objects.create(title="t", author=Author.objects.create(name="Ann"))
    assert router.db_for_write(PlainItem) == lb_alias() and project_router not in router.routers
    PlainItem.objects.create(name="after")
    assert [row[1] for row in rows_everywhere(coordinator, "plainlbapp_plainitem")] == ["under override", "after"]
    replicas.assert_identical()


# -- routing fidelity -------------------------------------------------------------------------------
def test_related_objects_of_an_instance_read_with_using_stay_on_that_alias(coordinator):
    author = Author.objects.create(name="Ann")
    book = Book.objects.create(title="t", author=author)
    item = PlainItem.objects.create(name="bolt")
    item.tags.add(Tag.objects.create(label="x"))
    coordinator.wait_drained()
    with connections["DB1"].cursor() as cursor:   # DB1 made to differ, to tell the copies apart
        cursor.execute("UPDATE testapp_author SET name = 'Ann on DB1'")
        cursor.execute("UPDATE testapp_book SET title = 't on DB1'")
        cursor.execute("UPDATE testapp_tag SET label = 'x on DB1'")

    on_db1 = Book.objects.using("DB1").get(pk=book.pk)
    assert on_db1.author.name == "Ann on DB1" and on_db1.author._state.db == "DB1"
    assert [b.title for b in Author.objects.using("DB1").get().books.all()] == ["t on DB1"]
    item_on_db1 = PlainItem.objects.using("DB1").get()
    assert [t.label for t in item_on_db1.tags.all()] == ["x on DB1"]
    # Read without using(): through the load balancer, from any copy; writes always reach every copy.
    assert Book.objects.get(pk=book.pk).author._state.db == lb_alias()
    item_on_db1.qty = 4
    item_on_db1.save()
    item_on_db1.tags.add(Tag.objects.create(label="y"))
    Author.objects.using("DB1").get().books.create(title="second")
    assert [row[2] for row in rows_everywhere(coordinator, "plainlbapp_plainitem")] == [4]
    assert len(rows_everywhere(coordinator, "plainlbapp_plainitem_tags")) == 2
    assert all("second" in [row[1] for row in table_rows(alias, "testapp_book")] for alias in ALIASES)


def test_refresh_from_db_using_a_real_alias_inside_a_load_balanced_transaction(coordinator):
    item = PlainItem.objects.create(name="bolt", qty=1)
    author = Author.objects.create(name="Ann")
    coordinator.wait_drained()
    with django_lb_shm.atomic():
        PlainItem.objects.filter(pk=item.pk).update(qty=2)
        Author.objects.filter(pk=author.pk).update(rating=3)
        item.refresh_from_db()                  # the transaction's own view
        author.refresh_from_db()
        assert (item.qty, author.rating) == (2, 3)
        item.refresh_from_db(using="default")   # as Django documents: that database, as committed
        author.refresh_from_db(using="default", fields=["rating"])
        assert (item.qty, author.rating) == (1, 0)
        assert item._state.db == "default" and author._state.db == "default"
    coordinator.wait_drained()
    item.refresh_from_db(using="default")
    author.refresh_from_db(using="default")
    assert (item.qty, author.rating) == (2, 3)


# -- the coordinator process reads MODELS from its own settings ------------------------------------------
def test_the_coordinators_write_guard_follows_its_models_setting(coordinator):
    """The suite's coordinator lists plainlbapp, not auth (see the auth test below for the other way)."""
    from django_lb_shm.errors import RequestRejected

    with connections[lb_alias()].cursor() as cursor:
        cursor.execute("UPDATE plainlbapp_plainitem SET qty = 1")   # listed: accepted
        with pytest.raises(RequestRejected, match="auth.User, which is not a LoadBalancerModel nor listed "
                                                  r"in LOAD_BALANCER\['MODELS'\]"):
            cursor.execute("UPDATE auth_user SET is_staff = %s", [True])


def test_a_coordinator_refuses_to_start_when_its_models_cannot_hold(lb_factory):
    handle = lb_factory("unlisted", start=False, MODELS=[])   # plainlbapp's relations to testapp cannot hold
    with pytest.raises(AssertionError, match="django_lb_shm.E024"):
        handle.start(timeout=60)


# -- django.contrib.auth and contenttypes, listed ----------------------------------------------------------
AUTH_TABLES = ["auth_user", "auth_group", "auth_user_groups", "auth_user_user_permissions", "auth_group_permissions",
               "auth_permission", "django_content_type"]


@pytest.fixture
def auth_load_balanced(lb_factory):
    """A coordinator, and this process, with auth and contenttypes in MODELS; their rows removed afterwards."""
    handle = lb_factory("auth", MODELS=["plainlbapp", "auth", "contenttypes"])
    yield handle
    handle.wait_drained()
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            for table in ("auth_user_groups", "auth_user_user_permissions", "auth_group_permissions", "auth_user",
                          "auth_group"):
                cursor.execute(f"DELETE FROM {table}")
            cursor.execute("DELETE FROM django_content_type WHERE model = 'madeupmodel'")
        connections[alias].close()


def test_auth_and_contenttypes_listed_are_load_balanced_end_to_end(auth_load_balanced):
    from django.contrib.auth import authenticate
    from django.contrib.auth.models import Group, Permission, User
    from django.contrib.contenttypes.models import ContentType

    from django_lb_shm.ops.verify import compare_tables

    assert check_load_balanced_models() == [] and check_models_setting() == []
    assert all(router.db_for_write(m) == lb_alias() for m in (User, Group, Permission, ContentType))
    editors = Group.objects.create(name="editors")
    editors.permissions.add(Permission.objects.get(content_type=ContentType.objects.get_for_model(Author),
                                                   codename="change_author"))
    user = User.objects.create_user("ann", password="secret")
    user.groups.add(editors)
    user.user_permissions.add(Permission.objects.get(codename="add_book"))
    ContentType.objects.create(app_label="testapp", model="madeupmodel")   # created at run time, on every copy
    assert authenticate(username="ann", password="secret") == user
    with connections[lb_alias()].cursor() as cursor:   # this coordinator lists auth: its guard lets it through
        cursor.execute("UPDATE auth_user SET is_staff = %s", [True])
    assert User.objects.get().is_staff
    user = User.objects.get(username="ann")   # fresh permission caches
    assert user.has_perm("testapp.change_author") and user.has_perm("testapp.add_book")
    assert not user.has_perm("testapp.delete_book")
    with pytest.raises(NotSupportedError, match=rf"--database {lb_alias()}|using='default'"):
        call_command("createsuperuser", username="root", email="root@example.com", interactive=False,
                     stdout=io.StringIO())   # into 'default' alone
    call_command("createsuperuser", username="root", email="root@example.com", interactive=False,
                 database=lb_alias(), stdout=io.StringIO())
    assert User.objects.get(username="root").is_superuser
    user.delete()                              # cascades into its m2m rows, on every copy
    assert not Group.objects.get().user_set.exists()

    auth_load_balanced.wait_drained()
    reports = compare_tables(tables=AUTH_TABLES, recheck_delay=None)
    assert [r.table for r in reports if not r.ok] == []
    assert [r.counts for r in reports if r.table == "auth_group_permissions"] == [{a: 1 for a in ALIASES}]
    assert [[row[4] for row in table_rows(alias, "auth_user")] for alias in ALIASES] == [["root"]] * 3


# -- django.contrib.sessions, listed -------------------------------------------------------------------------
def test_sessions_listed_are_load_balanced_end_to_end(lb_factory):
    """The database session backend (its router-chosen alias, its atomic() create) on every copy."""
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session

    from django_lb_shm.ops.verify import compare_tables

    handle = lb_factory("sessions", MODELS=["plainlbapp", "sessions"])
    try:
        assert router.db_for_write(Session) == lb_alias()
        store = SessionStore()
        store["cart"] = [1, 2]
        store.create()                                  # a new key, inserted on every copy
        again = SessionStore(session_key=store.session_key)
        assert again["cart"] == [1, 2]
        again["cart"] = [3]
        again.save()
        other = SessionStore()
        other["x"] = 1
        other.save()
        other.delete()
        handle.wait_drained()
        reports = compare_tables(tables=["django_session"], recheck_delay=None)
        assert [r.ok for r in reports] == [True] and reports[0].counts == {a: 1 for a in ALIASES}, reports
        assert SessionStore(session_key=store.session_key)["cart"] == [3]
    finally:
        handle.wait_drained()
        for alias in ALIASES:
            with connections[alias].cursor() as cursor:
                cursor.execute("DELETE FROM django_session")
            connections[alias].close()


# -- resync copies the listed tables --------------------------------------------------------------------
@pytest.fixture
def resync_handle(lb_factory, tmp_path):
    """A coordinator of its own journal; afterwards, as tests/test_resync.py does, copies alike again."""
    yield lb_factory("resync-models", JOURNAL_DIR=str(tmp_path / "journal"))
    from tests.support.lb import clear_tables, stop_all_coordinators

    stop_all_coordinators()
    clear_tables()
    marks = {}
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT seq, tag FROM django_lb_shm_applied WHERE id = 1")
            marks[alias] = cursor.fetchone()
    seq, tag = max(marks.values())
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("UPDATE django_lb_shm_applied SET seq = %s, tag = %s WHERE id = 1", [seq, abs(tag)])
        connections[alias].close()


def test_resync_copies_the_listed_tables(resync_handle):
    import subprocess
    import sys

    from django_lb_shm.ops.verify import compare_tables
    from tests.support.lb import LAUNCHER, REPO

    tag = Tag.objects.create(label="x")
    for i in range(5):
        item = SpecialItem.objects.create(name=f"item{i}", power=i) if i % 2 else PlainItem.objects.create(name=f"item{i}")
        item.tags.add(tag)
    PlainOwned.objects.create(author=Author.objects.create(name="Ann"), label="mine")
    resync_handle.wait_drained()
    with connections["DB2"].cursor() as cursor:   # DB2 loses the plain rows behind the coordinator's back
        for table in ("plainlbapp_plainitem_tags", "plainlbapp_specialitem", "plainlbapp_plainitem"):
            cursor.execute(f"DELETE FROM {table}")
    assert not all(r.ok for r in compare_tables(tables=PLAIN_TABLES, recheck_delay=None))
    done = subprocess.run([sys.executable, str(LAUNCHER), "resync", "DB2"], cwd=str(REPO), env=resync_handle.env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    resync_handle.wait_drained()
    reports = compare_tables(tables=PLAIN_TABLES, recheck_delay=None)
    assert [r.table for r in reports if not r.ok] == []
    assert {r.table: r.counts["DB2"] for r in reports}["plainlbapp_specialitem"] == 2
