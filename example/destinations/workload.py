"""The demo workload: one app process's creates, updates, deletes and reads of Destination.

Runs in processes started with the ``spawn`` method, so each one is a fresh
Python that calls ``django.setup()`` itself and opens its own connection to
the coordinator, like a gunicorn or celery worker would.  Every write is
followed by a read that must see it (reads go round robin over all copies),
and every anomaly is counted and reported.
"""
import os
import random
import time


def run_worker(number, ops, seed, tag, results):
    """Entry point of one spawned app process; puts a summary dict on ``results``."""
    import django

    django.setup()
    started = time.monotonic()
    summary = {'worker': number, 'pid': os.getpid(), 'error': None}
    try:
        summary.update(Workload(number, seed, tag).run(ops))
    except Exception as exc:  # reported by the parent, which fails the demo
        summary['error'] = f'{type(exc).__name__}: {exc}'
    summary['seconds'] = time.monotonic() - started
    results.put(summary)


class Workload:
    """A bounded random mix of ORM operations on this worker's own rows."""

    def __init__(self, number, seed, tag):
        from destinations.models import Destination

        self.model = Destination
        self.number = number
        self.prefix = f'{tag}-w{number}-'   # this run's rows of this worker
        self.random = random.Random(seed * 1000 + number)
        self.mine = []                    # primary keys of this worker's live rows
        self.counts = {'create': 0, 'update': 0, 'delete': 0, 'read': 0, 'anomalies': 0}

    def run(self, ops):
        self.expect(self.count_mine() == 0, f'rows named {self.prefix}* before the start')
        half = max(ops // 2, 1)
        for i in range(ops):
            self.step(i)
            if i + 1 == half and i + 1 < ops:
                self.progress(i + 1, ops)
        self.transaction(ops)
        self.expect(self.count_mine() == len(self.mine), 'final count of own rows')
        self.progress(ops, ops)
        return {**self.counts, 'live_rows': len(self.mine)}

    def progress(self, done, ops):
        c = self.counts
        print(f'  worker {self.number} (pid {os.getpid()}): {done}/{ops} ops  '
              f"creates {c['create']}  updates {c['update']}  deletes {c['delete']}  "
              f"reads {c['read']}  live rows {len(self.mine)}", flush=True)

    def expect(self, ok, what):
        if not ok:
            self.counts['anomalies'] += 1
            print(f'  worker {self.number}: ANOMALY: {what}', flush=True)

    # -- one operation -------------------------------------------------------------
    def step(self, i):
        r = self.random.random()
        if not self.mine or r < 0.40:
            self.create(i)
        elif r < 0.60:
            self.update(i)
        elif r < 0.72:
            self.delete()
        else:
            self.read()

    def create(self, i):
        obj = self.model(name=f'{self.prefix}{i}', desc=f'created by worker {self.number}')
        obj.save()
        self.counts['create'] += 1
        self.mine.append(obj.pk)
        self.expect(self.fetch(obj.pk).name == obj.name, f'read-your-write after create of #{obj.pk}')

    def update(self, i):
        pk = self.random.choice(self.mine)
        desc = f'updated at op {i}'
        if i % 2:
            obj = self.fetch(pk)          # instance save(): an UPDATE by primary key
            obj.desc = desc
            obj.save()
        else:                             # queryset update()
            self.model.objects.filter(pk=pk).update(desc=desc)
        self.counts['update'] += 1
        self.expect(self.fetch(pk).desc == desc, f'read-your-write after update of #{pk}')

    def delete(self):
        pk = self.mine.pop(self.random.randrange(len(self.mine)))
        self.fetch(pk).delete()
        self.counts['delete'] += 1
        self.expect(not self.model.objects.filter(pk=pk).exists(), f'row #{pk} still there after delete')
        self.counts['read'] += 1

    def read(self):
        pk = self.random.choice(self.mine)
        self.expect(self.fetch(pk).name.startswith(self.prefix), f'row #{pk} has a foreign name')
        self.expect(self.count_mine() == len(self.mine), 'count of own rows')

    def transaction(self, ops):
        """Two creates and an update in one load-balanced transaction (atomic on the LB alias)."""
        from django.db import router, transaction

        with transaction.atomic(using=router.db_for_write(self.model)):
            a = self.model.objects.create(name=f'{self.prefix}txn-a', desc='in a transaction')
            b = self.model.objects.create(name=f'{self.prefix}txn-b', desc='in a transaction')
            self.model.objects.filter(pk=a.pk).update(desc='updated in a transaction')
        self.counts['create'] += 2
        self.counts['update'] += 1
        self.mine += [a.pk, b.pk]
        self.expect(self.fetch(a.pk).desc == 'updated in a transaction', 'read after commit')

    # -- reads ---------------------------------------------------------------------
    def fetch(self, pk):
        self.counts['read'] += 1
        return self.model.objects.get(pk=pk)

    def count_mine(self):
        self.counts['read'] += 1
        return self.model.objects.filter(name__startswith=self.prefix).count()
