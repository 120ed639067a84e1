"""App processes for the fault tests: a bounded random workload that records its history.

Run as ``python -m tests.support.fault_workers <args.json>`` (a subprocess the test
can kill -9).  ``args.json``: settings_json, lb (LOAD_BALANCER to use), history
(JSON-lines path), process (name), seed, ops (count), seconds (deadline), plain (share of
the operations that are plain ``transaction.atomic()`` blocks, see ``plain_op``; default 0).
Django is set up the way tests/support/workers.py does it.
"""
from __future__ import annotations

import json
import random
import sys
import time


class BlockAborted(Exception):
    """Raised by the app inside a plain block on purpose: Django rolls the block back (history.py
    counts it as applied nowhere)."""


class _UndoSavepoint(Exception):
    pass


def plain_op(rec, rng: random.Random, live: list, prefix: str) -> str:
    """Load-balanced writes inside a plain ``transaction.atomic()`` block on 'default' (its twin
    carries them): a flat block, a nested one whose inner savepoint is rolled back, or one that
    raises and must leave nothing.  ``live`` holds author tokens known to exist."""
    from django.db import transaction

    from tests.support.history import Write, new_token
    from tests.testapp.models import Author, Tag

    author, tag, rating = new_token(prefix), new_token(prefix + "t"), rng.randrange(1000)
    writes = [Write("author", "create", author, rating), Write("tag", "create", tag)]
    roll = rng.random()
    if roll < 0.4:
        other = rng.choice(live) if live else None
        other_rating = rng.randrange(1000)
        if other is not None:
            writes.append(Write("author", "update", other, other_rating))

        def block():
            with transaction.atomic():
                a = Author.objects.create(name=author, rating=rating)
                t = Tag.objects.create(label=tag)
                if other is not None:
                    Author.objects.filter(name=other).update(rating=other_rating)
            return {author: a.pk, tag: t.pk}

        kind = "plain"
    elif roll < 0.75:
        # The rolled-back savepoint's tag is in no recorded write: on a copy it is a stray row.
        dropped = new_token(prefix + "x")

        def block():
            with transaction.atomic():
                a = Author.objects.create(name=author, rating=rating)
                with transaction.atomic():
                    t = Tag.objects.create(label=tag)
                try:
                    with transaction.atomic():
                        Tag.objects.create(label=dropped)
                        raise _UndoSavepoint
                except _UndoSavepoint:
                    pass
            return {author: a.pk, tag: t.pk}

        kind = "plain_nested"
    else:
        def block():
            with transaction.atomic():
                Author.objects.create(name=author, rating=rating)
                Tag.objects.create(label=tag)
                raise BlockAborted("the app aborted the block")

        outcome, told = rec.run("plain_raise", writes, block)
        return "ok" if isinstance(told, BlockAborted) else outcome
    outcome, _ = rec.run(kind, writes, block)
    if outcome == "ok":
        live.append(author)
    return outcome


def do_op(rec, rng: random.Random, live: list, prefix: str, plain: float = 0.0) -> str:
    """One random operation, recorded in ``rec``; ``live`` holds author tokens known to exist.
    A share ``plain`` of them are plain ``transaction.atomic()`` blocks (``plain_op``)."""
    import django_lb_shm
    from tests.support.history import Write, new_token
    from tests.testapp.models import Author, Tag

    if plain and rng.random() < plain:
        return plain_op(rec, rng, live, prefix)
    roll = rng.random()
    if roll < 0.35 or not live:
        token, rating = new_token(prefix), rng.randrange(1000)

        def create():
            return {token: Author.objects.create(name=token, rating=rating).pk}

        outcome, _ = rec.run("create", [Write("author", "create", token, rating)], create)
        if outcome == "ok":
            live.append(token)
        return outcome
    elif roll < 0.55:
        token, rating = rng.choice(live), rng.randrange(1000)
        return rec.run("update", [Write("author", "update", token, rating)],
                       lambda: (Author.objects.filter(name=token).update(rating=rating), None)[1])[0]
    elif roll < 0.62:
        token = live.pop(rng.randrange(len(live)))
        return rec.run("delete", [Write("author", "delete", token)],
                       lambda: (Author.objects.filter(name=token).delete(), None)[1])[0]
    elif roll < 0.82:
        author, tag, rating = new_token(prefix), new_token(prefix + "t"), rng.randrange(1000)

        def block():
            with django_lb_shm.atomic():
                a = Author.objects.create(name=author, rating=rating)
                t = Tag.objects.create(label=tag)
            return {author: a.pk, tag: t.pk}

        outcome, _ = rec.run("atomic", [Write("author", "create", author, rating), Write("tag", "create", tag)], block)
        if outcome == "ok":
            live.append(author)
        return outcome
    else:
        tokens = [(new_token(prefix), rng.randrange(1000)) for _ in range(rng.randrange(2, 5))]

        def bulk():
            objs = Author.objects.bulk_create([Author(name=t, rating=r) for t, r in tokens])
            return {o.name: o.pk for o in objs}

        outcome, _ = rec.run("bulk_create", [Write("author", "create", t, r) for t, r in tokens], bulk)
        if outcome == "ok":
            live.extend(t for t, _ in tokens)
        return outcome


def left_open() -> str:
    """What a finished operation left of a transaction on the load-balanced connection ('' if nothing):
    an app whose next plain block joins it would be told "committed" for a block nobody commits."""
    from django.db import connections

    from django_lb_shm.backend.alias import lb_alias

    conn = connections[lb_alias()]
    session = conn.connection
    state = {"in_atomic_block": conn.in_atomic_block, "autocommit_off": session is not None and not conn.autocommit,
             "transaction_open": bool(session is not None and session.transaction_open)}
    return ", ".join(name for name, bad in state.items() if bad)


def main(path: str) -> int:
    args = json.loads(open(path).read())
    from tests.support.workers import setup_child

    setup_child(args["settings_json"])
    from django.conf import settings

    settings.LOAD_BALANCER = args["lb"]
    from tests.support.history import Recorder

    rec = Recorder(args["history"], args["process"])
    rng = random.Random(args["seed"])
    live: list = []
    deadline = time.monotonic() + args["seconds"]
    failures = 0
    for _ in range(args["ops"]):
        if time.monotonic() > deadline:
            break
        # pause a little after an error (a restart in progress) so the count is not burnt at once
        outcome = do_op(rec, rng, live, args["process"], args.get("plain", 0.0))
        leak = left_open()
        if leak:
            print(f"LEFT OPEN after op {rec.process}:{rec.count}: {leak}", flush=True)
        if outcome != "ok":
            failures += 1
            time.sleep(min(0.5, 0.05 * failures))
        time.sleep(args.get("pause", 0.0))
    rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
