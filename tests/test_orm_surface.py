"""The ORM surface through a real coordinator, against plain Django on one database.

Reads run twice on the same rows: through the load balancer (``db=None``: the
model's manager, the virtual alias, the coordinator) and with ``.using('default')``
(Django straight to one real database, no coordinator).  Both runs must give
the same values, in the same order, or raise the same exception; the run
through the load balancer must not touch a real database from this process, the
reference run must not touch the coordinator.

Writes go through the load balancer and are compared with plain Django on
'default' (``plain()`` querysets, inside a transaction rolled back afterwards)
where Django can run the same write without the load balancer, and with the
rows every database holds afterwards (``replicas.assert_identical()``: every
testapp table, row by row, keys included).
"""
from __future__ import annotations

import contextlib
import datetime
from decimal import Decimal
from typing import Any, Callable, Optional

import django.db
import pytest
from django.core.exceptions import FieldError
from django.db import IntegrityError, connections, models, transaction
from django.db.models import (
    Avg, Case, Count, Exists, F, Max, Min, OuterRef, Prefetch, Q, Subquery, Sum, Value, When, Window,
)
from django.db.models.functions import Coalesce, Rank
from django.test.utils import CaptureQueriesContext

import django_lb_shm
from django_lb_shm import errors
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.client.connection import get_client
from tests.support.lb import ALIASES, clear_tables, default_coordinator
from tests.support.waiting import names_on_alias, wait_drained
from tests.testapp.models import Author, Book, Review, Tag, Token

D = datetime.date
THROUGH = Book.tags.through


# -- helpers -------------------------------------------------------------------------------------
def on(qs: Any, db: Optional[str]) -> Any:
    """``qs`` through the load balancer (db=None) or straight to one database."""
    return qs.all() if db is None else qs.using(db)


def fk(obj: models.Model, name: str, db: Optional[str]) -> Any:
    """Forward foreign key: the descriptor through the load balancer, a direct get on ``db``."""
    if db is None:
        return getattr(obj, name)
    field = obj._meta.get_field(name)
    return field.related_model.objects.using(db).get(pk=getattr(obj, field.attname))


def snap(value: Any) -> Any:
    """Comparable form: model instances become their label, loaded field values and annotations."""
    if isinstance(value, models.Model):
        deferred = value.get_deferred_fields()
        fields = {f.attname: getattr(value, f.attname) for f in value._meta.concrete_fields if f.attname not in deferred}
        extra = {k: snap(v) for k, v in value.__dict__.items() if not k.startswith("_") and k not in fields}
        return (value._meta.label, fields, extra, sorted(deferred))
    if isinstance(value, dict):
        return {k: snap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snap(v) for v in value) if not hasattr(value, "_fields") else tuple(snap(v) for v in value)
    if isinstance(value, models.QuerySet):
        return [snap(v) for v in value]
    return value


def outcome(fn: Callable[[], Any]) -> tuple:
    try:
        return ("ok", snap(fn()))
    except Exception as exc:  # compared with the reference run's
        return ("raised", type(exc), str(exc))


def run_twice(case: Callable[[Optional[str]], Any]) -> tuple:
    """(through the load balancer, plain Django on 'default'), each checked for where it went."""
    lb, direct = connections[lb_alias()], connections["default"]
    with CaptureQueriesContext(lb) as lb_queries, CaptureQueriesContext(direct) as direct_queries:
        got = outcome(lambda: case(None))
    assert not direct_queries.captured_queries, "a load-balanced read went straight to 'default'"
    with CaptureQueriesContext(lb) as leaked:
        expected = outcome(lambda: case("default"))
    assert not leaked.captured_queries, f"the reference run went through the coordinator: {leaked.captured_queries}"
    if got[0] == "ok":
        assert lb_queries.captured_queries, "nothing went through the coordinator"
    return got, expected


def plain(model: type) -> models.QuerySet:
    """A plain Django QuerySet on 'default': no load balancer code at all."""
    return models.QuerySet(model=model, using="default")


def table_state(alias: str = "default") -> dict:
    from tests.support.lb import app_tables

    state = {}
    with connections[alias].cursor() as cursor:
        for table in app_tables():
            cursor.execute(f'SELECT * FROM "{table}" ORDER BY 1')
            names = [c[0] for c in cursor.description]
            state[table] = [dict(zip(names, row)) for row in cursor.fetchall()]
    return state


def drained(timeout: float = 30) -> None:
    """Until every database applied every write (asked on this process's own coordinator connection)."""
    wait_drained(lambda: get_client().call("status"), timeout, every=0.02)


def copy_of(model: type, alias: str = "default") -> models.QuerySet:
    """Direct reads of one database, once every database applied every write."""
    drained()
    return model._default_manager.using(alias)


@contextlib.contextmanager
def rolled_back() -> Any:
    """Plain Django on 'default', undone afterwards; yields a dict that receives the tables' state."""
    seen: dict = {}
    with transaction.atomic(using="default"):
        yield seen
        seen.update(table_state())
        transaction.set_rollback(True, using="default")


def build_library() -> dict:
    """The same small data set for every test, written through the load balancer."""
    ann = Author.objects.create(name="Ann", born=D(1970, 1, 2), rating=5)
    bob = Author.objects.create(name="Bob", rating=3)
    cid = Author.objects.create(name="Cid", born=D(1980, 5, 6), rating=5)
    Author.objects.create(name="Dee", born=D(1960, 7, 8), rating=0)
    sf, classic, short, _unused = Tag.objects.bulk_create(
        [Tag(label="sf"), Tag(label="classic"), Tag(label="short"), Tag(label="unused")]
    )
    books = {}
    for title, author, pages, price, published, tags in [
        ("Dune", ann, 500, "9.99", D(2001, 3, 4), [sf, classic]),
        ("Emma", ann, 300, "5.50", D(2001, 7, 1), [classic]),
        ("Fog", bob, 120, "12.00", D(2003, 1, 15), [short, sf]),
        ("Gale", cid, 120, "7.25", D(2003, 11, 30), []),
        ("Hush", cid, 80, "0.00", D(2005, 2, 2), [short]),
    ]:
        book = Book.objects.create(title=title, author=author, pages=pages, price=Decimal(price), published=published)
        book.tags.add(*tags)
        books[title] = book
    for title, stars in [("Dune", 5), ("Dune", 4), ("Fog", 2), ("Gale", 3)]:
        Review.objects.create(book=books[title], stars=stars, text=f"{title} {stars}")
    return books


# -- reads ---------------------------------------------------------------------------------------
def A(db):  # noqa: N802
    return on(Author.objects, db)


def B(db):  # noqa: N802
    return on(Book.objects, db)


def R(db):  # noqa: N802
    return on(Review.objects, db)


def T(db):  # noqa: N802
    return on(Tag.objects, db)


def _prefetch(name: str, model: type, db: Optional[str]) -> Any:
    # The reference names its database in the Prefetch: a related lookup from an
    # instance read off 'default' is routed to the load balancer otherwise.
    return name if db is None else Prefetch(name, queryset=model.objects.using(db))


def _latest_title(db):
    newest = B(db).filter(author=OuterRef("pk")).order_by("-published").values("title")[:1]
    return A(db).annotate(latest=Subquery(newest)).values_list("name", "latest")


READS: dict[str, Callable[[Optional[str]], Any]] = {
    # evaluation
    "iterate": lambda db: [a for a in A(db)],
    "list": lambda db: list(B(db)),
    "len": lambda db: len(A(db).filter(rating=5)),
    "bool-true": lambda db: bool(A(db).filter(rating=5)),
    "bool-false": lambda db: bool(A(db).filter(rating=42)),
    "repr-slice": lambda db: [str(t) for t in T(db).order_by("label")[:3]],
    # single objects
    "get": lambda db: A(db).get(name="Bob"),
    "get-related-lookup": lambda db: B(db).get(author__name="Bob", tags__label="sf"),
    "get-missing": lambda db: A(db).get(name="Nobody"),
    "get-multiple": lambda db: A(db).get(rating=5),
    "first": lambda db: B(db).first(),
    "first-ordered": lambda db: A(db).order_by("-rating", "-name").first(),
    "first-empty": lambda db: A(db).filter(rating=42).first(),
    "last": lambda db: B(db).last(),
    "last-ordered": lambda db: A(db).order_by("rating").last(),
    "latest": lambda db: B(db).latest("published"),
    "earliest": lambda db: B(db).earliest("pages", "-published"),
    "latest-nullable": lambda db: A(db).latest("born"),
    "earliest-nullable": lambda db: A(db).earliest("born"),
    "latest-empty": lambda db: B(db).filter(pages=0).latest("published"),
    "latest-no-field": lambda db: A(db).latest(),
    # aggregation
    "count": lambda db: A(db).count(),
    "count-filtered": lambda db: B(db).filter(tags__label="sf").count(),
    "count-distinct-join": lambda db: A(db).filter(books__pages__gt=100).distinct().count(),
    "exists": lambda db: B(db).filter(pages__gt=400).exists(),
    "exists-not": lambda db: B(db).filter(pages__gt=4000).exists(),
    "aggregate": lambda db: B(db).aggregate(
        n=Count("id"), total=Sum("pages"), avg=Avg("pages"), cheapest=Min("price"), newest=Max("published")
    ),
    "aggregate-empty": lambda db: B(db).filter(pages=0).aggregate(pages=Sum("pages"), newest=Max("published")),
    "aggregate-join": lambda db: A(db).aggregate(stars=Avg("books__reviews__stars"), books=Count("books")),
    "annotate": lambda db: list(A(db).annotate(n=Count("books"), pages=Sum("books__pages")).order_by("name")),
    "annotate-values-group": lambda db: list(
        B(db).values("author__name").annotate(n=Count("id"), most=Max("pages")).order_by("-n", "author__name")
    ),
    "annotate-filter-on-aggregate": lambda db: list(
        A(db).annotate(n=Count("books")).filter(n__gte=2).order_by("name").values_list("name", flat=True)
    ),
    "aggregate-filtered": lambda db: A(db).aggregate(
        fives=Count("id", filter=Q(rating=5)), with_born=Count("born"), youngest=Max("born", filter=Q(rating__gt=0))
    ),
    "annotate-case-coalesce-window": lambda db: list(
        B(db).annotate(
            size=Case(When(pages__gte=300, then=Value("long")), default=Value("short")),
            stars=Coalesce(Sum("reviews__stars"), 0),
            rank=Window(Rank(), order_by=F("pages").desc()),
        ).values_list("title", "size", "stars", "rank").order_by("rank", "title")
    ),
    # values
    "values": lambda db: list(B(db).values("title", "author__name", "price", "published")),
    "values-expression": lambda db: list(B(db).values("title", double=F("pages") * 2).order_by("-double", "title")),
    "values_list": lambda db: list(B(db).values_list("title", "pages")),
    "values_list-flat": lambda db: list(A(db).values_list("name", flat=True)),
    "values_list-named": lambda db: list(A(db).values_list("name", "rating", named=True)),
    "in_bulk-ids": lambda db: A(db).in_bulk(list(A(db).filter(rating=5).values_list("pk", flat=True))),
    "in_bulk-all": lambda db: B(db).in_bulk(),
    "in_bulk-field": lambda db: A(db).in_bulk(["Ann", "Dee", "Nobody"], field_name="name"),
    "in_bulk-not-unique": lambda db: B(db).in_bulk(["Dune"], field_name="title"),
    "iterator": lambda db: list(B(db).order_by("-pages", "title").iterator()),
    "iterator-chunked": lambda db: [b.title for b in B(db).iterator(chunk_size=2)],
    # filtering and ordering
    "filter-q": lambda db: list(B(db).filter(Q(pages__gte=300) | Q(title__startswith="H"))),
    "filter-q-negated": lambda db: list(B(db).filter(~Q(author__name="Ann") & Q(pages__lt=200))),
    "exclude": lambda db: list(A(db).exclude(books__tags__label="sf")),
    "exclude-q": lambda db: list(B(db).exclude(Q(pages=120) | Q(price__lt=1))),
    "filter-f": lambda db: list(B(db).filter(pages__gt=F("price") * 40)),
    "filter-f-related": lambda db: list(B(db).filter(pages__gt=F("author__rating") * 50)),
    "exclude-f": lambda db: list(A(db).exclude(rating__lt=F("books__pages") / 100).distinct()),
    "filter-isnull": lambda db: list(A(db).filter(born__isnull=True)),
    "filter-date-lookups": lambda db: list(B(db).filter(published__year=2003, published__month__gte=6)),
    "filter-in-subquery": lambda db: list(A(db).filter(pk__in=B(db).filter(pages__lt=150).values("author"))),
    "filter-bad-field": lambda db: A(db).filter(nope=1),
    "order_by": lambda db: list(B(db).order_by("-pages", "title")),
    "order_by-related": lambda db: list(B(db).order_by("author__name", "-published")),
    "order_by-nulls": lambda db: list(A(db).order_by(F("born").asc(nulls_last=True), "name")),
    "order_by-reverse": lambda db: list(B(db).order_by("pages", "title").reverse()),
    "order_by-bad-field": lambda db: list(A(db).order_by("nope")),
    "values-bad-field": lambda db: list(A(db).values("nope")),
    "slice": lambda db: list(B(db).order_by("title")[1:3]),
    "slice-offset-only": lambda db: list(B(db).order_by("title")[3:]),
    "slice-step": lambda db: B(db).order_by("title")[::2],
    "index": lambda db: B(db).order_by("-title")[1],
    "index-out-of-range": lambda db: B(db).order_by("title")[50],
    "distinct": lambda db: list(B(db).order_by("pages").values_list("pages", flat=True).distinct()),
    "distinct-join": lambda db: list(A(db).filter(books__tags__label__in=["sf", "classic", "short"]).distinct()),
    "defer": lambda db: list(B(db).defer("title", "price")),
    "only": lambda db: list(A(db).only("name")),
    "only-related": lambda db: [(b.title, b.author.name) for b in B(db).select_related("author").only("title", "author__name")],
    "dates-year": lambda db: list(B(db).dates("published", "year")),
    "dates-month-desc": lambda db: list(B(db).dates("published", "month", order="DESC")),
    "dates-week": lambda db: list(B(db).dates("published", "week")),
    "datetimes": lambda db: list(A(db).datetimes("created", "minute", order="DESC")),
    "dates-day-filtered": lambda db: list(B(db).filter(pages__lte=120).dates("published", "day")),
    # subqueries
    "subquery": lambda db: list(_latest_title(db)),
    "exists-filter": lambda db: list(A(db).filter(Exists(B(db).filter(author=OuterRef("pk"), pages__gt=200)))),
    "exists-annotate": lambda db: list(
        A(db).annotate(reviewed=Exists(R(db).filter(book__author=OuterRef("pk")))).values_list("name", "reviewed")
    ),
    "not-exists": lambda db: list(T(db).filter(~Exists(THROUGH.objects.using(db).filter(tag=OuterRef("pk"))))),
    # combinations
    "union": lambda db: list(
        B(db).filter(pages__gte=300).order_by().union(B(db).filter(title__startswith="H").order_by()).order_by("title")
    ),
    "union-all-values": lambda db: list(
        B(db).filter(pages=120).order_by().values_list("pages").union(A(db).order_by().values_list("rating"), all=True)
        .order_by("pages")
    ),
    "intersection": lambda db: list(
        B(db).filter(pages__gte=120).order_by().intersection(B(db).filter(price__lt=10).order_by()).order_by("-title")
    ),
    "difference": lambda db: list(
        B(db).order_by().difference(B(db).filter(tags__label="short").order_by()).order_by("title")
    ),
    "union-count": lambda db: A(db).filter(rating=5).order_by().union(A(db).filter(born__isnull=True).order_by()).count(),
    "union-first": lambda db: B(db).order_by().union(B(db).order_by()).order_by("-pages", "title").first(),
    # Meta.ordering inside a compound statement: SQLite refuses it (DatabaseError), PostgreSQL does not
    "union-meta-ordering": lambda db: list(B(db).filter(pages=120).union(B(db).filter(pages=80))),
    # relations
    "select_related": lambda db: [(b.title, snap(b.author)) for b in B(db).select_related("author")],
    "select_related-nested": lambda db: [
        (r.stars, r.book.title, r.book.author.name) for r in R(db).select_related("book__author").order_by("-stars")
    ],
    "forward-fk": lambda db: [(b.title, fk(b, "author", db).name) for b in B(db)],
    "reverse-fk-manager": lambda db: [(a.name, list(on(a.books, db))) for a in A(db)],
    "reverse-fk-manager-filter": lambda db: [
        (a.name, on(a.books, db).filter(pages__gt=100).count(), on(a.books, db).exists()) for a in A(db)
    ],
    "reverse-fk-manager-aggregate": lambda db: on(A(db).get(name="Ann").books, db).aggregate(Sum("pages")),
    "m2m-manager": lambda db: [(b.title, list(on(b.tags, db).order_by("label"))) for b in B(db)],
    "m2m-reverse-manager": lambda db: [
        (t.label, list(on(t.books, db).values_list("title", flat=True))) for t in T(db).order_by("-label")
    ],
    "reverse-fk-manager-get-missing": lambda db: on(A(db).get(name="Ann").books, db).get(title="Fog"),
    "prefetch-reverse-fk": lambda db: [
        (a.name, [b.title for b in a.books.all()]) for a in A(db).prefetch_related(_prefetch("books", Book, db))
    ],
    "prefetch-m2m": lambda db: [
        (b.title, sorted(t.label for t in b.tags.all())) for b in B(db).prefetch_related(_prefetch("tags", Tag, db))
    ],
    "prefetch-m2m-reverse": lambda db: [
        (t.label, [b.title for b in t.books.all()]) for t in T(db).order_by("label").prefetch_related(_prefetch("books", Book, db))
    ],
    "prefetch-nested": lambda db: [
        (a.name, [(b.title, sorted(t.label for t in b.tags.all()), sorted(r.stars for r in b.reviews.all())) for b in a.books.all()])
        for a in A(db).prefetch_related(
            *(["books__tags", "books__reviews"] if db is None else [
                Prefetch("books", queryset=Book.objects.using(db).prefetch_related(
                    Prefetch("tags", queryset=Tag.objects.using(db)),
                    Prefetch("reviews", queryset=Review.objects.using(db)),
                ))
            ])
        )
    ],
    "prefetch-queryset": lambda db: [
        (a.name, [b.title for b in a.long_books])
        for a in A(db).prefetch_related(
            Prefetch("books", queryset=Book.objects.using(db).filter(pages__gte=300).order_by("-pages"), to_attr="long_books")
        )
    ],
    "iterator-prefetch": lambda db: [
        (b.title, sorted(t.label for t in b.tags.all()))
        for b in B(db).prefetch_related(_prefetch("tags", Tag, db)).iterator(chunk_size=2)
    ],
    "filter-across-m2m": lambda db: list(T(db).filter(books__author__name="Ann").distinct().order_by("label")),
}


RAISES = {
    "get-missing", "get-multiple", "latest-empty", "latest-no-field", "in_bulk-not-unique", "filter-bad-field",
    "order_by-bad-field", "values-bad-field", "index-out-of-range", "reverse-fk-manager-get-missing",
}
VENDOR_DEPENDENT = {"union-meta-ordering"}


@pytest.fixture(scope="class")
def read_library():
    """One data set for a whole class of read-only tests."""
    handle = default_coordinator()
    handle.wait_drained()
    clear_tables()
    books = build_library()
    drained()
    return books


@pytest.mark.usefixtures("read_library")
class TestReads:
    """Read-only: one data set for the whole class."""

    @pytest.mark.parametrize("name", list(READS))
    def test_same_as_one_database(self, name):
        got, expected = run_twice(READS[name])
        assert got == expected
        if name in RAISES:
            assert got[0] == "raised"
        elif name not in VENDOR_DEPENDENT:
            assert got[0] == "ok", got

    def test_exceptions_are_djangos(self):
        assert run_twice(READS["get-missing"])[0][1] is Author.DoesNotExist
        assert run_twice(READS["get-multiple"])[0][1] is Author.MultipleObjectsReturned
        for name in ("filter-bad-field", "order_by-bad-field", "values-bad-field"):
            assert run_twice(READS[name])[0][1] is FieldError

    def test_deferred_field_loads_through_the_load_balancer(self):
        book = Book.objects.defer("title").get(pages=500)
        assert book.get_deferred_fields() == {"title"}
        with CaptureQueriesContext(connections[lb_alias()]) as queries:
            assert book.title == "Dune"
        assert len(queries.captured_queries) == 1

    def test_reads_are_spread_over_every_database(self):
        def reads() -> dict:
            return {d["name"]: d["reads"] for d in get_client().call("status")["databases"]}

        before = reads()
        results = {Author.objects.filter(rating=5).count() for _ in range(2 * len(ALIASES))}
        after = reads()
        assert results == {2}
        assert all(after[alias] > before[alias] for alias in ALIASES), (before, after)  # round robin


# -- writes --------------------------------------------------------------------------------------
@pytest.fixture
def library(replicas):
    books = build_library()
    drained()
    return books


def _volatile(state: dict, ignore: tuple) -> dict:
    return {t: [{k: v for k, v in row.items() if k not in ignore} for row in rows] for t, rows in state.items()}


def assert_like_plain_django(replicas, plain_write: Callable[[], Any], lb_write: Callable[[], Any],
                             normalize: Callable[[Any], Any] = snap, ignore: tuple = ()) -> Any:
    """The write through the load balancer returns and leaves what plain Django on one database does."""
    drained()
    with rolled_back() as reference:
        expected = normalize(plain_write())
    got = lb_write()
    assert normalize(got) == expected
    replicas.assert_identical()
    assert _volatile(table_state(), ignore) == _volatile(reference, ignore)
    return got


def test_save_insert_and_update(replicas):
    author = Author(name="Zed", born=D(1999, 12, 31))
    author.save()
    assert author.pk is not None and author._state.db == lb_alias() and not author._state.adding
    stored = copy_of(Author, "default").get(pk=author.pk)
    assert snap(stored) == snap(author)
    first_update = author.updated
    author.rating = 7
    author.save()
    author.name = "Zeb"
    author.born = None
    author.save(update_fields=["name"])  # born stays as stored
    replicas.assert_identical()
    stored = copy_of(Author, "default").get(pk=author.pk)
    assert (stored.name, stored.rating, stored.born) == ("Zeb", 7, D(1999, 12, 31))
    assert stored.updated > first_update
    assert Author.objects.count() == 1


def test_save_model_with_app_chosen_key(replicas):
    token = Token(label="one")
    token.save()
    token.label = "two"
    token.save()
    Token.objects.create(label="three")
    replicas.assert_identical()
    assert sorted(copy_of(Token, "default").values_list("label", flat=True)) == ["three", "two"]
    assert Token.objects.get(pk=token.pk).label == "two"


def test_save_with_force_insert_on_existing_key_raises_integrity_error(replicas):
    author = Author.objects.create(name="Ann")
    clone = Author(pk=author.pk, name="Other")
    with pytest.raises(IntegrityError):
        clone.save(force_insert=True)
    replicas.assert_identical()
    assert list(copy_of(Author, "default").values_list("name", flat=True)) == ["Ann"]


def test_create_and_related_manager_create(replicas):
    ann = Author.objects.create(name="Ann", born=D(1970, 1, 2))
    book = ann.books.create(title="Dune", pages=500, published=D(2001, 3, 4))
    review = book.reviews.create(stars=5)
    tag = book.tags.create(label="sf")
    replicas.assert_identical()
    assert book.author_id == ann.pk and review.book_id == book.pk
    assert snap(copy_of(Book, "default").get(pk=book.pk)) == snap(book)
    assert snap(copy_of(Review, "default").get(pk=review.pk)) == snap(review)
    assert list(copy_of(Book, "default").get(pk=book.pk).tags.using("default")) == [tag]
    assert list(tag.books.all()) == [book]


def test_keys_keep_matching_after_deletes(replicas):
    # the next key after deleting the newest row is the database's business (SQLite AUTOINCREMENT,
    # PostgreSQL sequences): every copy must agree with the first one
    first = Author.objects.create(name="a1")
    second = Author.objects.create(name="a2")
    second_pk = second.pk
    second.delete()
    assert second.pk is None  # Django's own behaviour
    third = Author.objects.create(name="a3")
    assert third.pk > second_pk > first.pk
    replicas.assert_identical()


def test_bulk_create(replicas):
    made = Author.objects.bulk_create([Author(name=f"w{i}", rating=i) for i in range(7)], batch_size=3)
    assert all(a.pk is not None for a in made)
    stored = copy_of(Author, "default").filter(pk__in=[a.pk for a in made]).order_by("rating")
    assert snap(list(stored)) == [snap(a) for a in made]
    books = Book.objects.bulk_create([Book(title=f"t{i}", author=made[i % 2], pages=i) for i in range(4)])
    tokens = Token.objects.bulk_create([Token(label=f"k{i}") for i in range(3)])
    replicas.assert_identical()
    assert [b.pk for b in books] == list(copy_of(Book, "DB2").values_list("pk", flat=True))
    assert sorted(t.pk for t in tokens) == sorted(copy_of(Token, "DB1").values_list("pk", flat=True))


def test_bulk_create_update_conflicts(replicas, library):
    if django.VERSION < (5, 0):  # no keys come back from an upsert before Django 5.0
        with pytest.raises(errors.NotSupportedError, match="update_conflicts"):
            Author.objects.bulk_create([Author(name="Ann", rating=9)], update_conflicts=True,
                                       unique_fields=["name"], update_fields=["rating"])
        return

    def write(source):
        made = source(Author).bulk_create(
            [Author(name="Ann", rating=9), Author(name="Zoe", rating=2)],
            update_conflicts=True, unique_fields=["name"], update_fields=["rating"],
        )
        return [(a.name, a.rating, a.pk is not None) for a in made]

    volatile = ("id", "created", "updated", "token")
    got = assert_like_plain_django(replicas, lambda: write(plain), lambda: write(lambda m: m.objects), ignore=volatile)
    assert got == [("Ann", 9, True), ("Zoe", 2, True)]
    assert list(copy_of(Author, "DB2").filter(name__in=["Ann", "Zoe"]).values_list("rating", flat=True)) == [9, 2]


def test_bulk_create_empty_and_duplicate(replicas):
    assert Author.objects.bulk_create([]) == []
    Author.objects.create(name="Ann")
    with pytest.raises(IntegrityError):
        Author.objects.bulk_create([Author(name="New"), Author(name="Ann")])
    replicas.assert_identical()
    assert list(copy_of(Author, "default").values_list("name", flat=True)) == ["Ann"]


def test_bulk_update(replicas, library):
    def write(source):
        books = list(source(Book).order_by("pk"))
        for i, book in enumerate(books):
            book.pages = 1000 + i
            book.title = book.title.upper()
        return source(Book).bulk_update(books, ["pages", "title"], batch_size=2)

    count = assert_like_plain_django(replicas, lambda: write(plain), lambda: write(lambda m: m.objects))
    assert count == 5
    assert list(Book.objects.values_list("title", "pages")[:2]) == [("DUNE", 1000), ("EMMA", 1001)]


def test_queryset_update(replicas, library):
    def write(source):
        return source(Book).filter(Q(pages__lt=200) | Q(author__name="Ann")).update(pages=F("pages") + 1, price=Decimal("1.50"))

    assert assert_like_plain_django(replicas, lambda: write(plain), lambda: write(lambda m: m.objects)) == 5
    assert assert_like_plain_django(
        replicas, lambda: plain(Author).filter(name="Nobody").update(rating=1),
        lambda: Author.objects.filter(name="Nobody").update(rating=1),
    ) == 0
    assert Book.objects.get(title="Hush").pages == 81


def test_related_manager_update_and_fk_add(replicas, library):
    ann, bob = Author.objects.get(name="Ann"), Author.objects.get(name="Bob")
    assert ann.books.update(pages=1) == 2
    bob.books.add(library["Dune"])  # reverse FK add: an UPDATE of the books
    replicas.assert_identical()
    assert list(copy_of(Book, "default").filter(author=bob).values_list("title", "pages")) == [
        ("Dune", 1), ("Fog", 120)
    ]


def test_queryset_delete_with_cascades(replicas, library):
    def write(source):
        return source(Book).filter(pages__lte=120).delete()

    got = assert_like_plain_django(replicas, lambda: write(plain), lambda: write(lambda m: m.objects))
    assert got[0] == 3 + 2 + 3  # Fog, Gale, Hush; two reviews; three tag links
    assert got[1]["testapp.Book_tags"] == 3
    nothing = assert_like_plain_django(
        replicas, lambda: plain(Review).filter(stars=42).delete(), lambda: Review.objects.filter(stars=42).delete()
    )
    assert nothing[0] == 0


def test_instance_delete_with_cascades(replicas, library):
    def write(lb: bool):
        ann = copy_of(Author, "default").get(name="Ann")
        return ann.delete() if lb else models.Model.delete(ann, using="default")

    got = assert_like_plain_django(replicas, lambda: write(False), lambda: write(True))
    assert got == (8, {"testapp.Review": 2, "testapp.Book_tags": 3, "testapp.Book": 2, "testapp.Author": 1})
    tag = Tag.objects.get(label="unused")
    assert tag.delete() == (1, {"testapp.Tag": 1})
    replicas.assert_identical()
    with pytest.raises(ValueError):  # Django's own check: the instance has no key any more
        tag.delete()


def test_get_or_create(replicas, library):
    # found: same object as plain Django on one database finds
    got = assert_like_plain_django(
        replicas, lambda: plain(Author).get_or_create(name="Ann"), lambda: Author.objects.get_or_create(name="Ann")
    )
    assert got[1] is False and got[0].pk == copy_of(Author, "DB1").get(name="Ann").pk
    # created (plain Django cannot create a LoadBalancerModel row on one database: save() refuses)
    eve, created = Author.objects.get_or_create(name="Eve", defaults={"rating": 9, "born": lambda: D(2000, 1, 1)})
    assert created is True and (eve.name, eve.rating, eve.born) == ("Eve", 9, D(2000, 1, 1))
    assert snap(copy_of(Author, "DB2").get(pk=eve.pk)) == snap(eve)
    assert Author.objects.get_or_create(name="Eve", defaults={"rating": 1}) == (eve, False)
    with pytest.raises(Author.MultipleObjectsReturned):
        Author.objects.get_or_create(rating=5)
    # through a related manager: the foreign key is filled in
    dune, created = Author.objects.get(name="Bob").books.get_or_create(title="Dune", defaults={"pages": 1})
    assert created is True and dune.pk != library["Dune"].pk and dune.author.name == "Bob"
    replicas.assert_identical()
    assert copy_of(Author, "default").count() == 5


def test_get_or_create_integrity_error_then_more_writes(replicas, library):
    # get() misses, create() collides with the unique name: Django re-raises the IntegrityError
    with pytest.raises(IntegrityError):
        Author.objects.get_or_create(name="Ann", rating=42)
    # the failed attempt left nothing behind: the next write goes through at once
    Author.objects.create(name="Fay")
    Book.objects.filter(title="Dune").update(pages=501)
    replicas.assert_identical()
    assert copy_of(Author, "default").filter(name__in=["Ann", "Fay"]).count() == 2


def test_update_or_create(replicas, library):
    bob_pk = copy_of(Author, "default").get(name="Bob").pk
    bob, created = Author.objects.update_or_create(name="Bob", defaults={"rating": 10, "born": D(1990, 1, 1)})
    assert created is False and bob.pk == bob_pk
    stored = copy_of(Author, "DB1").get(pk=bob_pk)
    assert snap(stored) == snap(bob) and (stored.rating, stored.born) == (10, D(1990, 1, 1))
    create_defaults = {"create_defaults": {"rating": 2}} if django.VERSION >= (5, 0) else {"defaults": {"rating": 2}}
    gus, created = Author.objects.update_or_create(name="Gus", **create_defaults)
    assert created is True and snap(copy_of(Author, "DB2").get(pk=gus.pk)) == snap(gus) and gus.rating == 2
    with pytest.raises(Author.MultipleObjectsReturned):
        Author.objects.update_or_create(rating=5, defaults={"rating": 6})
    replicas.assert_identical()
    assert list(copy_of(Author, "default").values_list("name", "rating")) == [
        ("Ann", 5), ("Bob", 10), ("Cid", 5), ("Dee", 0), ("Gus", 2)
    ]


def test_many_to_many_add_set_remove_clear(replicas, library):
    dune, gale = library["Dune"], library["Gale"]
    sf, classic, short, unused = (Tag.objects.get(label=x) for x in ("sf", "classic", "short", "unused"))

    def tags(book):
        return sorted(copy_of(Book, "default").get(pk=book.pk).tags.using("default").values_list("label", flat=True))

    gale.tags.add(sf, short.pk)
    gale.tags.add(sf)  # already there: nothing new
    assert tags(gale) == ["sf", "short"]
    gale.tags.set([short, unused])
    assert tags(gale) == ["short", "unused"]
    gale.tags.remove(unused)
    assert tags(gale) == ["short"]
    unused.books.add(dune, gale)  # from the other side
    assert tags(dune) == ["classic", "sf", "unused"]
    classic.books.remove(dune)
    dune.tags.clear()
    assert tags(dune) == []
    short.books.clear()
    assert tags(gale) == ["unused"]
    new, created = gale.tags.get_or_create(label="new")  # creates the tag, then links it
    assert created is True and gale.tags.get_or_create(label="new") == (new, False)
    assert tags(gale) == ["new", "unused"]
    replicas.assert_identical()
    rows = replicas.rows(THROUGH._meta.db_table)
    assert len(rows["DB2"]) == THROUGH.objects.count() == copy_of(THROUGH, "DB1").count()


def test_many_to_many_set_with_clear_and_through_keys(replicas, library):
    emma = library["Emma"]
    emma.tags.set(list(Tag.objects.all()), clear=True)
    replicas.assert_identical([THROUGH._meta.db_table])
    ids = replicas.rows(THROUGH._meta.db_table)["default"]
    assert len({row[0] for row in ids}) == len(ids) == 6 - 1 + 4  # six links, Emma: one replaced by four


def test_writes_with_instances_read_from_one_database(replicas, library):
    """An instance read straight from one copy is written through the load balancer like any other."""
    ann = Author.objects.using("DB1").get(name="Ann")
    ann.rating = 1
    ann.save()
    assert ann._state.db == lb_alias()
    bob = Author.objects.using("DB2").get(name="Bob")
    bob.books.create(title="Ink", pages=3)
    dune = Book.objects.using("DB2").get(title="Dune")
    dune.tags.add(Tag.objects.using("DB1").get(label="unused"))
    dune.author = bob
    dune.save()
    Book.objects.using("DB1").get(title="Hush").delete()
    replicas.assert_identical()
    assert list(copy_of(Book, "DB1").filter(author__name="Bob").values_list("title", flat=True)) == ["Dune", "Fog", "Ink"]
    assert copy_of(Author, "DB2").get(name="Ann").rating == 1
    assert not copy_of(Book, "default").filter(title="Hush").exists()


def test_writes_naming_the_load_balanced_alias(replicas):
    lb = lb_alias()
    ann = Author.objects.using(lb).create(name="Ann")
    Author.objects.db_manager(lb).bulk_create([Author(name="Bob")])
    ann.rating = 2
    ann.save(using=lb)
    assert Author.objects.using(lb).filter(name="Bob").update(rating=3) == 1
    assert Author.objects.using(lb).get(name="Bob").delete(using=lb) == (1, {"testapp.Author": 1})
    replicas.assert_identical()
    assert list(copy_of(Author, "DB2").values_list("name", "rating")) == [("Ann", 2)]


# -- refused: writes to one database ---------------------------------------------------------------
def _one_db_writes() -> dict:
    return {
        "create": lambda: Author.objects.using("DB1").create(name="X"),
        "update": lambda: Author.objects.using("DB1").update(rating=1),
        "delete": lambda: Author.objects.using("DB1").filter(name="Ann").delete(),
        "bulk_create": lambda: Author.objects.using("DB1").bulk_create([Author(name="X")]),
        "bulk_update": lambda: Author.objects.using("DB1").bulk_update(list(Author.objects.all()), ["rating"]),
        "get_or_create": lambda: Author.objects.using("DB1").get_or_create(name="X"),
        "update_or_create": lambda: Author.objects.using("DB1").update_or_create(name="Ann", defaults={"rating": 1}),
        "save": lambda: Author.objects.get(name="Ann").save(using="DB1"),
        "db_manager-create": lambda: Author.objects.db_manager("DB2").create(name="X"),
        "instance-delete": lambda: Author.objects.get(name="Ann").delete(using="DB2"),
    }


@pytest.mark.parametrize("name", list(_one_db_writes()))
def test_write_to_one_database_is_refused(replicas, name):
    Author.objects.create(name="Ann", rating=3)
    drained()
    before = replicas.rows("testapp_author")
    method = name.split("-")[-1]
    with pytest.raises(errors.NotSupportedError, match=rf"\b{method}\(\) with using='DB[12]'"):
        _one_db_writes()[name]()
    replicas.assert_identical()
    assert replicas.rows("testapp_author") == before


def test_loaddata_to_one_database_is_refused(replicas, tmp_path):
    """Fixtures are saved with ``Model.save_base(obj, using=...)``, past LoadBalancerModel.save()."""
    from django.core import serializers
    from django.core.management import call_command

    fixture = tmp_path / "authors.json"
    fixture.write_text(serializers.serialize("json", [Author(pk=50, name="Fix", created=datetime.datetime(
        2020, 1, 1, tzinfo=datetime.timezone.utc), updated=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))]))
    with pytest.raises(errors.NotSupportedError, match=r"Author\.save_base\(\) with using='default'"):
        call_command("loaddata", str(fixture), verbosity=0)
    replicas.assert_identical()
    assert replicas.rows("testapp_author")["default"] == []


def test_bulk_create_ignore_conflicts_with_generated_keys(replicas, library):
    # The leader decides which rows are inserted (and their keys); the followers insert exactly those.
    def write(source):
        made = source(Author).bulk_create([Author(name="Ann"), Author(name="New"), Author(name="Zed", rating=4)],
                                          ignore_conflicts=True)
        return [(a.name, a.pk) for a in made]   # Django sets no keys with ignore_conflicts

    got = assert_like_plain_django(replicas, lambda: write(plain), lambda: write(lambda m: m.objects),
                                   ignore=("id", "created", "updated", "token"))
    assert got == [("Ann", None), ("New", None), ("Zed", None)]
    stored = {a.name: a.pk for a in copy_of(Author, "DB2")}
    assert stored == {a.name: a.pk for a in copy_of(Author, "default")} and {"Ann", "New", "Zed"} <= set(stored)
    # Keys generated afterwards agree too (PostgreSQL: the followers' sequences moved with the leader's keys).
    later = Author.objects.create(name="Later")
    replicas.assert_identical()
    assert copy_of(Author, "DB1").get(name="Later").pk == later.pk


def test_bulk_create_ignore_conflicts_where_every_row_or_no_row_conflicts(replicas):
    Author.objects.bulk_create([Author(name="Ann"), Author(name="Bo")])
    assert Author.objects.bulk_create([Author(name="Ann"), Author(name="Bo")], ignore_conflicts=True)
    replicas.assert_identical()
    assert sorted(copy_of(Author, "DB2").values_list("name", flat=True)) == ["Ann", "Bo"]
    Author.objects.bulk_create([Author(name="Cy"), Author(name="Di")], ignore_conflicts=True, batch_size=1)
    replicas.assert_identical()
    assert sorted(copy_of(Author, "DB1").values_list("name", flat=True)) == ["Ann", "Bo", "Cy", "Di"]


def test_bulk_create_ignore_conflicts_with_explicit_keys(replicas):
    ann = Author.objects.create(name="Ann")
    Author.objects.bulk_create([Author(pk=ann.pk, name="Other"), Author(pk=ann.pk + 100, name="Fresh"),
                                Author(pk=ann.pk + 101, name="Ann")], ignore_conflicts=True)
    replicas.assert_identical()
    assert list(copy_of(Author, "DB2").order_by("pk").values_list("pk", "name")) == [
        (ann.pk, "Ann"), (ann.pk + 100, "Fresh")]


def test_bulk_create_ignore_conflicts_in_a_transaction_commits_and_rolls_back_with_it(replicas):
    Author.objects.create(name="Ann")
    with django_lb_shm.atomic():
        Author.objects.bulk_create([Author(name="Ann"), Author(name="In")], ignore_conflicts=True)
        assert Author.objects.filter(name="In").exists()
    with pytest.raises(Boom), django_lb_shm.atomic():
        Author.objects.bulk_create([Author(name="In"), Author(name="Gone")], ignore_conflicts=True)
        raise Boom()
    replicas.assert_identical()
    assert sorted(copy_of(Author, "DB1").values_list("name", flat=True)) == ["Ann", "In"]


def _move_key_generators_apart() -> None:
    """PostgreSQL: the copies' sequences of the m2m table differ, so a follower that generated its own
    keys would show (SQLite generates max(id)+1, the same on identical copies)."""
    if connections["default"].vendor == "postgresql":
        for alias, start in (("DB1", 500), ("DB2", 900)):
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT setval(pg_get_serial_sequence('testapp_book_tags', 'id'), %s)", [start])


def test_many_to_many_add_is_one_insert_with_the_same_rows_and_keys_everywhere(replicas):
    book = Book.objects.create(title="Dune", author=Author.objects.create(name="Ann"))
    tags = [Tag.objects.create(label=label) for label in ("a", "b", "c", "d")]
    _move_key_generators_apart()
    with CaptureQueriesContext(connections[lb_alias()]) as ctx:
        book.tags.add(tags[0], tags[1])     # Django's fast add: bulk_create(ignore_conflicts=True), no SELECT
    inserts = [q["sql"] for q in ctx.captured_queries if q["sql"].startswith("INSERT")]
    assert len(inserts) == 1 and not [q for q in ctx.captured_queries if q["sql"].startswith("SELECT")], inserts
    # A concurrent add() raced this one: some rows exist; the leader skips those, the followers too.
    through = Book.tags.through
    through.objects.bulk_create([through(book=book, tag=t) for t in tags], ignore_conflicts=True)
    book.tags.add(tags[0])                   # nothing new
    replicas.assert_identical()
    rows = replicas.rows("testapp_book_tags")["DB2"]
    assert sorted(tag for _, _, tag in rows) == sorted(t.pk for t in tags) and len({r[0] for r in rows}) == 4
    later = through.objects.create(book=Book.objects.create(title="Emma", author=book.author), tag=tags[0])
    replicas.assert_identical()
    assert later.pk in [r[0] for r in replicas.rows("testapp_book_tags")["DB1"]]


def test_explain_of_a_locking_query_is_a_plan_read_from_a_copy(replicas):
    Author.objects.create(name="Ann")
    locking = Author.objects.select_for_update().filter(name="Ann")
    with django_lb_shm.atomic():
        plan = locking.explain()                 # PostgreSQL: the plan of a SELECT ... FOR UPDATE
        assert plan and ("LockRows" in plan or connections["default"].vendor != "postgresql")
        Author.objects.filter(name="Ann").update(rating=2)
    if connections["default"].vendor == "postgresql":   # ANALYZE runs a SELECT: still a read
        assert "actual time" in Author.objects.filter(name="Ann").explain(analyze=True)
    replicas.assert_identical()
    assert copy_of(Author, "DB1").get().rating == 2


def test_captured_sql_shows_the_parameters_as_sql_literals(replicas):
    from django.db.models.lookups import GreaterThan

    Author.objects.create(name="Ann")
    with CaptureQueriesContext(connections[lb_alias()]) as ctx:
        assert Author.objects.filter(GreaterThan(2, 1)).exists()
    sql = ctx.captured_queries[0]["sql"]   # PostgreSQL: not Int4(2) > Int4(1); Django 4.2: 2 > (1)
    assert "2 > 1" in sql or "2 > (1)" in sql, ctx.captured_queries
    assert connections[lb_alias()].ops.last_executed_query(None, "SELECT %s, %s, %s, %s", ("it's", None, True, 1.5)) \
        == "SELECT 'it''s', NULL, TRUE, 1.5"


def test_bulk_create_update_conflicts_keeps_the_existing_rows_keys(replicas):
    ann = Author.objects.create(name="Ann", rating=1)
    rows = [Author(name="Ann", rating=8), Author(name="Bea", rating=3)]
    if django.VERSION < (5, 0):   # Django 4.2 asks no keys back for update_conflicts: refused, nothing written
        with pytest.raises(errors.NotSupportedError, match="without the keys coming back"):
            Author.objects.bulk_create(rows, update_conflicts=True, unique_fields=["name"], update_fields=["rating"])
        replicas.assert_identical()
        assert list(copy_of(Author, "DB2").values_list("name", "rating")) == [("Ann", 1)]
        return
    made = Author.objects.bulk_create(rows, update_conflicts=True, unique_fields=["name"], update_fields=["rating"])
    replicas.assert_identical()
    assert made[0].pk == ann.pk
    assert list(copy_of(Author, "DB2").order_by("pk").values_list("pk", "name", "rating")) == [
        (ann.pk, "Ann", 8), (made[1].pk or copy_of(Author, "DB2").get(name="Bea").pk, "Bea", 3)]


# -- transactions ------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_atomic_commit_reaches_every_database(replicas):
    with transaction.atomic(using=lb_alias()):
        Author.objects.create(name="Ann")
        Author.objects.filter(name="Ann").update(rating=4)
        assert Author.objects.get(name="Ann").rating == 4  # read inside: the transaction's own database
        Author.objects.create(name="Bob")
        assert Author.objects.count() == 2
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann", "Bob"] for alias in ALIASES)
    assert copy_of(Author, "DB2").get(name="Ann").rating == 4


def test_atomic_block_that_raises_lands_nowhere(replicas):
    Author.objects.create(name="Ann")
    with pytest.raises(Boom):
        with transaction.atomic(using=lb_alias()):
            Author.objects.create(name="Bob")
            Author.objects.filter(name="Ann").delete()
            raise Boom
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann"] for alias in ALIASES)
    with transaction.atomic(using=lb_alias()):
        Author.objects.create(name="Cid")
        transaction.set_rollback(True, using=lb_alias())
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann"] for alias in ALIASES)


def test_nested_atomic_inner_rollback(replicas):
    lb = lb_alias()
    with transaction.atomic(using=lb):
        Author.objects.create(name="Ann")
        with pytest.raises(Boom):
            with transaction.atomic(using=lb):
                Author.objects.create(name="Bob")
                raise Boom
        with transaction.atomic(using=lb):
            Author.objects.create(name="Cid")
        assert list(Author.objects.values_list("name", flat=True)) == ["Ann", "Cid"]
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann", "Cid"] for alias in ALIASES)


def test_nested_atomic_inner_rollback_before_any_write(replicas):
    lb = lb_alias()
    Author.objects.create(name="Ann")
    with transaction.atomic(using=lb):
        assert Author.objects.count() == 1
        with pytest.raises(Boom):
            with transaction.atomic(using=lb):
                Author.objects.create(name="Bob")
                raise Boom
        Author.objects.create(name="Cid")
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann", "Cid"] for alias in ALIASES)


@pytest.mark.parametrize("first_write", [True, False], ids=["failing-write-opens-the-transaction", "after-a-write"])
def test_nested_atomic_integrity_error_is_recoverable(replicas, first_write):
    lb = lb_alias()
    Author.objects.create(name="Ann")
    with transaction.atomic(using=lb):
        if not first_write:
            Author.objects.create(name="Bob")
        with pytest.raises(IntegrityError):
            with transaction.atomic(using=lb):
                Author.objects.create(name="Ann")
        Author.objects.create(name="Cid")
    replicas.assert_identical()
    expected = ["Ann", "Cid"] if first_write else ["Ann", "Bob", "Cid"]
    assert all(names_on_alias(alias) == expected for alias in ALIASES)


def test_atomic_integrity_error_rolls_back_and_frees_the_write_order(replicas):
    Author.objects.create(name="Ann")
    with pytest.raises(IntegrityError):
        with transaction.atomic(using=lb_alias()):
            Author.objects.create(name="Ann")
    Author.objects.create(name="Bob")  # not stuck behind a transaction nobody ends
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann", "Bob"] for alias in ALIASES)


def test_on_commit_runs_after_commit_only(replicas):
    lb = lb_alias()
    calls = []
    with transaction.atomic(using=lb):
        Author.objects.create(name="Ann")
        transaction.on_commit(lambda: calls.append(Author.objects.filter(name="Ann").exists()), using=lb)
        assert calls == []
    assert calls == [True]  # after the commit, which every database had queued
    with pytest.raises(Boom):
        with transaction.atomic(using=lb):
            Author.objects.create(name="Bob")
            transaction.on_commit(lambda: calls.append("rolled back"), using=lb)
            raise Boom
    assert "rolled back" not in calls
    replicas.assert_identical()


def test_plain_atomic_targets_default_not_the_load_balancer(replicas):
    """With ``LOAD_BALANCER['PLAIN_ATOMIC'] = 'AUTOCOMMIT'``, ``transaction.atomic()`` without
    ``using`` is a transaction on 'default' only (Django's DEFAULT_DB_ALIAS, one real database).
    LoadBalancerModel writes inside it go through the coordinator in autocommit mode: each is
    applied on every database as soon as it runs, and an exception leaving the block does NOT
    undo them (the client warns).  With 'JOIN' (the default: tests/test_plain_atomic.py) the
    block gets a load-balanced twin and they are rolled back with it.
    """
    from django.conf import settings
    from django.test import override_settings

    from django_lb_shm.transactions import LoadBalancerTransactionWarning

    with override_settings(LOAD_BALANCER={**settings.LOAD_BALANCER, "PLAIN_ATOMIC": "AUTOCOMMIT"}):
        with pytest.raises(Boom):
            with transaction.atomic():
                with pytest.warns(LoadBalancerTransactionWarning, match="'default'"):
                    Author.objects.create(name="Ann")
                assert not connections[lb_alias()].in_atomic_block
                assert connections["default"].in_atomic_block
                raise Boom
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann"] for alias in ALIASES)
    with pytest.raises(Boom):
        with transaction.atomic():
            Author.objects.create(name="Bob")
            assert connections[lb_alias()].in_atomic_block
            raise Boom
    replicas.assert_identical()
    assert all(names_on_alias(alias) == ["Ann"] for alias in ALIASES)


def test_the_routers_survive_a_rebuilt_router_list(replicas):
    # override_settings(DATABASE_ROUTERS=...) makes Django rebuild its router list from the setting,
    # and keep that list after the override ends: the package's routers must come back with it.
    from django.db import router
    from django.test import override_settings

    class Elsewhere:
        def db_for_write(self, model, **hints):
            return "DB2"

    with override_settings(DATABASE_ROUTERS=[Elsewhere()]):
        assert router.db_for_write(Author) == lb_alias() and router.db_for_read(Author) == lb_alias()
        Author.objects.create(name="During")
    assert router.db_for_write(Author) == lb_alias()
    assert not any(type(r).__name__ == "Elsewhere" for r in router.routers)
    Author.objects.create(name="After")
    replicas.assert_identical()
    assert sorted(copy_of(Author, "DB2").values_list("name", flat=True)) == ["After", "During"]


# -- EXPLAIN ANALYZE of a write would run it on one copy ------------------------------------------------
@pytest.mark.postgres_only
def test_explain_analyze_of_a_write_is_refused_never_run_on_one_copy(coordinator, replicas):
    """EXPLAIN ANALYZE runs its statement: classified as a plan-only read, an INSERT under it
    went to one copy and forked them."""
    from django_lb_shm.errors import RequestRejected

    table = Author._meta.db_table
    with connections[lb_alias()].cursor() as cursor:
        with pytest.raises(RequestRejected):
            cursor.execute(f"EXPLAIN ANALYZE INSERT INTO {table} (name, rating, token, created, updated) "
                           "VALUES ('forked', 1, '00000000-0000-0000-0000-000000000001', '2026-01-01', '2026-01-01')")
        cursor.execute(f"EXPLAIN (ANALYZE false) INSERT INTO {table} (name, rating, token, created, updated) "
                       "VALUES ('planned', 1, '00000000-0000-0000-0000-000000000002', '2026-01-01', '2026-01-01')")
        assert cursor.fetchall()   # the plan; nothing inserted
    assert not Author.objects.filter(name__in=["forked", "planned"]).exists()
    replicas.assert_identical()
