"""Does the coordinator's memory follow what is pending?  (issue "The journal decides", point 6)

Starts its own SQLite x3 (default) coordinator, warms it with small writes, then makes
``--writes`` writes of ``--mb`` MB each through it, blanks those rows on every copy, waits
until every copy applied everything and the journal was trimmed, and prints the
coordinator's RSS (psutil) at each step.

    python stress/journal_memory.py                     # 50 writes of 4 MB
    python stress/journal_memory.py --writes 20 --mb 2 --json /tmp/mem.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import harness  # noqa: E402
from tests.support.pg_cluster import free_port  # noqa: E402

TRIM_WAIT = 7.0   # the coordinator trims every 5 s


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2 ** 20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    env = harness.Environment(Path(tempfile.mkdtemp(prefix="lb_mem_")), "sqlite", 3, keep=args.keep)
    samples: dict[str, float] = {}
    try:
        env.write_settings(env.make_databases(), free_port(), "ROUND_ROBIN", "FIRST", journal_fsync=True)
        os.environ.update({k: v for k, v in harness.child_env(env.config_path).items()
                           if k in ("LB_STRESS_CONFIG", "DJANGO_SETTINGS_MODULE")})
        import django
        from django.core.management import call_command

        django.setup()
        for alias in env.aliases:
            call_command("migrate", database=alias, verbosity=0, interactive=False)
        env.start_coordinator()
        from stressapp.models import Item

        pid = env.coordinator_pid
        for i in range(200):
            Item.objects.create(name=f"warm-{i}", group=0)
        env.wait_drained()
        time.sleep(TRIM_WAIT)
        samples["warm"] = rss_mb(pid)
        payload = "x" * int(args.mb * 2 ** 20)
        started = time.monotonic()
        big = [Item.objects.create(name=payload, group=1).pk for _ in range(args.writes)]
        env.wait_drained(timeout=300)
        samples["after_big_writes"] = rss_mb(pid)
        Item.objects.filter(pk__in=big).update(name="")
        env.wait_drained()
        time.sleep(TRIM_WAIT)
        samples["blanked_and_trimmed"] = rss_mb(pid)
        status = env.status()
        result = {
            "writes": args.writes, "mb_each": args.mb, "seconds": round(time.monotonic() - started, 1),
            "rss_mb": samples, "growth_mb": round(samples["blanked_and_trimmed"] - samples["warm"], 1),
            "journal_entries": status["coordinator"]["journal_entries"],
            "journal_bytes": status["coordinator"]["journal_bytes"],
        }
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
