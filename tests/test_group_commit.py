"""Group commit: concurrent autocommit writes from several processes share one leader
transaction, one journal append and one COMMIT, and each keeps its own outcome."""
from __future__ import annotations

import json
import multiprocessing
import os

from tests.support.group_workers import create_authors
from tests.support.lb import ALIASES
from tests.testapp.models import Author

WRITERS = 6
PER_WRITER = 40


def _run_writers(tmp_path) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    shared = [f"shared-{n}" for n in range(10)]
    outs = [tmp_path / f"writer-{n}.jsonl" for n in range(WRITERS)]
    procs = [ctx.Process(target=create_authors, args=(os.environ["LB_TEST_CONFIG"], f"w{n}", PER_WRITER, shared, str(out)))
             for n, out in enumerate(outs)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
        assert proc.exitcode == 0
    return [json.loads(line) for out in outs for line in out.read_text().splitlines()]


def test_concurrent_writes_are_grouped_and_one_duplicate_fails_only_its_caller(coordinator, replicas, tmp_path):
    before = coordinator.status()["coordinator"]["write_groups"]
    told = _run_writers(tmp_path)
    after = coordinator.status()["coordinator"]["write_groups"]
    assert len(told) == WRITERS * PER_WRITER * 2
    acked = {r["name"]: r["pk"] for r in told if r["ok"]}
    refused = [r for r in told if not r["ok"]]
    # each writer's own names all succeed; of the shared names each succeeds exactly once
    assert all(r["ok"] for r in told if not r["name"].startswith("shared-")), refused[:3]
    assert sorted(n for n in acked if n.startswith("shared-")) == [f"shared-{n}" for n in range(10)]
    assert all(r["error"] == "IntegrityError" for r in refused)
    assert len(refused) == WRITERS * PER_WRITER - 10
    # every acknowledged write is on every copy with the key the app was told, and nothing else
    replicas.assert_identical(["testapp_author"])
    for alias in ALIASES:
        rows = {row[1]: row[0] for row in replicas.rows("testapp_author")[alias]}
        assert rows == acked, alias
    # writes were actually grouped (six writers at once: some groups hold several writes)
    groups = after["groups"] - before["groups"]
    writes = after["writes"] - before["writes"]
    assert writes >= WRITERS * PER_WRITER * 2 and groups < writes
    assert Author.objects.count() == len(acked)
    _assert_sequences_past_every_key(max(acked.values()))


def _assert_sequences_past_every_key(top: int) -> None:
    """PostgreSQL: each copy's key sequence is past every key (the followers reset it once per
    group and table, not once per row), so whichever copy leads next generates fresh keys."""
    from django.db import connections

    if connections[ALIASES[0]].vendor != "postgresql":
        return
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT last_value FROM testapp_author_id_seq")
            assert cursor.fetchone()[0] >= top, alias


def test_a_lone_write_is_a_group_of_one(coordinator, replicas):
    before = coordinator.status()["coordinator"]["write_groups"]
    author = Author.objects.create(name="alone")
    after = coordinator.status()["coordinator"]["write_groups"]
    assert (after["groups"] - before["groups"], after["writes"] - before["writes"]) == (1, 1)
    replicas.assert_identical(["testapp_author"])
    assert Author.objects.get(pk=author.pk).name == "alone"


def test_a_write_whose_answer_is_lost_is_sent_again_and_answered_from_the_journal(coordinator, replicas, monkeypatch):
    """The client re-sends a write on a new connection when the answer did not come; the
    coordinator answers the repeated id from the journal (it looks only when told the bytes
    were sent before), so a non-idempotent UPDATE is applied once."""
    from django.db.models import F, Value
    from django.db.models.functions import Concat

    from django_lb_shm.client.connection import ClientConnection
    from django_lb_shm.errors import CoordinatorUnavailable

    author = Author.objects.create(name="a")
    real_call = ClientConnection.call
    sends: list = []

    def answer_lost_once(self, method, *args, **kwargs):
        answer = real_call(self, method, *args, **kwargs)
        if method == "execute":
            sends.append(args[1:])
            if len(sends) == 1:
                raise CoordinatorUnavailable("the answer was lost (test)")
        return answer

    monkeypatch.setattr(ClientConnection, "call", answer_lost_once)
    assert Author.objects.filter(pk=author.pk).update(name=Concat(F("name"), Value("y"))) == 1
    monkeypatch.undo()
    assert sends == [(), (True,)]   # the first send, then the same bytes marked as sent before
    replicas.assert_identical(["testapp_author"])
    for alias in ALIASES:
        assert {row[1]: row[0] for row in replicas.rows("testapp_author")[alias]}.get("ay") == author.pk, alias
