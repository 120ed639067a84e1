"""Throw-away PostgreSQL servers for the test and stress suites (stdlib only).

Every server gets its own data directory under a temp dir and listens on
127.0.0.1 on a free port, with ``trust`` auth for the ``postgres`` role, so it
never touches a system cluster (e.g. Debian's ``main`` on 5432).

    from tests.support.pg_cluster import PgCluster

    with PgCluster(count=3) as cluster:          # initdb + start, db "lbtest" in each
        DATABASES = cluster.django_databases()   # {"default": {...}, "DB1": ..., "DB2": ...}
        cluster[1].stop(mode="immediate")        # simulate a crash
        cluster[1].start()                       # same port, crash recovery

The server refuses to run as root, so when ``euid == 0`` every ``initdb`` and
``pg_ctl`` call goes through ``runuser -u postgres --`` and the directories are
chowned to that user.  Servers this process started are stopped
(``pg_ctl -m immediate``) and their temp dirs removed by an ``atexit`` hook and
on SIGTERM, so an aborted pytest run leaves no postgres behind; clusters
orphaned by a SIGKILLed run are reaped by :func:`reap_stale_clusters`, which
:meth:`PgCluster.start` calls.
"""
from __future__ import annotations

import atexit
import glob
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

__all__ = [
    "PostgresUnavailable",
    "PgCommandError",
    "find_pg_bindir",
    "PgServer",
    "PgCluster",
    "reap_stale_clusters",
    "DEFAULT_DBNAME",
]

DEFAULT_DBNAME = "lbtest"
PG_OS_USER = "postgres"          # OS account the server runs as when we are root
PG_ROLE = "postgres"             # database superuser created by initdb -U
TEMP_PREFIX = "lb_pg_"
_OWNER_FILE = ".lb_pg_owner"     # pid of the process that owns a cluster base dir
_MAX_SOCKET_PATH = 100           # sun_path is 108 bytes incl. ".s.PGSQL.NNNNN"


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries (or OS user) on this machine."""


class PgCommandError(RuntimeError):
    """An initdb / pg_ctl / psql command failed; the message carries its output."""


# ---------------------------------------------------------------------------
# binaries and processes
# ---------------------------------------------------------------------------

def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/<ver>/bin -> numeric sort key for <ver>
    ver = os.path.basename(os.path.dirname(path))
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-]", ver))


def find_pg_bindir() -> str | None:
    """Directory holding ``initdb``/``pg_ctl``/``postgres``, or None.

    ``$LB_PG_BINDIR`` if set; else the highest-versioned
    ``/usr/lib/postgresql/*/bin`` with an ``initdb`` (Debian/Ubuntu layout);
    else ``pg_config --bindir``; else the directory of ``initdb`` on PATH.
    """
    override = os.environ.get("LB_PG_BINDIR")
    if override:
        return override if os.access(os.path.join(override, "initdb"), os.X_OK) else None
    candidates = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
                  if os.access(p, os.X_OK)]
    if candidates:
        return max(candidates, key=_version_key)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and os.access(os.path.join(out, "initdb"), os.X_OK):
            return out
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _require_bindir(bindir: str | None) -> str:
    bindir = bindir or find_pg_bindir()
    if not bindir:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: looked in "
            "/usr/lib/postgresql/*/bin, `pg_config --bindir` and PATH. "
            "Run scripts/install.sh (as root) to install them, or set LB_PG_BINDIR.")
    return bindir


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pg_os_ids() -> tuple[int, int]:
    import pwd
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root but there is no '{PG_OS_USER}' OS user to run the server "
            "as; run scripts/install.sh (the postgresql package creates it)") from None
    return pw.pw_uid, pw.pw_gid


def _clean_env() -> dict:
    # PG* variables (PGHOST, PGPORT, PGDATABASE, PGSERVICE, ...) would redirect
    # psql/createdb away from our server; a stray locale can break initdb.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _run(argv: list[str], *, as_pg: bool = False, timeout: float = 120,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with captured output; as the postgres user if as_pg and root."""
    if as_pg and _as_root():
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        argv = [runuser, "-u", PG_OS_USER, "--", *argv]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=_clean_env(), cwd="/")
    except FileNotFoundError as exc:
        raise PostgresUnavailable(f"{exc.filename}: not found; run scripts/install.sh") from None
    except subprocess.TimeoutExpired as exc:
        raise PgCommandError(f"timed out after {timeout}s: {shlex.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise PgCommandError(
            f"command failed (exit {proc.returncode}): {shlex.join(argv)}\n"
            f"{(proc.stdout or '').strip()}\n{(proc.stderr or '').strip()}".rstrip())
    return proc


# ---------------------------------------------------------------------------
# ports
# ---------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A currently free 127.0.0.1 TCP port, never handed out twice per process.

    Ports are picked *below* the kernel's ephemeral range when possible (and
    checked by binding), so that a stopped server's port cannot be taken as
    the local port of some client connection before the server restarts on
    it.  Falls back to binding 127.0.0.1:0.
    """
    lo, _hi = _ephemeral_range()
    with _ports_lock:
        if lo > 12000:
            rng = random.Random()
            for _ in range(200):
                port = rng.randrange(10000, lo)
                if port not in _ports_given and _port_free(port):
                    _ports_given.add(port)
                    return port
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("could not find a free TCP port on 127.0.0.1")


# ---------------------------------------------------------------------------
# cleanup registry (atexit + SIGTERM)
# ---------------------------------------------------------------------------

_registry_lock = threading.RLock()
_live_servers: dict[str, "PgServer"] = {}     # datadir -> server started by this process
_owned_dirs: set[str] = set()                 # temp dirs to remove at exit
_owner_pid = os.getpid()
_sigterm_installed = False


def _cleanup_at_exit() -> None:
    if os.getpid() != _owner_pid:     # a forked child inherited the hook: not ours
        return
    with _registry_lock:
        servers = list(_live_servers.values())
        dirs = list(_owned_dirs)
    for srv in servers:
        try:
            srv.stop(mode="immediate", timeout=15)
        except Exception:
            pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by killing a process
    if os.getpid() == _owner_pid:
        _cleanup_at_exit()
    # die of SIGTERM as we would have without the handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _reset_sigterm_in_child() -> None:
    # A forked child (e.g. a multiprocessing worker) must die of SIGTERM at
    # once, as it would without us, and never clean up the parent's servers.
    global _sigterm_installed
    if _sigterm_installed:
        try:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
        _sigterm_installed = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_sigterm_in_child)


def _install_sigterm_handler() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return
    _sigterm_installed = True


atexit.register(_cleanup_at_exit)


def _register(server: "PgServer") -> None:
    with _registry_lock:
        _live_servers[server.datadir] = server
    _install_sigterm_handler()


def _unregister(server: "PgServer") -> None:
    with _registry_lock:
        _live_servers.pop(server.datadir, None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_clusters(parent: str | None = None) -> list[str]:
    """Stop servers and remove ``lb_pg_*`` dirs whose owning process is dead.

    Only dirs created by :class:`PgCluster` in *parent* (default: the system
    temp dir) carrying an owner-pid file are considered, so servers of live
    test runs and anything else on the machine are left alone.  Returns the
    removed dirs.
    """
    parent = parent or tempfile.gettempdir()
    bindir = find_pg_bindir()
    removed = []
    for base in glob.glob(os.path.join(parent, TEMP_PREFIX + "*")):
        try:
            with open(os.path.join(base, _OWNER_FILE)) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0 or _pid_alive(pid):
            continue
        if bindir:
            pidfiles = (glob.glob(os.path.join(base, "data", "postmaster.pid"))
                        + glob.glob(os.path.join(base, "*", "data", "postmaster.pid")))
            for pidfile in pidfiles:
                datadir = os.path.dirname(pidfile)
                try:
                    _run([os.path.join(bindir, "pg_ctl"), "-D", datadir, "-m", "immediate",
                          "-w", "-t", "15", "stop"], as_pg=True, timeout=30, check=False)
                except Exception:
                    pass
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


# ---------------------------------------------------------------------------
# one server
# ---------------------------------------------------------------------------

def _chown_pg(path: str) -> None:
    if _as_root():
        uid, gid = _pg_os_ids()
        os.chown(path, uid, gid)


def _check_traversable(path: str) -> None:
    """Raise early if the postgres OS user cannot reach *path* (root only)."""
    if not _as_root():
        return
    uid, gid = _pg_os_ids()
    p = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(p)
        ok = (st.st_mode & 0o001) or (st.st_uid == uid and st.st_mode & 0o100) \
            or (st.st_gid == gid and st.st_mode & 0o010)
        if not ok:
            raise PgCommandError(
                f"the '{PG_OS_USER}' OS user cannot traverse {p!r} (mode "
                f"{oct(st.st_mode & 0o777)}), so the server cannot use {path!r}; "
                "use a base dir under /tmp or chmod o+x the parents")
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


class PgServer:
    """One PostgreSQL server on 127.0.0.1:<port> with its own data directory.

    Layout: ``<root>/data`` (PGDATA), ``<root>/server.log``, and the Unix
    socket in ``<root>`` (or a short temp dir if ``<root>`` is too long for
    a socket path).  ``root`` is created (owned by the postgres OS user when
    running as root) if it does not exist; when omitted, a temp dir.
    """

    host = "127.0.0.1"
    user = PG_ROLE

    def __init__(self, root: str | None = None, *, port: int | None = None,
                 dbname: str = DEFAULT_DBNAME, durable: bool = False,
                 bindir: str | None = None, name: str | None = None,
                 extra_options: dict | None = None, max_connections: int = 200):
        self.bindir = _require_bindir(bindir)
        if _as_root():
            _pg_os_ids()               # fail early with a clear message
        _install_sigterm_handler()     # here: start() may run in a worker thread
        self._own_root = root is None
        if root is None:
            root = tempfile.mkdtemp(prefix=TEMP_PREFIX)
            os.chmod(root, 0o700)
            with open(os.path.join(root, _OWNER_FILE), "w") as f:
                f.write(str(os.getpid()))
            with _registry_lock:
                _owned_dirs.add(root)
        else:
            os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = os.path.abspath(root)
        _check_traversable(self.root)
        _chown_pg(self.root)
        self.datadir = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "server.log")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.dbname = dbname
        self.durable = durable
        self.name = name or os.path.basename(self.root)
        self.max_connections = max_connections
        self.extra_options = dict(extra_options or {})
        self._socket_dir: str | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<PgServer {self.name} {self.host}:{self.port} {self.datadir}>"

    # -- helpers ------------------------------------------------------------
    def _bin(self, prog: str) -> str:
        return os.path.join(self.bindir, prog)

    def _pg_ctl(self, *args: str, timeout: float = 90, check: bool = True):
        return _run([self._bin("pg_ctl"), "-D", self.datadir, *args],
                    as_pg=True, timeout=timeout, check=check)

    def socket_dir(self) -> str:
        if self._socket_dir is None:
            if len(self.root) + len("/.s.PGSQL.65535.lock") <= _MAX_SOCKET_PATH:
                self._socket_dir = self.root
            else:
                self._socket_dir = tempfile.mkdtemp(prefix="lb_pgs_")
                _chown_pg(self._socket_dir)
                with _registry_lock:
                    _owned_dirs.add(self._socket_dir)
        return self._socket_dir

    def server_options(self) -> dict:
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir(),
            "max_connections": str(self.max_connections),
        }
        if not self.durable:
            opts.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        opts.update({k: str(v) for k, v in self.extra_options.items()})
        return opts

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------
    def initialized(self) -> bool:
        return os.path.exists(os.path.join(self.datadir, "PG_VERSION"))

    def init(self) -> "PgServer":
        """initdb (trust auth, superuser ``postgres``, no fsync); no-op if done."""
        with self._lock:
            if self.initialized():
                return self
            _run([self._bin("initdb"), "-D", self.datadir, "--auth=trust", "-U", PG_ROLE,
                  "--no-sync", "-E", "UTF8", "--locale=C"], as_pg=True, timeout=180)
            return self

    def start(self, timeout: float = 60) -> "PgServer":
        """Start (initdb first if needed) and wait until it accepts connections."""
        with self._lock:
            if not self.initialized():
                self.init()
            if self.is_running():
                return self
            attempts = 3
            for attempt in range(attempts):
                opts = " ".join("-c " + shlex.quote(f"{k}={v}")
                                for k, v in self.server_options().items())
                proc = self._pg_ctl("-w", "-t", str(int(timeout)), "-l", self.log_path,
                                    "-o", opts, "start", timeout=timeout + 30, check=False)
                if proc.returncode == 0:
                    _register(self)
                    return self
                log = self.log_tail()
                if "ould not bind" in log or "already in use" in log:
                    if not self._fixed_port:
                        self.port = free_port()      # lost a race for the port
                    else:
                        time.sleep(0.5 * (attempt + 1))
                    continue
                break
            raise PgCommandError(
                f"pg_ctl start failed for {self!r} (exit {proc.returncode}):\n"
                f"{proc.stdout.strip()}\n{proc.stderr.strip()}\n--- {self.log_path} ---\n"
                f"{self.log_tail()}")

    def stop(self, mode: str = "fast", timeout: float = 60) -> "PgServer":
        """``pg_ctl -m <smart|fast|immediate> stop``; no-op if not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        with self._lock:
            if self.initialized() and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                proc = self._pg_ctl("-m", mode, "-w", "-t", str(int(timeout)), "stop",
                                    timeout=timeout + 30, check=False)
                if proc.returncode != 0 and self.is_running():
                    raise PgCommandError(
                        f"pg_ctl stop -m {mode} failed for {self!r}:\n"
                        f"{proc.stdout.strip()}\n{proc.stderr.strip()}")
            _unregister(self)
            return self

    def restart(self, mode: str = "fast") -> "PgServer":
        """Stop (with *mode*) and start again on the same port."""
        self.stop(mode=mode)
        return self.start()

    def is_running(self) -> bool:
        if not self.initialized():
            return False
        return self._pg_ctl("status", timeout=30, check=False).returncode == 0

    def postmaster_pid(self) -> int | None:
        """PID of the postmaster from ``postmaster.pid`` (None if not running)."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def destroy(self) -> None:
        """Stop immediately and remove the server's directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._socket_dir and self._socket_dir != self.root:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        with _registry_lock:
            _owned_dirs.discard(self.root)
            _owned_dirs.discard(self._socket_dir or "")

    # -- SQL ----------------------------------------------------------------
    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run SQL with psql over TCP as ``postgres``; returns unaligned output."""
        proc = _run([self._bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                     "-h", self.host, "-p", str(self.port), "-U", PG_ROLE, "-d", dbname,
                     "-c", sql], timeout=timeout)
        return proc.stdout.strip()

    def create_database(self, name: str | None = None, exist_ok: bool = True) -> str:
        name = name or self.dbname
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = {_literal(name)}")
        if exists:
            if not exist_ok:
                raise PgCommandError(f"database {name!r} already exists on {self!r}")
            return name
        self.psql(f"CREATE DATABASE {_ident(name)}")
        return name

    def drop_database(self, name: str | None = None) -> None:
        """DROP DATABASE IF EXISTS ... WITH (FORCE) (kicks out open connections)."""
        self.psql(f"DROP DATABASE IF EXISTS {_ident(name or self.dbname)} WITH (FORCE)")

    # -- client settings ----------------------------------------------------
    def conninfo(self, name: str | None = None) -> str:
        """libpq conninfo string, e.g. for ``psycopg.connect()``."""
        return (f"host={self.host} port={self.port} user={self.user} "
                f"dbname={name or self.dbname} connect_timeout=10")

    def django_settings(self, name: str | None = None, **extra) -> dict:
        """A Django DATABASES entry for this server (``extra`` keys merged in)."""
        entry = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name or self.dbname,
            "USER": self.user,
            "PASSWORD": "",
            "HOST": self.host,
            "PORT": str(self.port),
            "CONN_MAX_AGE": 0,
        }
        entry.update(extra)
        return entry


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# ---------------------------------------------------------------------------
# several servers
# ---------------------------------------------------------------------------

class PgCluster:
    """*count* independent servers (not replicas), each with database ``lbtest``."""

    def __init__(self, count: int = 3, base_dir: str | None = None, durable: bool = False,
                 *, dbname: str = DEFAULT_DBNAME, bindir: str | None = None,
                 extra_options: dict | None = None):
        if count < 1:
            raise ValueError("count must be >= 1")
        self.bindir = _require_bindir(bindir)
        if _as_root():
            _pg_os_ids()
        _install_sigterm_handler()
        self.count = count
        self.durable = durable
        self.dbname = dbname
        self.extra_options = extra_options
        self._own_base = base_dir is None
        self.base_dir = os.path.abspath(base_dir) if base_dir else None
        self.servers: list[PgServer] = []
        self._started = False

    # -- container protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[PgServer]:
        return iter(self.servers)

    def __getitem__(self, i: int) -> PgServer:
        return self.servers[i]

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgCluster {self.base_dir} ports={[s.port for s in self.servers]}>"

    # -- lifecycle ----------------------------------------------------------
    def _make_servers(self) -> None:
        if self.base_dir is None:
            try:
                reap_stale_clusters()
            except Exception:
                pass
            self.base_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
            with _registry_lock:
                _owned_dirs.add(self.base_dir)
        else:
            os.makedirs(self.base_dir, exist_ok=True)
        # traversable (not listable) for the postgres user; subdirs are its own
        os.chmod(self.base_dir, 0o711)
        with open(os.path.join(self.base_dir, _OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        self.servers = [
            PgServer(os.path.join(self.base_dir, f"pg{i}"), dbname=self.dbname,
                     durable=self.durable, bindir=self.bindir, name=f"pg{i}",
                     extra_options=self.extra_options)
            for i in range(self.count)
        ]

    def start(self) -> "PgCluster":
        """initdb + start every server (in parallel) and create the database."""
        if not self.servers:
            self._make_servers()

        def up(srv: PgServer) -> None:
            srv.start()
            srv.create_database(self.dbname)

        try:
            with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
                for fut in [pool.submit(up, s) for s in self.servers]:
                    fut.result()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop every server (fast, then immediate if needed) and remove the dirs."""
        def down(srv: PgServer) -> None:
            try:
                srv.stop(mode="fast", timeout=30)
            except Exception:
                srv.stop(mode="immediate")

        if self.servers:
            with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
                errors = [f.exception() for f in [pool.submit(down, s) for s in self.servers]]
        else:
            errors = []
        if remove and self.base_dir:
            if self._own_base:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            else:
                for srv in self.servers:
                    shutil.rmtree(srv.root, ignore_errors=True)
                try:
                    os.unlink(os.path.join(self.base_dir, _OWNER_FILE))
                except OSError:
                    pass
            for srv in self.servers:
                if srv._socket_dir and srv._socket_dir != srv.root:
                    shutil.rmtree(srv._socket_dir, ignore_errors=True)
            with _registry_lock:
                _owned_dirs.discard(self.base_dir)
                for srv in self.servers:
                    _owned_dirs.discard(srv.root)
                    _owned_dirs.discard(srv._socket_dir or "")
            self.servers = []
            if self._own_base:
                self.base_dir = None
        self._started = False
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    # -- client settings ----------------------------------------------------
    def django_databases(self, aliases: list[str] | None = None, **extra) -> dict:
        """``{alias: settings}`` for all servers; aliases default to
        ``default, DB1, DB2, ...`` (the test project's names)."""
        if aliases is None:
            aliases = ["default"] + [f"DB{i}" for i in range(1, len(self.servers))]
        if len(aliases) != len(self.servers):
            raise ValueError(f"{len(aliases)} aliases for {len(self.servers)} servers")
        return {a: s.django_settings(**extra) for a, s in zip(aliases, self.servers)}
