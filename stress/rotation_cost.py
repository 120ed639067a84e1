"""What turning over several PostgreSQL servers costs a point read, without the package.

    python stress/rotation_cost.py [--servers 3] [--seconds 30]

Starts its own throw-away servers (``PgCluster``, as the stress suite), one psycopg
connection to each, and times the same primary-key SELECT, interleaved in batches of 100
so that drift on a shared machine hits every variant alike:

* ``one``            -- always the first server (what the ``direct`` baseline does);
* ``rotating``       -- the servers in turn (what ROUND_ROBIN does, per read);
* ``one_idle_<N>us`` -- the first server, with N µs of client CPU work between reads;
* ``rotating_idle_<N>us`` -- the servers in turn, with the same work between reads.

With the ORM's ~300 µs of Python between reads, each server of three idles ~1 ms between
its turns.  If ``one_idle`` grows with N the way ``rotating`` exceeds ``one``, the cost
is the machine's (a server process idle for longer answers later: CPU idle states,
caches), not the load balancer's.  Everything it starts it stops; every loop is bounded
in count and time.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SQL = "SELECT id, name, value, grp, created FROM item WHERE id = %s"
ROWS = 5000
BATCH = 100
MAX_ROUNDS = 200


def spin(seconds: float) -> None:
    """Busy work between reads, like the ORM's Python (the client keeps its CPU)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def variants(cursors: list, idle_us: list[int], rng: random.Random) -> dict[str, Callable[[], float]]:
    turn = itertools.cycle(cursors)
    perf = time.perf_counter

    def read(pick: Callable[[], Any], idle: float) -> Callable[[], float]:
        def go() -> float:
            cursor = pick()
            t0 = perf()
            cursor.execute(SQL, [rng.randint(1, ROWS)])
            cursor.fetchall()
            took = perf() - t0
            if idle:
                spin(idle)
            return took
        return go

    first = cursors[0]
    out = {"one": read(lambda: first, 0), "rotating": read(lambda: next(turn), 0)}
    for us in idle_us:
        out[f"one_idle_{us}us"] = read(lambda: first, us / 1e6)
        out[f"rotating_idle_{us}us"] = read(lambda: next(turn), us / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget of the measurement")
    parser.add_argument("--idle-us", default="300,900", help="client work between reads, comma list of µs")
    args = parser.parse_args(argv)

    import psycopg

    from tests.support.pg_cluster import PgCluster

    idle_us = [int(x) for x in args.idle_us.split(",") if x]
    with PgCluster(count=args.servers) as cluster:
        settings = cluster.django_databases([f"s{i}" for i in range(args.servers)])
        connections = [psycopg.connect(host=s["HOST"], port=s["PORT"], user=s["USER"], dbname=s["NAME"],
                                       autocommit=True, cursor_factory=psycopg.ClientCursor)
                       for s in settings.values()]
        try:
            for conn in connections:
                conn.execute("CREATE TABLE item (id int PRIMARY KEY, name text, value int, grp int, created timestamptz)")
                conn.execute(f"INSERT INTO item SELECT i, 'item-' || i, i, i % 50, now() "
                             f"FROM generate_series(1, {ROWS}) i")
            cursors = [conn.cursor() for conn in connections]
            probes = variants(cursors, idle_us, random.Random(7))
            samples: dict[str, list[float]] = {name: [] for name in probes}
            for probe in probes.values():   # warm-up
                for _ in range(BATCH):
                    probe()
            deadline = time.monotonic() + args.seconds
            rounds = 0
            while time.monotonic() < deadline and rounds < MAX_ROUNDS:
                rounds += 1
                for name, probe in probes.items():
                    samples[name].extend(probe() for _ in range(BATCH))
        finally:
            for conn in connections:
                conn.close()
    base = statistics.median(samples["one"])
    print(f"{args.servers} PostgreSQL servers, {rounds} rounds of {BATCH} reads per variant (p50 of the SELECT alone)")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(f"  {name:24s} {p50 * 1e6:8.1f} µs   {p50 / base:5.2f}x one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
