"""What the stress suite starts and must stop: databases, the coordinator, Pgpool-II.

Everything is started as a child the suite knows by pid and is stopped by that pid
(PostgreSQL through ``PgCluster.stop()``), in reverse order, from ``close()``,
which the driver calls in a ``finally`` (so also on Ctrl-C and SIGTERM).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

STRESS_DIR = Path(__file__).resolve().parent
REPO = STRESS_DIR.parent
LAUNCHER = REPO / "bin" / "djangoloadbalancer"
SETTINGS_MODULE = "stressproject.settings"
AUTHKEY = "stress-suite-authkey-0123456789abcdef"  # loopback only; never a real secret
PG_DBNAME = "lbtest"


def child_env(config_path: Path) -> dict:
    env = dict(os.environ)
    env["LB_STRESS_CONFIG"] = str(config_path)
    env["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(STRESS_DIR), os.environ.get("PYTHONPATH")]))
    return env


def log(msg: str) -> None:
    sys.stderr.write(f"[stress] {msg}\n")
    sys.stderr.flush()


def aliases_for(count: int) -> list[str]:
    """Django needs a 'default' alias; the copies are default, db1, db2, ..."""
    return ["default"] + [f"db{i}" for i in range(1, count)]


class Environment:
    def __init__(self, tmp: Path, db: str, count: int, keep: bool = False):
        self.tmp = tmp
        self.db = db
        self.count = count
        self.keep = keep
        self.aliases = aliases_for(count)
        self.cluster: Any = None
        self.coordinator: Optional[subprocess.Popen] = None
        self.coordinator_pid: Optional[int] = None
        self.pgpool: Optional["Pgpool"] = None
        self.config_path = tmp / "settings.json"
        self.settings: dict = {}

    # -- databases ----------------------------------------------------------------------
    def make_databases(self, extra_pg_connections: int = 0) -> dict:
        if self.db == "sqlite":
            return {
                alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(self.tmp / f"{alias}.sqlite3")}
                for alias in self.aliases
            }
        from tests.support.pg_cluster import PgCluster

        log(f"starting {self.count} PostgreSQL server(s) (PgCluster)...")
        max_conn = max(200, 100 + extra_pg_connections)
        self.cluster = PgCluster(count=self.count, base_dir=str(self.tmp / "pg"),
                                 extra_options={"max_connections": str(max_conn)})
        self.cluster.start()
        log("PostgreSQL ports: " + ", ".join(str(s.port) for s in self.cluster))
        return self.cluster.django_databases(self.aliases)

    # -- settings -----------------------------------------------------------------------
    def write_settings(self, databases: dict, port: int, read_algorithm: str, write_ack: str,
                       journal_fsync: bool, read_path: str = "AUTO") -> Path:
        self.settings = {
            "DATABASES": databases,
            "LOAD_BALANCER": {
                "CUD_ALGORITHM": "MULTITHREADING",
                "R_ALGORITHM": {"NAME": read_algorithm},
                "DATABASES": list(self.aliases),
                "WAIT_TIME": 1,
                "ADDRESS": {"HOST": "127.0.0.1", "PORT": port, "AUTHKEY": AUTHKEY},
                "JOURNAL_DIR": str(self.tmp / "journal"),
                "JOURNAL_FSYNC": journal_fsync,
                "WRITE_ACK": write_ack,
                "READ_PATH": read_path,
                "CLIENT_TIMEOUT": 30,
                "CONNECT_TIMEOUT": 10,
            },
        }
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.settings, indent=1))
        tmp.replace(self.config_path)
        return self.config_path

    # -- the coordinator ----------------------------------------------------------------
    def start_coordinator(self, timeout: float = 90) -> dict:
        log_path = self.tmp / "coordinator.log"
        with open(log_path, "ab") as out:
            self.coordinator = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "run"], cwd=str(STRESS_DIR), env=child_env(self.config_path),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.coordinator.returncode}:\n{self.coordinator_log()}")
            try:
                status = self.status(timeout=2)
                if status["coordinator"]["state"] == "READY" and all(
                        d["state"] == "RUNNING" for d in status["databases"]):
                    self.coordinator_pid = int(status["coordinator"]["pid"])
                    return status
                last = status["coordinator"]["state"]
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"coordinator not ready after {timeout:.0f}s ({last!r}):\n{self.coordinator_log()}")

    def status(self, timeout: float = 5) -> dict:
        """The same call as `djangoloadbalancer status --json`, made in this process."""
        from django_lb_shm.client.connection import get_client

        client = get_client()
        try:
            return client.call("status", timeout=timeout)
        except Exception:
            client.forget_connection()
            raise

    def wait_drained(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            pending = {d["name"]: d["pending_writes"] for d in status["databases"]}
            if not any(pending.values()):
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"writes still pending after {timeout}s: {pending}")
            time.sleep(0.05)

    def coordinator_log(self, chars: int = 4000) -> str:
        try:
            return (self.tmp / "coordinator.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop_coordinator(self) -> None:
        proc, self.coordinator = self.coordinator, None
        cpid, self.coordinator_pid = self.coordinator_pid, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor stops its coordinator, then exits
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if cpid:
            _wait_gone(cpid, 5.0)  # an orphaned coordinator stops by itself within a tick
            _kill_if_alive(cpid)
        try:  # the in-process client's socket points at the old server
            from django_lb_shm.client.connection import get_client

            get_client().forget_connection()
        except Exception:
            pass

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        for step in (self._stop_pgpool, self.stop_coordinator, self._stop_cluster):
            try:
                step()
            except Exception as exc:  # keep stopping the rest
                log(f"cleanup: {type(exc).__name__}: {exc}")
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")

    def _stop_pgpool(self) -> None:
        if self.pgpool is not None:
            self.pgpool.stop()
            self.pgpool = None

    def _stop_cluster(self) -> None:
        if self.cluster is not None:
            log("stopping PostgreSQL (PgCluster.stop())")
            cluster, self.cluster = self.cluster, None
            cluster.stop(remove=not self.keep)


def _wait_gone(pid: int, timeout: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid):
            return
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


def _kill_if_alive(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            proc.kill()
    except psutil.NoSuchProcess:
        pass


# -- Pgpool-II ------------------------------------------------------------------------------
PGPOOL_CONF = """\
# Written by the django_lb_shm stress suite: Pgpool-II {version} in NATIVE REPLICATION mode
# over the suite's own PostgreSQL servers (every write to every backend, reads balanced).
backend_clustering_mode = 'native_replication'
listen_addresses = '127.0.0.1'
port = {port}
socket_dir = '{dir}'
pcp_listen_addresses = ''
pcp_port = {pcp_port}
pcp_socket_dir = '{dir}'
wd_ipc_socket_dir = '{dir}'
pid_file_name = '{dir}/pgpool.pid'
logdir = '{dir}'
log_destination = 'stderr'
logging_collector = off
log_min_messages = warning
enable_pool_hba = off
pool_passwd = ''
num_init_children = {children}
max_pool = 1
reserved_connections = 0
listen_backlog_multiplier = 4
child_life_time = 0
connection_life_time = 0
client_idle_limit = 0
connection_cache = on
load_balance_mode = on
statement_level_load_balance = {statement_lb}
replicate_select = off
insert_lock = {insert_lock}
replication_stop_on_mismatch = off
failover_on_backend_error = off
health_check_period = 0
sr_check_period = 0
use_watchdog = off
memory_cache_enabled = off
{backends}
"""

PGPOOL_BACKEND = """\
backend_hostname{i} = '127.0.0.1'
backend_port{i} = {port}
backend_weight{i} = 1
backend_data_directory{i} = '{datadir}'
backend_flag{i} = 'ALLOW_TO_FAILOVER'
"""


def pgpool_binary() -> Optional[str]:
    return shutil.which("pgpool") or (os.path.exists("/usr/sbin/pgpool") and "/usr/sbin/pgpool") or None


def pgpool_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().replace("pgpool-II version ", "")


class Pgpool:
    """One pgpool process (foreground, ``-n``) run as the postgres OS user when we are root."""

    def __init__(self, binary: str, cluster: Any, directory: Path, port: int, pcp_port: int, children: int,
                 statement_level_load_balance: bool = True, insert_lock: bool = True):
        self.binary = binary
        self.cluster = cluster
        self.dir = directory
        self.port = port
        self.pcp_port = pcp_port
        self.children = children
        self.statement_lb = statement_level_load_balance
        self.insert_lock = insert_lock
        self.proc: Optional[subprocess.Popen] = None
        self.version = pgpool_version(binary)

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        backends = "".join(
            PGPOOL_BACKEND.format(i=i, port=srv.port, datadir=srv.datadir) for i, srv in enumerate(self.cluster)
        )
        conf = PGPOOL_CONF.format(
            version=self.version, port=self.port, pcp_port=self.pcp_port, dir=self.dir, children=self.children,
            statement_lb="on" if self.statement_lb else "off", insert_lock="on" if self.insert_lock else "off",
            backends=backends,
        )
        path = self.dir / "pgpool.conf"
        path.write_text(conf)
        (self.dir / "pcp.conf").write_text("")
        (self.dir / "pool_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
        return path

    def start(self, timeout: float = 30) -> None:
        conf = self.write_config()
        kwargs: dict = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        with open(self.dir / "pgpool.log", "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-n", "-f", str(conf), "-F", str(self.dir / "pcp.conf"),
                 "-a", str(self.dir / "pool_hba.conf")],
                cwd=str(self.dir), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgpool exited with {self.proc.returncode}:\n{self.log()}")
            try:
                import psycopg

                with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=PG_DBNAME,
                                     connect_timeout=3) as conn:
                    conn.execute("SELECT 1").fetchone()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"pgpool not accepting connections after {timeout:.0f}s ({last!r}):\n{self.log()}")

    def django_settings(self) -> dict:
        return {
            "ENGINE": "django.db.backends.postgresql", "NAME": PG_DBNAME, "USER": "postgres", "PASSWORD": "",
            "HOST": "127.0.0.1", "PORT": str(self.port), "CONN_MAX_AGE": 0,
        }

    def pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            main = psutil.Process(self.proc.pid)
            return [main.pid] + [c.pid for c in main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def log(self, chars: int = 3000) -> str:
        try:
            return (self.dir / "pgpool.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log("stopping pgpool")
            proc.send_signal(signal.SIGINT)  # pgpool: SIGINT = fast shutdown
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session we started it in
                except ProcessLookupError:
                    pass
                proc.wait(10)
