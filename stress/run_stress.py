#!/usr/bin/env python3
"""django_lb_shm stress suite: one command, its own databases, its own coordinator.

    python stress/run_stress.py [--clients 4] [--duration 5] [--db sqlite|postgres] [--dbs 3]
                                [--mix 80/20] [--read-algorithm ROUND_ROBIN] [--write-ack FIRST]
                                [--compare pgpool] [--scale] [--soak MINUTES] [--runs R]
                                [--json PATH] [--chart PATH] [--smoke]

See stress/README.md.  Everything it starts (SQLite files or PostgreSQL servers, the
coordinator, pgpool, the client processes) it stops by pid at the end, on Ctrl-C and
on SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

STRESS_DIR = Path(__file__).resolve().parent
REPO = STRESS_DIR.parent
for _p in (str(STRESS_DIR), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import breakdown  # noqa: E402
import cpu_caps  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import workload  # noqa: E402
from harness import log  # noqa: E402

READ_ALGORITHMS = ("ROUND_ROBIN", "INTERVAL_TIME", "LEAST_CONNECTIONS")
WRITE_ACKS = ("FIRST", "QUORUM", "ALL")
SCALE_POINTS = (1, 2, 4, 8, 16, 32, 64)
SEED_ROWS = 5000
ROWS_PER_GROUP = 20
SOAK_SAMPLE_EVERY = 5.0
SMOKE_DEFAULT_JSON = Path(tempfile.gettempdir()) / "django_lb_shm_stress_smoke.json"


class Terminated(BaseException):
    """SIGTERM: stop like on Ctrl-C."""


def on_term(signum: int, frame: Any) -> None:
    raise Terminated()


# -- options ---------------------------------------------------------------------------------
def parse_mix(text: str) -> tuple[float, float]:
    try:
        if "/" in text:
            r, w = (float(x) for x in text.split("/", 1))
        else:
            r = float(text)
            if r > 1:
                r /= 100.0
            w = 1.0 - r
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix wants READ/WRITE like 80/20 (or a read share like 0.8), got {text!r}")
    if r < 0 or w < 0 or r + w <= 0:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: shares must be >= 0 and not both 0")
    return (r, w)


def choice_list(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        values = [v.strip().upper() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad) or text!r} not in {', '.join(allowed)}")
        return values

    return parse


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("client counts must be >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_stress.py", description="django_lb_shm stress suite (see stress/README.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="client (app) processes per phase")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--dbs", type=int, default=3, help="number of databases behind the coordinator")
    p.add_argument("--mix", type=parse_mix, default=(80.0, 20.0), help="read/write ratio of the mixed phase")
    p.add_argument("--read-algorithm", type=choice_list(READ_ALGORITHMS, "--read-algorithm"), default=["ROUND_ROBIN"],
                   help="read algorithm; a comma list runs each (one coordinator start each)")
    p.add_argument("--write-ack", type=choice_list(WRITE_ACKS, "--write-ack"), default=["FIRST"],
                   help="WRITE_ACK; a comma list (e.g. FIRST,ALL) runs each")
    p.add_argument("--compare", choices=("pgpool",), help="also run every phase through Pgpool-II (needs --db postgres "
                   "and the Debian package pgpool2)")
    p.add_argument("--scale", action="store_true", help="mixed-load curve over 1,2,4,8,16,32,64 client processes")
    p.add_argument("--scale-points", type=int_list, default=list(SCALE_POINTS), help="client counts for --scale")
    p.add_argument("--soak", type=float, metavar="MINUTES", help="mixed load for MINUTES; coordinator RSS start/end")
    p.add_argument("--runs", type=int, default=1, help="repeat every phase R times; tables show medians")
    p.add_argument("--phases", default=",".join(workload.WORKLOADS),
                   help=f"workloads to run, from {','.join(workload.WORKLOADS)} ('none' for only --scale/--soak)")
    p.add_argument("--no-direct", action="store_true", help="skip the direct-ORM baseline (not recommended)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--rows", type=int, default=SEED_ROWS, help="rows seeded in every table")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per client per phase (max 200 ops)")
    p.add_argument("--max-ops", type=int, default=500_000, help="hard cap of operations per client per phase")
    p.add_argument("--journal-fsync", choices=("on", "off"), default="on",
                   help="LOAD_BALANCER JOURNAL_FSYNC: on, the package's durable default (the throw-away "
                        "PostgreSQL servers run with fsync=off)")
    p.add_argument("--read-path", choices=("AUTO", "COORDINATOR"), default="AUTO",
                   help="LOAD_BALANCER READ_PATH of the app processes (AUTO: zero-hop reads; COORDINATOR: "
                        "every read through the coordinator, as before issue 15)")
    p.add_argument("--pgpool-statement-lb", choices=("on", "off"), default="on",
                   help="pgpool statement_level_load_balance (on: every SELECT balanced, off: per session)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the coordinator (raw stacks) and pyinstrument client 0 "
                   "during every load-balanced phase, into DIR")
    p.add_argument("--profile-mode", choices=("cpu", "wall"), default="cpu",
                   help="cpu: py-spy --gil (who burns the coordinator's CPU); wall: --idle (where each thread waits; "
                   "summarize with profile_summary.py --categories)")
    p.add_argument("--breakdown", action="store_true", help="also time a point read's parts (ping, raw cursor, ORM) "
                   "in the driver process, 1 client, sequential")
    p.add_argument("--cap-db-cpu", type=float, metavar="PCT",
                   help="separate small database hosts on one machine (issue 15's scale-out): each PostgreSQL "
                   "server in a cgroup of its own capped at PCT %% of one core (cgroup v1 cpu controller, root; "
                   "undone at exit); needs --db postgres")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (databases, logs, settings)")
    p.add_argument("--smoke", action="store_true", help="~15 s minimal run (sqlite, 2 clients, 1 s phases) that "
                   "checks the JSON has every promised field; exit 1 otherwise")
    return p


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients = min(args.clients, 2) if "--clients" in (argv or sys.argv) else 2
        args.duration = 1.0
        args.db = "sqlite"
        args.runs = 1
        args.rows = 500
        args.warmup = 0.2
        args.json = args.json or str(SMOKE_DEFAULT_JSON)
    if args.clients < 1 or args.dbs < 1 or args.runs < 1 or args.duration <= 0 or args.max_ops < 1:
        parser.error("--clients, --dbs, --runs, --max-ops must be >= 1 and --duration > 0")
    phases = [w.strip() for w in args.phases.split(",") if w.strip()]
    if phases == ["none"]:
        phases = []
    bad = [w for w in phases if w not in workload.WORKLOADS]
    if bad:
        parser.error(f"--phases: unknown {', '.join(bad)}; known: {', '.join(workload.WORKLOADS)}")
    args.workloads = phases
    if args.cap_db_cpu is not None:
        if args.db != "postgres":
            parser.error("--cap-db-cpu caps PostgreSQL servers: add --db postgres")
        if not 0 < args.cap_db_cpu <= 100:
            parser.error(f"--cap-db-cpu wants a percentage of one core in (0, 100], got {args.cap_db_cpu}")
        reason = cpu_caps.unavailable_reason()
        if reason:
            parser.error(f"--cap-db-cpu: {reason}")
    if args.soak is not None and args.soak <= 0:
        parser.error("--soak wants a positive number of minutes")
    return args


# -- the client pool --------------------------------------------------------------------------
class ClientPool:
    """N spawned app processes, each with its own command queue; one shared result queue."""

    def __init__(self, size: int, config_path: Path):
        ctx = mp.get_context("spawn")
        self.size = size
        self.res_q = ctx.Queue()
        self.go = ctx.Event()
        self.start_at = ctx.Value("d", 0.0, lock=False)
        self.counters = ctx.Array("q", size, lock=False)
        self.cmd_qs = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(target=workload.worker_main, name=f"stress-client-{i}", daemon=True,
                        args=(i, str(config_path), self.cmd_qs[i], self.res_q, self.go, self.start_at,
                              self.counters, os.getpid()))
            for i in range(size)
        ]
        self.stale: list = []

    def start(self, timeout: float) -> None:
        log(f"starting {self.size} client process(es) (spawn, django.setup())...")
        for p in self.procs:
            p.start()
        up = set()
        deadline = time.monotonic() + timeout
        while len(up) < self.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"only {len(up)}/{self.size} client processes came up within {timeout:.0f}s")
            try:
                kind, index, _pid, payload = self.res_q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"client process(es) died during start: {', '.join(dead)}")
                continue
            if kind == "setup_failed":
                raise RuntimeError(f"client {index} could not set up Django:\n{payload}")
            if kind == "up":
                up.add(index)

    def get(self, timeout: float) -> Optional[tuple]:
        try:
            return self.res_q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        for q in self.cmd_qs:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            if p.pid is None:
                continue
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.terminate()  # SIGTERM to that pid
        for p in self.procs:
            if p.pid is not None:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(2)


# -- the driver --------------------------------------------------------------------------------
class Variant:
    def __init__(self, read_algorithm: str, write_ack: str, label: str):
        self.read_algorithm = read_algorithm
        self.write_ack = write_ack
        self.label = label


def make_variants(args: argparse.Namespace) -> list[Variant]:
    variants = []
    short = {"ROUND_ROBIN": "RR", "INTERVAL_TIME": "IT", "LEAST_CONNECTIONS": "LC"}
    for r in args.read_algorithm:
        for w in args.write_ack:
            parts = []
            if len(args.read_algorithm) > 1:
                parts.append(short[r])
            if len(args.write_ack) > 1:
                parts.append(w)
            variants.append(Variant(r, w, "lb" + (f"[{','.join(parts)}]" if parts else "")))
    return variants


class Driver:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.env = harness.Environment(tmp, "postgres" if args.db == "postgres" else "sqlite", args.dbs, keep=args.keep)
        self.pool: Optional[ClientPool] = None
        self.variants = make_variants(args)
        self.current: Optional[Variant] = None
        self.seed: dict[str, dict] = {}
        self.phase_id = 0
        self.phases: list[dict] = []
        self.scale: list[dict] = []
        self.soak: Optional[dict] = None
        self.pgpool_note: Optional[str] = None
        self.breakdown: Optional[dict] = None
        self.use_pgpool = False
        self.tty = sys.stderr.isatty()
        self.started = time.time()
        self.port = 0
        self.databases: dict = {}
        self.caps: Optional[cpu_caps.CpuCaps] = None

    # -- set-up -------------------------------------------------------------------------------
    def pool_size(self) -> int:
        n = self.args.clients
        if self.args.scale:
            n = max([n] + self.args.scale_points)
        return n

    def setup(self) -> None:
        from tests.support.pg_cluster import free_port

        args = self.args
        self.check_pgpool()
        pool_size = self.pool_size()
        # direct clients + pgpool children + the coordinator's two connections per database
        self.databases = self.env.make_databases(extra_pg_connections=2 * pool_size + 20)
        # PgCluster installs a SIGTERM handler of its own (stop postgres, die): ours stops everything
        signal.signal(signal.SIGTERM, on_term)
        self.port = free_port()
        if self.use_pgpool:
            self.env.pgpool = harness.Pgpool(
                harness.pgpool_binary(), self.env.cluster, self.tmp / "pgpool", free_port(), free_port(),
                children=pool_size + 4, statement_level_load_balance=args.pgpool_statement_lb == "on")
            self.databases["pgpool"] = self.env.pgpool.django_settings()
        first = self.variants[0]
        self.env.write_settings(self.databases, self.port, first.read_algorithm, first.write_ack,
                                args.journal_fsync == "on", args.read_path)
        os.environ.update({k: v for k, v in harness.child_env(self.env.config_path).items()
                           if k in ("LB_STRESS_CONFIG", "DJANGO_SETTINGS_MODULE")})
        import django
        from django.core.management import call_command

        django.setup()
        for alias in self.env.aliases:
            log(f"migrating {alias} directly")
            call_command("migrate", database=alias, verbosity=0, interactive=False)
        self.start_coordinator(first)
        self.seed_tables()
        if self.use_pgpool:
            log(f"starting pgpool {self.env.pgpool.version} (native replication) on 127.0.0.1:{self.env.pgpool.port}")
            self.env.pgpool.start()
        if args.workloads or args.scale or args.soak:
            self.pool = ClientPool(pool_size, self.env.config_path)
            self.pool.start(timeout=60 + 3 * pool_size)
        if args.cap_db_cpu:
            self.cap_servers(args.cap_db_cpu)

    def cap_servers(self, percent: float) -> None:
        """Each server, with the backends it already forked and every one it forks later, capped."""
        import psutil

        self.caps = cpu_caps.CpuCaps(percent)
        for alias, server in zip(self.env.aliases, self.env.cluster):
            postmaster = psutil.Process(server.postmaster_pid())
            pids = [postmaster.pid] + [c.pid for c in postmaster.children(recursive=True)]
            group = self.caps.cap(alias, pids)
            log(f"capped {alias} (port {server.port}, {len(pids)} processes) at {percent:g}% of one core: {group}")

    def release_caps(self) -> None:
        if self.caps is not None:
            self.caps.release()
            self.caps = None

    def check_pgpool(self) -> None:
        if self.args.compare != "pgpool":
            return
        if self.args.db != "postgres":
            self.pgpool_note = "--compare pgpool needs --db postgres (Pgpool-II fronts PostgreSQL): skipped"
        elif harness.pgpool_binary() is None:
            self.pgpool_note = ("Pgpool-II is not installed (Debian package pgpool2: apt-get install -y pgpool2): "
                                "the pgpool comparison is skipped")
        else:
            self.use_pgpool = True
        if self.pgpool_note:
            log(self.pgpool_note)

    def start_coordinator(self, variant: Variant) -> None:
        if self.current is variant:
            return
        if self.env.coordinator is not None:
            log("restarting the coordinator for the next variant")
            self.env.wait_drained()
            self.env.stop_coordinator()
        self.env.write_settings(self.databases, self.port, variant.read_algorithm, variant.write_ack,
                                self.args.journal_fsync == "on", self.args.read_path)
        log(f"starting the coordinator (bin/djangoloadbalancer run) on 127.0.0.1:{self.port}: "
            f"R_ALGORITHM={variant.read_algorithm} WRITE_ACK={variant.write_ack}")
        status = self.env.start_coordinator()
        self.current = variant
        log(f"coordinator ready: pid {status['coordinator']['pid']}, databases "
            + ", ".join(f"{d['name']}={d['state']}" for d in status["databases"]))

    def seed_tables(self) -> None:
        from django.core.management.color import no_style
        from django.db import connections
        from stressapp.models import DirectItem, Item, PoolItem

        n = self.args.rows
        groups = max(1, n // ROWS_PER_GROUP)
        log(f"seeding {n} rows: Item through the coordinator, DirectItem/PoolItem directly")

        def rows(model: type, explicit: bool = False) -> list:
            return [model(**({"id": i + 1} if explicit else {}), name=f"seed-{i}", value=i, group=i % groups)
                    for i in range(n)]

        created = Item.objects.bulk_create(rows(Item), batch_size=500)
        pks = [o.pk for o in created]
        if any(pk is None for pk in pks):
            pks = list(Item.objects.order_by("id").values_list("id", flat=True))
        self.seed["lb"] = {"pk_min": min(pks), "pk_max": max(pks), "groups": groups}
        direct_alias = self.env.aliases[0]
        created = DirectItem.objects.using(direct_alias).bulk_create(rows(DirectItem), batch_size=500)
        pks = [o.pk for o in created] if all(o.pk for o in created) else list(
            DirectItem.objects.using(direct_alias).values_list("id", flat=True))
        self.seed["direct"] = {"pk_min": min(pks), "pk_max": max(pks), "groups": groups}
        if self.use_pgpool:
            # identical rows AND keys on every PostgreSQL server, sequence past them
            same = rows(PoolItem, explicit=True)  # one set of objects: same `created` everywhere
            for alias in self.env.aliases:
                PoolItem.objects.using(alias).bulk_create(same, batch_size=500)
                with connections[alias].cursor() as cursor:
                    for sql in connections[alias].ops.sequence_reset_sql(no_style(), [PoolItem]):
                        cursor.execute(sql)
            self.seed["pgpool"] = {"pk_min": 1, "pk_max": n, "groups": groups}
        self.env.wait_drained()
        connections.close_all()

    # -- one phase -----------------------------------------------------------------------------
    def targets(self, variant: Variant, with_baselines: bool) -> list[tuple[str, str, Optional[str]]]:
        out = [("lb", variant.label, None)]
        if with_baselines:
            if not self.args.no_direct:
                out.append(("direct", f"direct[{self.env.aliases[0]}]", self.env.aliases[0]))
            if self.use_pgpool:
                out.append(("pgpool", "pgpool", "pgpool"))
        return out

    def run_phase(self, work: str, target: str, label: str, alias: Optional[str], clients: int,
                  duration: float, counter: str, soak: bool = False) -> dict:
        assert self.pool is not None
        self.phase_id += 1
        pid = self.phase_id
        args = self.args
        prof_base = None
        if args.profile and target == "lb":
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            prof_base = str(Path(args.profile) / f"client0-{work}-{label}-c{clients}-p{pid}")
        cmd = {
            "phase_id": pid, "workload": work, "target": target, "alias": alias, "seed": self.seed[target],
            "mix": list(args.mix), "duration": duration, "max_ops": args.max_ops if not soak else
            max(args.max_ops, int(duration * 20_000)),
            "warmup_s": args.warmup, "warmup_ops": 200, "go_timeout": 120 + clients,
            "pyinstrument": prof_base,
        }
        pool = self.pool
        pool.go.clear()
        for i in range(clients):
            pool.counters[i] = 0
            pool.cmd_qs[i].put(cmd)
        ready: set = set()
        warm_errors = 0
        deadline = time.monotonic() + args.warmup + 60 + clients
        self.progress(f"{counter} {work:9s} {label:16s} {clients:3d} clients  warming up")
        while len(ready) < clients:
            msg = pool.get(max(0.05, min(1.0, deadline - time.monotonic())))
            if msg is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"phase {work}/{label}: only {len(ready)}/{clients} clients ready")
                continue
            kind, index, mpid, payload = msg
            if mpid != pid:
                continue
            if kind == "ready":
                ready.add(index)
                warm_errors += payload
            elif kind == "result":  # crashed before it was ready
                ready.add(index)
                pool.stale.append(msg)
        lb = target == "lb"
        cpid = self.env.coordinator_pid
        before = self.env.status() if lb else None
        proc = _process(cpid) if lb else None
        cpu0 = _cpu(proc) if proc else None
        pg_cpu0 = self.env.pgpool.cpu_seconds() if target == "pgpool" and self.env.pgpool else None
        spy = self.start_py_spy(work, label, clients, pid, duration) if prof_base else None
        groups = self.cpu_groups(clients)
        cpu_groups0 = {name: _group_cpu(procs) for name, procs in groups.items()}
        machine0 = _machine_busy()
        start = time.monotonic() + 0.05
        pool.start_at.value = start
        pool.go.set()
        t_cpu0 = time.monotonic()
        results: dict[int, dict] = {m[1]: m[3] for m in pool.stale if m[2] == pid and m[0] == "result"}
        pool.stale = []
        end_sampled = None
        samples: list[dict] = []
        next_sample = start + (SOAK_SAMPLE_EVERY if soak else math.inf)
        last_ops, last_t = 0, start
        rss0 = _rss_mb(proc) if proc else None
        if soak:
            samples.append({"t_s": 0.0, "rss_mb": rss0, "ops_per_s": None})
        phase_deadline = start + duration + 90 + clients
        last_progress = 0.0 if self.tty else time.monotonic()  # logs: a line every 30 s of long phases
        while len(results) < clients:
            msg = pool.get(0.2)
            now = time.monotonic()
            if msg is not None:
                kind, index, mpid, payload = msg
                if mpid == pid and kind == "result":
                    results[index] = payload
            if end_sampled is None and (now >= start + duration or len(results) == clients):
                end_sampled = (now, _cpu(proc) if proc else None,
                               self.env.pgpool.cpu_seconds() if pg_cpu0 is not None else None,
                               {name: _group_cpu(procs) for name, procs in groups.items()}, _machine_busy())
            if now >= next_sample and proc is not None:
                ops_now = sum(pool.counters[i] for i in range(clients))
                samples.append({"t_s": round(now - start, 1), "rss_mb": _rss_mb(proc),
                                "ops_per_s": (ops_now - last_ops) / max(1e-9, now - last_t)})
                last_ops, last_t = ops_now, now
                next_sample += SOAK_SAMPLE_EVERY
            if now - last_progress >= (0.5 if self.tty else 30.0):
                last_progress = now
                ops_now = sum(pool.counters[i] for i in range(clients))
                el = max(0.0, now - start)
                self.progress(f"{counter} {work:9s} {label:16s} {clients:3d} clients  "
                              f"{min(el, duration):6.1f}/{duration:.0f} s  {ops_now:8d} ops  "
                              f"{ops_now / max(el, 1e-9):8.0f} ops/s", periodic=True)
            if now > phase_deadline:
                missing = [i for i in range(clients) if i not in results]
                log(f"phase {work}/{label}: no result from clients {missing} after {now - start:.0f}s")
                for i in missing:
                    results[i] = {"index": i, "ops": 0, "errors": {"NoResult": 1}, "messages": ["no result"],
                                  "samples": {}, "elapsed": 0.0}
        pool.go.clear()
        if spy is not None:
            self.finish_py_spy(spy)
        metrics = report.merge_worker_results(list(results.values()), duration)
        metrics["warmup_errors"] = warm_errors
        if end_sampled is not None:
            span = max(1e-9, end_sampled[0] - t_cpu0)
            # CPU of each group of processes over the phase, in % of ONE core (2 cores = 200%)
            metrics["cpu_pct"] = {name: round(100.0 * (end_sampled[3][name] - cpu_groups0[name]) / span, 1)
                                  for name in groups}
            busy1, total1 = end_sampled[4]
            busy0, total0 = machine0
            metrics["cpu_pct"]["machine_busy_of_all_cores"] = round(
                100.0 * (busy1 - busy0) / max(1e-9, total1 - total0), 1)
        if lb:
            after = self.env.status()
            metrics["read_distribution"] = {
                d["name"]: d["reads"] - b["reads"] for d, b in zip(after["databases"], before["databases"])}
            metrics["write_distribution"] = {
                d["name"]: d["writes"] - b["writes"] for d, b in zip(after["databases"], before["databases"])}
            t1, cpu1 = end_sampled[0], end_sampled[1]
            metrics["coord_cpu_s"] = cpu1 - cpu0
            metrics["coord_cpu_pct"] = 100.0 * (cpu1 - cpu0) / max(1e-9, t1 - t_cpu0)
            metrics["coord_rss_mb"] = _rss_mb(proc)
            metrics["coord_rss_start_mb"] = rss0
            metrics["coord_threads"] = _threads(proc)
            metrics["coord_restarts"] = after["coordinator"].get("restarts", 0)
            metrics["db_states"] = {d["name"]: d["state"] for d in after["databases"]}
            groups_after = after["coordinator"].get("write_groups") or {}
            groups_before = before["coordinator"].get("write_groups") or {}
            grouped = groups_after.get("writes", 0) - groups_before.get("writes", 0)
            if grouped:
                metrics["write_group_mean_size"] = round(
                    grouped / max(1, groups_after.get("groups", 0) - groups_before.get("groups", 0)), 2)
        if pg_cpu0 is not None and end_sampled and end_sampled[2] is not None:
            metrics["pgpool_cpu_pct"] = 100.0 * (end_sampled[2] - pg_cpu0) / max(1e-9, end_sampled[0] - t_cpu0)
        if soak:
            ops_now = sum(pool.counters[i] for i in range(clients))
            if time.monotonic() - last_t >= 1.0:
                samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": _rss_mb(proc),
                                "ops_per_s": (ops_now - last_ops) / max(1e-9, time.monotonic() - last_t)})
            else:
                samples[-1]["rss_mb"] = _rss_mb(proc)
            metrics["samples"] = samples
        variant = self.current
        row = {
            "workload": work, "target": target, "label": label, "clients": clients, "duration_s": duration,
            "read_algorithm": variant.read_algorithm if lb else None,
            "write_ack": variant.write_ack if lb else None, "metrics": metrics,
        }
        self.progress_done(f"{counter} {work:9s} {label:16s} {clients:3d} clients  "
                           f"{metrics['ops_per_s']:8.0f} ops/s  p50 {report.fmt(metrics['p50_ms'], 3)} ms  "
                           f"p99 {report.fmt(metrics['p99_ms'], 3)} ms  errors {metrics['errors']}")
        if metrics["errors"]:
            for m in metrics["error_messages"][:3]:
                log(f"    error: {m}")
        return row

    def cpu_groups(self, clients: int) -> dict[str, list]:
        """The processes whose CPU a phase reports: the clients, the coordinator, the databases, pgpool."""
        import psutil

        groups: dict[str, list] = {"clients": [], "coordinator": [], "postgres": [], "pgpool": []}
        for p in (self.pool.procs[:clients] if self.pool else []):
            proc = _process(p.pid)
            if proc:
                groups["clients"].append(proc)
        proc = _process(self.env.coordinator_pid)
        if proc:
            groups["coordinator"].append(proc)
        if self.env.cluster is not None:
            for srv in self.env.cluster:
                main = _process(srv.postmaster_pid())
                if main:
                    try:
                        groups["postgres"] += [main] + main.children(recursive=True)
                    except psutil.NoSuchProcess:
                        pass
        if self.env.pgpool is not None:
            groups["pgpool"] = [p for p in (_process(pid) for pid in self.env.pgpool.pids()) if p]
        return {k: v for k, v in groups.items() if v}

    # -- profiling (optional) -------------------------------------------------------------------
    def start_py_spy(self, work: str, label: str, clients: int, pid: int, duration: float) -> Optional[tuple]:
        import shutil as _sh

        exe = _sh.which("py-spy")
        if not exe or not self.env.coordinator_pid:
            log("py-spy not found (pip install py-spy): coordinator not profiled")
            return None
        out = Path(self.args.profile) / f"coordinator-{self.args.profile_mode}-{work}-{label}-c{clients}-p{pid}.txt"
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.env.coordinator_pid), "--duration", str(max(1, int(duration))),
             "--rate", "250", "--format", "raw", "--threads", "--nonblocking", "-o", str(out)]
            + (["--gil"] if self.args.profile_mode == "cpu" else ["--idle"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return (proc, out)

    def finish_py_spy(self, spy: tuple) -> None:
        proc, out = spy
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    # -- output ---------------------------------------------------------------------------------
    def progress(self, text: str, periodic: bool = False) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K[stress] " + text)
            sys.stderr.flush()
        else:
            log(text)

    def progress_done(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        log(text)

    # -- the plan -------------------------------------------------------------------------------
    def run_all(self) -> None:
        args = self.args
        workloads = args.workloads
        total = 0
        plan: list[tuple] = []
        for run in range(args.runs):
            for vi, variant in enumerate(self.variants):
                for work in workloads:
                    if not self._variant_matters(variant, vi, work):
                        continue
                    for target, label, alias in self.targets(variant, with_baselines=(vi == 0)):
                        plan.append((run, variant, work, target, label, alias))
        total = len(plan)
        by_run_work: dict[tuple, list] = {}
        for n, (run, variant, work, target, label, alias) in enumerate(plan, 1):
            if target == "lb":
                self.start_coordinator(variant)
            row = self.run_phase(work, target, label, alias, args.clients, args.duration,
                                 counter=f"[{n}/{total}] run {run + 1}/{args.runs}")
            row["run"] = run + 1
            self.phases.append(row)
            by_run_work.setdefault((run, work), []).append(row)
            nxt = plan[n] if n < len(plan) else None
            if nxt is None or (nxt[0], nxt[2]) != (run, work):
                rows = by_run_work[(run, work)]
                print(f"\n== {work} — run {run + 1}/{args.runs}, {args.clients} client process(es), "
                      f"{args.duration:g} s, {args.db} x{args.dbs}")
                print(report.phase_table(rows), flush=True)
        if args.scale:
            self.run_scale()
        if args.soak:
            self.run_soak()

    def _variant_matters(self, variant: Variant, index: int, work: str) -> bool:
        """Read phases once per read algorithm, write phases once per WRITE_ACK; mixed for all."""
        earlier = self.variants[:index]
        if work in workload.READ_KINDS:
            return all(v.read_algorithm != variant.read_algorithm for v in earlier)
        if work in workload.WRITE_KINDS:
            return all(v.write_ack != variant.write_ack for v in earlier)
        return True

    def run_scale(self) -> None:
        args = self.args
        variant = self.variants[0]
        self.start_coordinator(variant)
        targets = self.targets(variant, with_baselines=True)
        total = len(args.scale_points) * len(targets) * args.runs
        n = 0
        runs: dict[tuple, list] = {}
        for run in range(args.runs):
            for clients in args.scale_points:
                for target, label, alias in targets:
                    n += 1
                    row = self.run_phase("mixed", target, label, alias, clients, args.duration,
                                         counter=f"[scale {n}/{total}]")
                    row["run"] = run + 1
                    runs.setdefault((clients, label, target), []).append(row)
        for (clients, label, target), rows in runs.items():
            self.scale.append({"clients": clients, "label": label, "target": target,
                               "metrics": report.median_of([r["metrics"] for r in rows]),
                               "runs": [r["metrics"] for r in rows]})
        print(f"\n== scale — mixed {args.mix[0]:g}/{args.mix[1]:g}, {args.duration:g} s per point, "
              f"median of {args.runs} run(s), {args.db} x{args.dbs}")
        print(report.scale_table(self.scale), flush=True)

    def run_soak(self) -> None:
        args = self.args
        variant = self.variants[0]
        self.start_coordinator(variant)
        seconds = args.soak * 60.0
        row = self.run_phase("mixed", "lb", variant.label, None, args.clients, seconds,
                             counter="[soak]", soak=True)
        m = row["metrics"]
        samples = m.pop("samples", [])
        # RSS at start: after the clients' warm-up, when the load begins; at end: when it stops.
        rss_start = samples[0]["rss_mb"] if samples else m.get("coord_rss_start_mb")
        rss_end = samples[-1]["rss_mb"] if samples else m.get("coord_rss_mb")
        settled = [s["rss_mb"] for s in samples if s["t_s"] >= min(60.0, seconds / 4)]
        self.soak = {
            "minutes": args.soak, "clients": args.clients, "label": variant.label, "metrics": m,
            "rss_start_mb": rss_start, "rss_end_mb": rss_end,
            "rss_growth_mb": (rss_end - rss_start) if rss_start is not None and rss_end is not None else None,
            "rss_growth_after_warm_mb": (settled[-1] - settled[0]) if len(settled) >= 2 else None,
            "rss_max_mb": max([s["rss_mb"] for s in samples] or [0]),
            "samples": samples,
        }
        print(f"\n== soak — {args.soak:g} min mixed {args.mix[0]:g}/{args.mix[1]:g}, {args.clients} clients")
        print(report.text_table(
            ["target", "ops", "ops/s", "p50 ms", "p99 ms", "errors", "RSS start MB", "RSS end MB", "growth MB",
             "growth after 1st quarter/60 s MB"],
            [[variant.label, str(m["ops"]), report.fmt(m["ops_per_s"], 0), report.fmt(m["p50_ms"], 3),
              report.fmt(m["p99_ms"], 3), str(m["errors"]), report.fmt(rss_start, 1), report.fmt(rss_end, 1),
              report.fmt(self.soak["rss_growth_mb"], 1), report.fmt(self.soak["rss_growth_after_warm_mb"], 1)]]),
            flush=True)

    # -- after the load -------------------------------------------------------------------------
    def consistency(self) -> dict:
        """Every copy identical after the load? (Item through the coordinator; PoolItem through pgpool.)"""
        from django.db import connections

        out: dict[str, Any] = {}
        try:
            self.env.wait_drained()
        except Exception as exc:
            out["lb_drain_error"] = str(exc)

        def table_rows(alias: str, table: str) -> list:
            with connections[alias].cursor() as cursor:
                cursor.execute(f'SELECT id, name, value, "group", created FROM {table} ORDER BY id')
                return [tuple(r) for r in cursor.fetchall()]

        def compare(table: str) -> dict:
            data = {alias: table_rows(alias, table) for alias in self.env.aliases}
            first = data[self.env.aliases[0]]
            base = {r[0]: r for r in first}
            differing = {}
            for alias in self.env.aliases[1:]:
                other = {r[0]: r for r in data[alias]}
                keys = set(base) | set(other)
                differing[alias] = sum(1 for k in keys if base.get(k) != other.get(k))
            return {"rows": {a: len(v) for a, v in data.items()}, "rows_differing_from_first": differing,
                    "identical": not any(differing.values())}

        out["lb_item"] = compare("stressapp_item")
        if self.use_pgpool:
            out["pgpool_poolitem"] = compare("stressapp_poolitem")
        connections.close_all()
        return out

    def summary(self) -> list[dict]:
        groups: dict[tuple, list] = {}
        for row in self.phases:
            groups.setdefault((row["workload"], row["label"], row["target"]), []).append(row)
        out = []
        for (work, label, target), rows in groups.items():
            out.append({"workload": work, "label": label, "target": target, "clients": rows[0]["clients"],
                        "read_algorithm": rows[0]["read_algorithm"], "write_ack": rows[0]["write_ack"],
                        "metrics": report.median_of([r["metrics"] for r in rows])})
        return out

    def targets_report(self, summary: list[dict]) -> dict:
        """The issue's key numbers, computed from the medians (whether a target is met is stated, not assumed)."""
        def find(work: str, target: str, label: Optional[str] = None) -> Optional[dict]:
            for r in summary:
                if r["workload"] == work and r["target"] == target and (label is None or r["label"] == label):
                    return r["metrics"]
            return None

        out: dict[str, Any] = {}
        direct = find("read_pk", "direct")
        for v in self.variants:
            lb = find("read_pk", "lb", v.label)
            if lb and direct:
                r = report.ratio(lb.get("p50_ms"), direct.get("p50_ms"))
                out[f"point_read_p50_ratio[{v.label}]"] = {
                    "lb_p50_ms": lb.get("p50_ms"), "direct_p50_ms": direct.get("p50_ms"), "ratio": r,
                    "target": "<= 1.10 (1 client; issue 15)", "clients": self.args.clients,
                    "met": (r is not None and r <= 1.10) if self.args.clients == 1 else None}
        for work in workload.WORKLOADS:
            d = find(work, "direct")
            p = find(work, "pgpool")
            for v in self.variants:
                lb = find(work, "lb", v.label)
                if not lb:
                    continue
                entry = {"lb_ops_per_s": lb.get("ops_per_s")}
                if d:
                    entry["direct_ops_per_s"] = d.get("ops_per_s")
                    entry["lb_over_direct"] = report.ratio(lb.get("ops_per_s"), d.get("ops_per_s"))
                if p:
                    entry["pgpool_ops_per_s"] = p.get("ops_per_s")
                    entry["lb_over_pgpool"] = report.ratio(lb.get("ops_per_s"), p.get("ops_per_s"))
                out[f"throughput[{work},{v.label}]"] = entry
        if self.args.cap_db_cpu:
            d = find("read_pk", "direct")
            for v in self.variants:
                lb = find("read_pk", "lb", v.label)
                if lb and d:
                    r = report.ratio(lb.get("ops_per_s"), d.get("ops_per_s"))
                    out[f"scale_out[read_pk,{v.label}]"] = {
                        "db_cpu_cap_pct": self.args.cap_db_cpu, "copies": self.args.dbs,
                        "lb_ops_per_s": lb.get("ops_per_s"), "direct_one_copy_ops_per_s": d.get("ops_per_s"),
                        "ratio": r, "target": ">= 2.7 (3 capped copies vs one; issue 15)",
                        "met": (r is not None and r >= 2.7) if self.args.dbs == 3 and self.args.clients >= 8 else None}
        if self.scale:
            top = max(p["clients"] for p in self.scale)
            for p in self.scale:
                if p["clients"] == top:
                    out[f"scale_{top}_clients[{p['label']}]"] = {
                        "errors": p["metrics"].get("errors"), "p99_ms": p["metrics"].get("p99_ms"),
                        "ops_per_s": p["metrics"].get("ops_per_s")}
        if self.soak:
            out["soak_rss_growth_mb"] = self.soak["rss_growth_mb"]
        return out

    def meta(self) -> dict:
        import django

        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "django_lb_shm"],
                                   capture_output=True, text=True, timeout=10).stdout.split("\n")
            dirty = [line[3:] for line in dirty if line.strip()]
        except Exception:
            commit, dirty = "", []
        from django_lb_shm import __version__

        m = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "elapsed_s": round(time.time() - self.started, 1),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "django": django.get_version(), "django_lb_shm": __version__, "git_commit": commit, "package_uncommitted_changes": dirty,
            "db": self.args.db, "dbs": self.args.dbs, "clients": self.args.clients,
            "duration_s": self.args.duration, "runs": self.args.runs, "mix": list(self.args.mix),
            "rows": self.args.rows, "journal_fsync": self.args.journal_fsync,
            "db_cpu_cap_pct": self.args.cap_db_cpu,
            "read_algorithms": self.args.read_algorithm, "write_acks": self.args.write_ack,
            "argv": sys.argv[1:],
        }
        if self.env.cluster is not None:
            try:
                m["postgresql"] = self.env.cluster[0].psql("SHOW server_version")
            except Exception:
                pass
        if self.use_pgpool and self.env.pgpool is not None:
            m["pgpool"] = self.env.pgpool.version
        return m


def _process(pid: Optional[int]):
    import psutil

    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        proc.cpu_times()
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _cpu(proc: Any) -> Optional[float]:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:
        return None


def _group_cpu(procs: list) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:
            pass
    return total


def _machine_busy() -> tuple[float, float]:
    import psutil

    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _rss_mb(proc: Any) -> Optional[float]:
    try:
        return round(proc.memory_info().rss / 2**20, 1)
    except Exception:
        return None


def _threads(proc: Any) -> Optional[int]:
    try:
        return proc.num_threads()
    except Exception:
        return None


# -- smoke check ---------------------------------------------------------------------------------
PROMISED_TOP = ("meta", "config", "phases", "summary", "targets", "consistency", "scale", "soak", "pgpool")
PROMISED_METRICS = ("ops", "ops_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "error_types")
PROMISED_LB = ("read_distribution", "coord_cpu_pct", "coord_rss_mb")


def check_promised_fields(data: dict, require_lb_clean: bool = True) -> list[str]:
    problems = [f"missing top-level key {k!r}" for k in PROMISED_TOP if k not in data]
    summary = data.get("summary") or []
    if not summary:
        problems.append("no summary rows")
    seen = set()
    for row in summary:
        seen.add((row.get("workload"), row.get("target")))
        m = row.get("metrics", {})
        for k in PROMISED_METRICS:
            if k not in m:
                problems.append(f"{row.get('workload')}/{row.get('label')}: metrics lack {k!r}")
        if row.get("target") == "lb":
            for k in PROMISED_LB:
                if k not in m:
                    problems.append(f"{row.get('workload')}/{row.get('label')}: metrics lack {k!r}")
            if require_lb_clean and m.get("errors"):
                problems.append(f"{row.get('workload')}/{row.get('label')}: {m['errors']} errors {m.get('error_types')}")
            if not m.get("ops"):
                problems.append(f"{row.get('workload')}/{row.get('label')}: no operations")
    for work in workload.WORKLOADS:
        for target in ("lb", "direct"):
            if (work, target) not in seen:
                problems.append(f"no {target} row for {work}")
    cons = data.get("consistency", {}).get("lb_item", {})
    if cons.get("identical") is not True:
        problems.append(f"load-balanced copies differ after the run: {cons}")
    return problems


# -- main ----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lb_stress_"))
    os.chmod(tmp, 0o755)  # the postgres user must traverse it (PgCluster, pgpool)
    driver = Driver(args, tmp)

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    data: dict = {}
    try:
        driver.setup()
        driver.run_all()
        if args.breakdown:
            log("breakdown: timing a point read's parts in this process (1 client, sequential)")
            driver.breakdown = breakdown.run(driver.seed, driver.env.aliases[0], copies=driver.env.aliases)
            print(f"\n== point-read breakdown ({args.db}, 1 client, sequential)")
            print(breakdown.table(driver.breakdown), flush=True)
        consistency = driver.consistency()
        summary = driver.summary()
        if args.runs > 1 and summary:
            print(f"\n== summary — median of {args.runs} runs")
            for work in args.workloads:
                rows = [r for r in summary if r["workload"] == work]
                if rows:
                    print(f"-- {work}")
                    print(report.phase_table(rows))
        data = {
            "meta": driver.meta(),
            "config": {"LOAD_BALANCER": driver.env.settings.get("LOAD_BALANCER"),
                       "workloads": args.workloads, "list_size": workload.LIST_SIZE,
                       "direct_alias": driver.env.aliases[0]},
            "phases": driver.phases,
            "summary": summary,
            "targets": driver.targets_report(summary),
            "scale": driver.scale,
            "soak": driver.soak,
            "pgpool": ({"version": driver.env.pgpool.version, "port": driver.env.pgpool.port,
                        "statement_level_load_balance": args.pgpool_statement_lb}
                       if driver.use_pgpool and driver.env.pgpool else {"skipped": driver.pgpool_note}
                       if driver.pgpool_note else None),
            "consistency": consistency,
            "breakdown": driver.breakdown,
        }
        print("\n== consistency after the load")
        for name, c in consistency.items():
            print(f"  {name}: {c}")
        print("\n== key numbers (medians)")
        for name, value in data["targets"].items():
            print(f"  {name}: {json.dumps(value, default=_json_default)}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(clean_nan(data), indent=1, default=_json_default))
            log(f"results written to {args.json}")
        if args.chart:
            message = report.chart(args.chart, data)
            log(message or f"chart written to {args.chart}")
        if args.smoke:
            problems = check_promised_fields(json.loads(json.dumps(clean_nan(data), default=_json_default)))
            if problems:
                for p in problems:
                    log(f"SMOKE FAILED: {p}")
                code = 1
            else:
                log(f"smoke OK ({data['meta']['elapsed_s']} s): every promised field present, no load-balanced errors")
    except (KeyboardInterrupt, Terminated):
        if driver.tty:
            sys.stderr.write("\n")
        log("interrupted: stopping everything this run started")
        code = 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(exc).__name__}: {exc}")
        if driver.env.coordinator is not None or driver.env.coordinator_pid:
            log("coordinator log tail:\n" + driver.env.coordinator_log(2000))
        code = 1
    finally:
        # a second Ctrl-C or SIGTERM must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if driver.pool is not None:
                driver.pool.close()
        finally:
            try:
                driver.release_caps()
            finally:
                driver.env.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code


def clean_nan(o: Any) -> Any:
    """NaN is not JSON: None instead (e.g. a percentile of a phase with no samples)."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: clean_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_nan(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
