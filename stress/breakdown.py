"""Where a point read's time goes: one client, sequential, in the driver process (``--breakdown``).

Probes (each bounded by a count and a time budget; p50 and mean in microseconds):

* ``ping``             -- ``client.call("ping")``: one Manager round trip, no database;
* ``lb_raw_read``      -- a raw cursor on the load-balanced alias: transport + coordinator + DB thread + DB;
* ``direct_raw_read``  -- the same SQL on a raw cursor of ONE database (the DB's own cost);
* ``lb_orm_get``       -- ``Item.objects.get(pk=...)`` through the coordinator;
* ``direct_orm_get``   -- ``DirectItem.objects.using(alias).get(pk=...)``;
* ``direct_orm_get_rotating`` -- ``Item.objects.using(copy).get(pk=...)``, plain Django turning over
  the load-balanced copies in order, as ROUND_ROBIN does: what rotating costs without the package
  (a PostgreSQL server idle for longer answers later; see stress/README.md, round 6);
* ``encode_request``   -- pickling one read descriptor (client side, per query);
* ``new_request_id``   -- the per-query request id (uuid4).

The three ``*_orm_get*`` probes are measured interleaved (batches of 100 in turn), so that
drift on a shared machine hits them alike.  From them: coordinator-internal cost ~= lb_raw_read - ping - direct_raw_read (dispatch,
the hand-off to the database thread and back, pickling the result).
"""
from __future__ import annotations

import random
import statistics
import time
from itertools import cycle
from typing import Any, Callable, Sequence


def measure(fn: Callable[[], Any], count: int, seconds: float) -> dict:
    for _ in range(min(200, count)):  # warm-up
        fn()
    values = []
    deadline = time.monotonic() + seconds
    perf = time.perf_counter
    while len(values) < count and time.monotonic() < deadline:
        t0 = perf()
        fn()
        values.append(perf() - t0)
    return _stats(values)


def measure_interleaved(fns: dict[str, Callable[[], Any]], count: int, seconds: float, batch: int = 100) -> dict:
    """``measure`` for several probes at once, in turns of ``batch`` calls each."""
    for fn in fns.values():
        for _ in range(min(200, count)):  # warm-up
            fn()
    values: dict[str, list] = {name: [] for name in fns}
    deadline = time.monotonic() + seconds
    perf = time.perf_counter
    while min(len(v) for v in values.values()) < count and time.monotonic() < deadline:
        for name, fn in fns.items():
            samples = values[name]
            for _ in range(batch):
                t0 = perf()
                fn()
                samples.append(perf() - t0)
    return {name: _stats(v) for name, v in values.items()}


def _stats(values: list) -> dict:
    values.sort()
    return {"n": len(values), "p50_us": 1e6 * values[len(values) // 2], "mean_us": 1e6 * statistics.fmean(values),
            "p99_us": 1e6 * values[int(len(values) * 0.99) - 1 if len(values) > 1 else 0]}


def run(seed: dict, direct_alias: str, count: int = 5000, seconds: float = 8.0,
        copies: Sequence[str] = ()) -> dict:
    from django.db import connections
    from stressapp.models import DirectItem, Item

    from django_lb_shm.wire import descriptors as d
    from django_lb_shm.backend.alias import lb_alias
    from django_lb_shm.client.connection import get_client

    rng = random.Random(7)
    lo, hi = seed["lb"]["pk_min"], seed["lb"]["pk_max"]
    dlo, dhi = seed["direct"]["pk_min"], seed["direct"]["pk_max"]
    client = get_client()
    lb = connections[lb_alias()]
    direct = connections[direct_alias]
    sql_lb = 'SELECT id, name, value, "group", created FROM stressapp_item WHERE id = %s'
    sql_direct = 'SELECT id, name, value, "group", created FROM stressapp_directitem WHERE id = %s'

    def raw(conn: Any, sql: str, a: int, b: int) -> Callable[[], Any]:
        def go() -> Any:
            with conn.cursor() as cursor:
                cursor.execute(sql, [rng.randint(a, b)])
                return cursor.fetchone()
        return go

    request = d.Request(op=d.OP_READ, statement=d.Statement(sql_lb, [123]), request_id=client.new_request_id())
    probes = {
        "ping": lambda: client.call("ping"),
        "lb_raw_read": raw(lb, sql_lb, lo, hi),
        "direct_raw_read": raw(direct, sql_direct, dlo, dhi),
        "encode_request": lambda: d.encode(request),
        "new_request_id": client.new_request_id,
    }
    turn = cycle(list(copies) or [direct_alias])
    orm = {
        "lb_orm_get": lambda: Item.objects.get(pk=rng.randint(lo, hi)),
        "direct_orm_get": lambda: DirectItem.objects.using(direct_alias).get(pk=rng.randint(dlo, dhi)),
        "direct_orm_get_rotating": lambda: Item.objects.using(next(turn)).get(pk=rng.randint(lo, hi)),
    }
    out = {name: measure(fn, count, seconds) for name, fn in probes.items()}
    out.update(measure_interleaved(orm, count, 3 * seconds))
    p = {k: v["p50_us"] for k, v in out.items()}
    out["derived_p50_us"] = {
        "coordinator_internal": p["lb_raw_read"] - p["ping"] - p["direct_raw_read"],
        "transport_ping": p["ping"],
        "orm_overhead_lb": p["lb_orm_get"] - p["lb_raw_read"],
        "orm_overhead_direct": p["direct_orm_get"] - p["direct_raw_read"],
        "lb_minus_direct_orm": p["lb_orm_get"] - p["direct_orm_get"],
        "rotation_cost": p["direct_orm_get_rotating"] - p["direct_orm_get"],
        "lb_minus_rotating_direct_orm": p["lb_orm_get"] - p["direct_orm_get_rotating"],
    }
    connections.close_all()
    return out


def table(result: dict) -> str:
    lines = [f"  {'probe':24s} {'n':>6s} {'p50 µs':>9s} {'mean µs':>9s} {'p99 µs':>9s}"]
    for name, v in result.items():
        if name == "derived_p50_us":
            continue
        lines.append(f"  {name:24s} {v['n']:6d} {v['p50_us']:9.1f} {v['mean_us']:9.1f} {v['p99_us']:9.1f}")
    lines.append("  derived (p50 differences, µs):")
    for name, v in result["derived_p50_us"].items():
        lines.append(f"    {name:26s} {v:8.1f}")
    return "\n".join(lines)
