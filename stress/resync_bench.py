"""Resync figures (issue 18): the copy rate on a large table, and the longest pause a writer sees.

    python stress/resync_bench.py --db sqlite --rows 1000000
    python stress/resync_bench.py --db postgres --rows 1000000
    python stress/resync_bench.py --db sqlite --wal             # the copies' files in WAL mode

Three copies (SQLite files or throw-away PostgreSQL servers, as the stress suite makes them),
``stressapp_item`` filled with ``--rows`` identical rows on every copy directly, a coordinator
started on them, one app process writing (``Item.objects.create``) back to back the whole
time, and after ``--baseline`` seconds ``djangoloadbalancer resync db2`` (default source: a
copy other than the leader).  Printed: the resync's own summary, its copy rate, and the
writer's latency before and during the resync (max, p99, p50).  Everything started is stopped
by pid at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STRESS_DIR = Path(__file__).resolve().parent
REPO = STRESS_DIR.parent
sys.path[:0] = [p for p in (str(REPO), str(STRESS_DIR)) if p not in sys.path]

from harness import LAUNCHER, Environment, child_env, log  # noqa: E402

TABLE = "stressapp_item"


def writer(config_path: str, stop, results) -> None:
    """Back-to-back autocommit writes until ``stop``; (wall start, seconds) of each."""
    os.environ["LB_STRESS_CONFIG"] = config_path
    os.environ["DJANGO_SETTINGS_MODULE"] = "stressproject.settings"
    import django

    django.setup()
    from stressapp.models import Item

    samples, errors = [], []
    deadline = time.monotonic() + 900
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        started, t0 = time.time(), time.perf_counter()
        try:
            Item.objects.create(name=f"w-{n}", value=n, group=n % 100)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if len(errors) > 20:
                break
        samples.append((started, time.perf_counter() - t0))
        n += 1
    results.put({"samples": samples, "errors": errors})


def fill(databases: dict, rows: int, wal: bool) -> None:
    """The same ``rows`` rows on every copy, written directly (the coordinator is not running yet)."""
    from django.db import connections

    for alias in databases:
        connection = connections[alias]
        t0 = time.monotonic()
        with connection.cursor() as cursor:
            if connection.vendor == "sqlite":
                if wal:
                    cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(
                    f'INSERT INTO {TABLE} (id, name, value, "group", created) '
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < %s) "
                    "SELECT x, 'item-' || x, x %% 1000, x %% 100, '2026-12-06 00:00:00' FROM c", [rows])
            else:
                cursor.execute(
                    f'INSERT INTO {TABLE} (id, name, value, "group", created) '
                    "SELECT g, 'item-' || g, g %% 1000, g %% 100, '2026-12-06 00:00:00+00' "
                    "FROM generate_series(1, %s) g", [rows])
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), %s)", [rows])
                cursor.execute(f"ANALYZE {TABLE}")
        connection.close()
        log(f"{alias}: {rows:,} rows in {time.monotonic() - t0:.1f} s")


class StateWatch(threading.Thread):
    """When the copy leaves RUNNING (RESYNCING) and when it is RUNNING again (wall clock)."""

    def __init__(self, env: Environment, alias: str):
        super().__init__(daemon=True)
        self.env, self.alias = env, alias
        self.stop = threading.Event()
        self.left = self.back = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                state = next(d["state"] for d in self.env.status()["databases"] if d["name"] == self.alias)
            except Exception:
                continue
            if state != "RUNNING" and not self.left:
                self.left = time.time()
            elif state == "RUNNING" and self.left and not self.back:
                self.back = time.time()


def latency_stats(samples: list, start: float, end: float) -> dict:
    """Writes that overlap [start, end]: their count, max (and when it began, from ``start``), p99 and
    p50 in milliseconds."""
    overlapping = [(lat, began) for began, lat in samples if began <= end and began + lat >= start]
    if not overlapping:
        return {"writes": 0}
    worst, worst_began = max(overlapping)
    inside = sorted(lat for lat, _began in overlapping)
    return {"writes": len(inside), "max_ms": round(worst * 1000, 1), "max_at_s": round(worst_began - start, 2),
            "p99_ms": round(inside[min(len(inside) - 1, int(len(inside) * 0.99))] * 1000, 1),
            "p50_ms": round(statistics.median(inside) * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wal", action="store_true", help="SQLite: the copies' files in WAL mode")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of writes before the resync")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of writes after it")
    parser.add_argument("--resync-args", default="", help="more arguments for `resync`, e.g. '--from db1'")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (databases, logs)")
    args = parser.parse_args()

    from tests.support.pg_cluster import free_port

    tmp = Path(tempfile.mkdtemp(prefix="lb_resync_bench_"))
    os.chmod(tmp, 0o755)  # the postgres user must traverse it (PgCluster)
    env = Environment(tmp, args.db, 3, keep=args.keep)
    try:
        databases = env.make_databases()
        config_path = env.write_settings(databases, free_port(), "ROUND_ROBIN", "FIRST", journal_fsync=True)
        os.environ.update(child_env(config_path))
        import django
        from django.core.management import call_command

        django.setup()
        for alias in env.aliases:
            call_command("migrate", database=alias, verbosity=0, interactive=False)
        fill(databases, args.rows, args.wal)
        env.start_coordinator()

        ctx = multiprocessing.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=writer, args=(str(config_path), stop, results))
        proc.start()
        time.sleep(args.baseline)
        log(f"resync {env.aliases[2]} ({args.rows:,} rows)...")
        watch = StateWatch(env, env.aliases[2])
        watch.start()
        began = time.time()
        done = subprocess.run([sys.executable, str(LAUNCHER), "resync", env.aliases[2], *args.resync_args.split()],
                              cwd=str(STRESS_DIR), env=child_env(config_path), capture_output=True, text=True,
                              timeout=3600)
        ended = time.time()
        watch.stop.set()
        time.sleep(args.after)
        stop.set()
        outcome = results.get(timeout=120)
        proc.join(30)

        print(done.stdout + done.stderr)
        copied = re.search(r"copied ([\d,]+) rows in ([\d.]+) s \(([\d,]+) rows/s\)", done.stdout)
        samples = outcome["samples"]
        figures = {
            "db": args.db, "wal": args.wal, "rows": args.rows, "exit": done.returncode,
            "resync_seconds": round(ended - began, 2),
            "copy_rows_per_s": int(copied.group(3).replace(",", "")) if copied else None,
            "copy_seconds": float(copied.group(2)) if copied else None,
            "writer_before": latency_stats(samples, began - args.baseline + 1.0, began),
            "writer_during": latency_stats(samples, began, ended),
            # from RESYNCING to RUNNING again (the resync's own steps), then the verify that follows
            "writer_out_of_reads": latency_stats(samples, watch.left, watch.back) if watch.back else None,
            "writer_verify": latency_stats(samples, watch.back, ended) if watch.back else None,
            "out_of_reads_seconds": round(watch.back - watch.left, 2) if watch.back else None,
            "writer_errors": outcome["errors"][:5],
        }
        print(json.dumps(figures, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return 0 if done.returncode == 0 and not outcome["errors"] else 1
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
