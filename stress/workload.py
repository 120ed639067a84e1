"""The client side of the stress suite: one app process, run as a multiprocessing 'spawn' child.

Each process configures Django from the suite's settings JSON (``django.setup()``),
then waits for phase commands from the driver.  A phase is one workload against
one target:

* target ``lb``     -- ``Item`` (a LoadBalancerModel): through the coordinator;
* target ``direct`` -- ``DirectItem.objects.using(<one alias>)``: straight to ONE database;
* target ``pgpool`` -- ``PoolItem.objects.using("pgpool")``: through Pgpool-II.

Every target runs the same client code, the same ORM calls and the same SQL
shape; only the model/alias differs.  Every loop here is bounded in time AND in
count (the phase deadline and ``max_ops``; the command loop by an idle timeout
and the parent's liveness).
"""
from __future__ import annotations

import os
import queue
import random
import sys
import time
import traceback
from array import array
from collections import Counter
from typing import Any, Callable

READ_KINDS = ("read_pk", "read_list")
WRITE_KINDS = ("insert", "update")
KINDS = READ_KINDS + WRITE_KINDS
WORKLOADS = KINDS + ("mixed",)

LIST_SIZE = 10               # rows of the filtered list read
SAMPLE_CAP = 100_000         # latency samples kept per op kind per process (reservoir beyond)
IDLE_LIMIT_S = 1800.0        # a worker with no command for this long exits
COUNTER_EVERY = 32           # progress counter update period, in ops


def setup_django(config_path: str) -> None:
    os.environ["LB_STRESS_CONFIG"] = config_path
    os.environ["DJANGO_SETTINGS_MODULE"] = "stressproject.settings"
    import django

    django.setup()


class Ops:
    """The four operations against one target; each is one ORM call = one SQL statement."""

    def __init__(self, target: str, alias: str | None, seed: dict, rng: random.Random, tag: str):
        from stressapp.models import DirectItem, Item, PoolItem

        model = {"lb": Item, "direct": DirectItem, "pgpool": PoolItem}[target]
        # lb: the model's own manager (the coordinator); others: one database alias
        self.qs = model.objects.all() if target == "lb" else model.objects.using(alias)
        self.manager = model.objects if target == "lb" else model.objects.db_manager(alias)
        self.lo, self.hi = seed["pk_min"], seed["pk_max"]
        self.groups = seed["groups"]
        self.rng = rng
        self.tag = tag
        self.n = 0
        self.table: dict[str, Callable[[], Any]] = {
            "read_pk": self.read_pk, "read_list": self.read_list,
            "insert": self.insert, "update": self.update,
        }

    def read_pk(self) -> Any:
        return self.qs.get(pk=self.rng.randint(self.lo, self.hi))

    def read_list(self) -> Any:
        rows = list(self.qs.filter(group=self.rng.randrange(self.groups)).order_by("id")[:LIST_SIZE])
        if not rows:
            raise AssertionError("filtered list read returned no rows")
        return rows

    def insert(self) -> Any:
        self.n += 1
        return self.manager.create(name=f"{self.tag}-{self.n}", value=self.n,
                                   group=self.rng.randrange(self.groups))

    def update(self) -> Any:
        pk = self.rng.randint(self.lo, self.hi)
        count = self.qs.filter(pk=pk).update(value=self.rng.randrange(1_000_000))
        if count != 1:
            raise AssertionError(f"update of pk {pk} touched {count} rows")
        return count


class Samples:
    """Latencies of one op kind (seconds), a uniform reservoir once over SAMPLE_CAP."""

    def __init__(self, rng: random.Random):
        self.values = array("d")
        self.count = 0
        self.rng = rng

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < SAMPLE_CAP:
            self.values.append(value)
        else:
            j = self.rng.randrange(self.count)
            if j < SAMPLE_CAP:
                self.values[j] = value


def op_picker(workload: str, mix: tuple[float, float], rng: random.Random) -> Callable[[], str]:
    if workload != "mixed":
        return lambda: workload
    read_share = mix[0] / (mix[0] + mix[1])

    def pick() -> str:
        if rng.random() < read_share:
            return READ_KINDS[rng.getrandbits(1)]
        return WRITE_KINDS[rng.getrandbits(1)]

    return pick


def run_phase(index: int, cmd: dict, res_q: Any, go: Any, start_at: Any, counters: Any) -> dict:
    from django.db import connections

    rng = random.Random(hash((index, cmd["phase_id"], os.getpid())))
    tag = f"{cmd['target']}-{cmd['phase_id']}-{index}-{os.getpid()}"
    ops = Ops(cmd["target"], cmd.get("alias"), cmd["seed"], rng, tag)
    pick = op_picker(cmd["workload"], tuple(cmd["mix"]), rng)
    errors: Counter = Counter()
    messages: list[str] = []

    def note(exc: BaseException) -> None:
        name = type(exc).__name__
        errors[name] += 1
        if len(messages) < 5:
            messages.append(f"{name}: {str(exc)[:300]}")

    # warm-up: connections, caches, the coordinator's server thread for this socket
    warm_deadline = time.monotonic() + cmd["warmup_s"]
    warm_errors = 0
    for _ in range(cmd["warmup_ops"]):
        if time.monotonic() > warm_deadline:
            break
        try:
            ops.table[pick()]()
        except Exception:
            warm_errors += 1
    counters[index] = 0
    res_q.put(("ready", index, cmd["phase_id"], warm_errors))

    if not go.wait(cmd["go_timeout"]):
        return {"index": index, "ops": 0, "errors": {"NoGoSignal": 1}, "messages": ["no go signal"],
                "samples": {}, "elapsed": 0.0}
    start = start_at.value
    now = time.monotonic()
    if start > now:
        time.sleep(start - now)
    deadline = start + cmd["duration"]
    max_ops = cmd["max_ops"]
    samples = {kind: Samples(rng) for kind in KINDS}
    table = ops.table
    perf = time.perf_counter
    mono = time.monotonic
    done = 0
    profiler = None
    if cmd.get("pyinstrument") and index == 0:
        try:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        except ImportError:
            profiler = None
    while done < max_ops and mono() < deadline:
        kind = pick()
        t0 = perf()
        try:
            table[kind]()
        except Exception as exc:  # counted, the report shows them
            note(exc)
        samples[kind].add(perf() - t0)
        done += 1
        if done % COUNTER_EVERY == 0:
            counters[index] = done
    ended = mono()
    counters[index] = done
    if profiler is not None:
        profiler.stop()
        try:
            path = cmd["pyinstrument"]
            with open(path + ".txt", "w") as f:
                f.write(profiler.output_text(unicode=False, color=False, show_all=False))
            with open(path + ".html", "w") as f:
                f.write(profiler.output_html())
        except Exception as exc:  # profiling is best effort
            messages.append(f"pyinstrument: {exc}")
    # pgpool children are bound to their client connection: give them back between phases
    connections.close_all()
    return {
        "index": index,
        "ops": done,
        "errors": dict(errors),
        "messages": messages,
        "samples": {k: (s.count, s.values.tobytes()) for k, s in samples.items() if s.count},
        "elapsed": ended - start,
        "hit_max_ops": done >= max_ops,
    }


def worker_main(index: int, config_path: str, cmd_q: Any, res_q: Any, go: Any, start_at: Any,
                counters: Any, parent_pid: int) -> None:
    """Entry point of one client process."""
    import signal

    # Ctrl-C is the driver's to handle; it stops us by pid (SIGTERM) or with a None command.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        setup_django(config_path)
    except Exception:
        res_q.put(("setup_failed", index, None, traceback.format_exc()))
        return
    res_q.put(("up", index, None, os.getpid()))
    idle_since = time.monotonic()
    while True:
        try:
            cmd = cmd_q.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent_pid or time.monotonic() - idle_since > IDLE_LIMIT_S:
                return
            continue
        if cmd is None:
            return
        try:
            result = run_phase(index, cmd, res_q, go, start_at, counters)
        except Exception:
            result = {"index": index, "ops": 0, "errors": {"WorkerCrashed": 1},
                      "messages": [traceback.format_exc()[-2000:]], "samples": {}, "elapsed": 0.0}
            res_q.put(("ready", index, cmd.get("phase_id"), 0))  # harmless if it was already sent
        res_q.put(("result", index, cmd.get("phase_id"), result))
        idle_since = time.monotonic()
        sys.stdout.flush()
