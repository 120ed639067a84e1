"""``python manage.py demo_workload --processes 4 --ops 50``: a short workload from several app processes."""
import multiprocessing
import os
import queue
import time

from django.core.management.base import BaseCommand, CommandError

from django_lb_shm.errors import LoadBalancerError

from destinations.models import Destination
from destinations.workload import run_worker


class Command(BaseCommand):
    help = 'Run creates, updates, deletes and reads of Destination from several spawned app processes.'

    def add_arguments(self, parser):
        parser.add_argument('--processes', type=int, default=4, help='app processes (default 4)')
        parser.add_argument('--ops', type=int, default=50, help='operations per process (default 50)')
        parser.add_argument('--seed', type=int, default=1, help='random seed (default 1)')
        parser.add_argument('--timeout', type=float, default=60.0, help='give up after this many seconds')

    def handle(self, *args, **options):
        n, ops, timeout = options['processes'], options['ops'], options['timeout']
        if n < 1 or ops < 1:
            raise CommandError('--processes and --ops must be at least 1')
        try:
            rows_before = Destination.objects.count()
        except LoadBalancerError as exc:      # e.g. CoordinatorUnavailable: not started
            raise CommandError(str(exc)) from None
        self.stdout.write(f'starting {n} app processes x {ops} operations (spawn; {rows_before} rows before)')
        started = time.monotonic()
        summaries = self.run_processes(n, ops, options['seed'], timeout)
        elapsed = time.monotonic() - started
        self.report(summaries, rows_before, elapsed)

    def run_processes(self, n, ops, seed, timeout):
        ctx = multiprocessing.get_context('spawn')
        tag = f'run{os.getpid()}'
        results = ctx.Queue()
        procs = [ctx.Process(target=run_worker, args=(i, ops, seed, tag, results), name=f'worker-{i}')
                 for i in range(1, n + 1)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        summaries = []
        try:
            while len(summaries) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandError(f'workload did not finish within {timeout:.0f} s')
                try:
                    summaries.append(results.get(timeout=min(remaining, 1.0)))
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise CommandError(f'{dead[0].name} died with exit code {dead[0].exitcode}')
        finally:
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        return sorted(summaries, key=lambda s: s['worker'])

    def report(self, summaries, rows_before, elapsed):
        totals = {k: sum(s.get(k, 0) for s in summaries)
                  for k in ('create', 'update', 'delete', 'read', 'anomalies', 'live_rows')}
        ops = totals['create'] + totals['update'] + totals['delete'] + totals['read']
        self.stdout.write(
            f"done in {elapsed:.1f} s: {totals['create']} creates, {totals['update']} updates, "
            f"{totals['delete']} deletes, {totals['read']} reads ({ops / elapsed:.0f} ORM queries/s "
            f'over {len(summaries)} processes, process start-up included)'
        )
        problems = [f"worker {s['worker']}: {s['error']}" for s in summaries if s['error']]
        if totals['anomalies']:
            problems.append(f"{totals['anomalies']} read(s) did not see the process's own earlier write")
        rows_after = Destination.objects.count()
        expected = rows_before + totals['create'] - totals['delete']
        if rows_after != expected or totals['live_rows'] != rows_after - rows_before:
            problems.append(f'{rows_after} rows after the workload, expected {expected}')
        else:
            self.stdout.write(f'rows: {rows_before} before, {rows_after} after (= creates - deletes)')
        if problems:
            raise CommandError('workload failed:\n  ' + '\n  '.join(problems))
