"""Run a command with three throw-away PostgreSQL servers (tests/support/pg_cluster.py) on
127.0.0.1, their Django settings in DJSUITE_DATABASES (JSON); the servers are stopped and
removed afterwards, whatever happens. Used by run.sh with DJSUITE_BACKEND=postgres.

Usage: python with_postgres.py <timeout seconds> <command...>
"""
import json
import os
import subprocess
import sys


def main() -> int:
    from tests.support.pg_cluster import PgCluster

    timeout = float(sys.argv[1])
    cluster = PgCluster(count=3).start()
    try:
        databases = cluster.django_databases(["default", "DB1", "DB2"])
        # Django's multi-database tests' 'other': a second database on the first server.
        databases["other"] = {**databases["default"], "NAME": "djsuite_other"}
        env = dict(os.environ, DJSUITE_DATABASES=json.dumps(databases))
        return subprocess.run(sys.argv[2:], env=env, timeout=timeout).returncode
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
