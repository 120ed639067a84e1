"""``python manage.py demo_compare``: wait until every copy has applied every write, then compare them.

Independent of the coordinator's own bookkeeping: the rows are read with
direct connections (``connections[alias]``) to each database in
LOAD_BALANCER['DATABASES'] and printed as a row count and a hash per database.
"""
import hashlib
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from destinations.models import Destination


class Command(BaseCommand):
    help = 'Compare the Destination rows of every load-balanced database (direct connections).'

    def add_arguments(self, parser):
        parser.add_argument('--wait', type=float, default=20.0,
                            help='seconds to wait for every database to apply every write (0: do not ask)')

    def handle(self, *args, **options):
        aliases = settings.LOAD_BALANCER['DATABASES']
        if options['wait'] > 0:
            self.check_counters(self.wait_in_sync(options['wait']))
            self.check_reads_spread(len(aliases))
        table = connections['default'].ops.quote_name(Destination._meta.db_table)
        digests = {}
        for alias in aliases:
            rows, digest, applied = self.fingerprint(alias, table)
            digests[alias] = digest
            self.stdout.write(f'  {alias:<8} {len(rows):>5} rows  sha256 {digest[:16]}  last write applied #{applied}')
        if len(set(digests.values())) != 1:
            raise CommandError('the databases differ: ' + ', '.join(f'{a}={d[:16]}' for a, d in digests.items()))
        self.stdout.write(f'all {len(aliases)} databases hold identical {Destination._meta.db_table} rows')

    @staticmethod
    def fingerprint(alias, table):
        with connections[alias].cursor() as cursor:
            cursor.execute(f'SELECT * FROM {table} ORDER BY id')
            rows = cursor.fetchall()
            cursor.execute('SELECT seq FROM django_lb_shm_applied WHERE id = 1')
            applied = cursor.fetchone()[0]
        connections[alias].close()
        return rows, hashlib.sha256(repr(rows).encode()).hexdigest(), applied

    def check_counters(self, status):
        """Every database applied the same number of writes.  (The workload's reads need not be
        spread: a read right after a write goes to a copy that has applied it, often the leader.)"""
        dbs = status['databases']
        self.stdout.write('coordinator counters: ' + ', '.join(
            f"{db['name']} {db['reads']} reads/{db['writes']} writes" for db in dbs))
        if len({db['writes'] for db in dbs}) != 1:
            raise CommandError('the databases applied different numbers of writes')

    def check_reads_spread(self, copies):
        """With every copy in step, reads through the load balancer reach every copy."""
        from django_lb_shm.client.connection import get_client

        def reads():
            return {db['name']: db['reads'] for db in get_client().call('status', timeout=5.0)['databases']}

        before = reads()
        for _ in range(4 * copies):
            Destination.objects.count()
        spread = {name: count - before.get(name, 0) for name, count in reads().items()}
        self.stdout.write(f'{4 * copies} reads with every copy in step: '
                          + ', '.join(f'{name} {count}' for name, count in spread.items()))
        idle = [name for name, count in spread.items() if not count]
        if idle:
            raise CommandError(f'no reads went to: {", ".join(idle)}')

    def wait_in_sync(self, timeout):
        """Poll the coordinator until no database has writes pending (WRITE_ACK FIRST answers early)."""
        from django_lb_shm.client.connection import get_client

        deadline = time.monotonic() + timeout
        while True:
            status = get_client().call('status', timeout=5.0)
            lagging = [db['name'] for db in status['databases']
                       if db['state'] != 'RUNNING' or db['pending_writes']]
            if not lagging:
                return status
            if time.monotonic() > deadline:
                raise CommandError(f'databases not in sync after {timeout:.0f} s: {", ".join(lagging)}')
            time.sleep(0.1)
