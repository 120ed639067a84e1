"""``djangoloadbalancer``: run the coordinator, show its status, migrate, verify or resync the databases.

Run it in the Django project directory.  Settings come from ``--settings``,
DJANGO_SETTINGS_MODULE, or the project's manage.py.  The same system checks
as ``manage.py check`` run first; with errors nothing is started.

Only conf, errors and exit_codes are imported at the top: each subcommand imports its
modules once Django is set up.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import django

from django_lb_shm.errors import (
    ConfigurationError,
    LoadBalancerError,
    SharedMemoryNotOwned,
)
from django_lb_shm.settings.config import LoadBalancerConfig, get_config
from django_lb_shm.settings.overrides import apply_runtime_settings_from_environment
from django_lb_shm.wire.exit_codes import (
    EXIT_BOOT_ERROR,
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG_ERROR,
    EXIT_DEGRADED,
    EXIT_MIGRATE_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
)

STATUS_EPILOG = """exit status:
  0  the coordinator is READY and every database is RUNNING
  1  no coordinator answers (not started, or restarting for longer than CONNECT_TIMEOUT)
  2  invalid settings
  3  degraded: the coordinator answers, but a database is not RUNNING or it is not READY
With --watch: the status of the last refresh (with --count), or 0 after Ctrl-C."""

MIGRATE_DESCRIPTION = """Run Django's `migrate` on every database of LOAD_BALANCER['DATABASES'], one after the
other, then print one summary line per database. Every other argument is passed to
`migrate` as it is (app label, migration name, --fake, --plan, --verbosity...: see
`python manage.py help migrate`); --database is dropped. Exit status 0, or 1 when a
database could not be migrated (the ones after it are not migrated)."""


def build_parser(prog: str = "djangoloadbalancer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="django_lb_shm load balancer coordinator",
                                     epilog="exit status: 0 success, 2 invalid settings or arguments; "
                                            "`<subcommand> --help` lists the others of each subcommand")
    _add_django_options(parser, default=None)
    # Also accepted after the subcommand, where Django users put them (`status --settings x`).
    common = argparse.ArgumentParser(add_help=False)
    _add_django_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="start the supervisor and coordinator in the foreground (default)",
                   epilog="exit status: 0 stopped (SIGTERM, Ctrl-C), 2 invalid settings, 3 boot error (the port is "
                          "taken, another supervisor serves this address, another coordinator these databases)")
    _add_status_parser(sub, common)
    migrate = sub.add_parser("migrate", parents=[common], help="apply migrations to every load-balanced database",
                             description=MIGRATE_DESCRIPTION)
    migrate.add_argument("migrate_args", nargs="*", metavar="migrate-argument",
                         help="passed to Django's `migrate` (not --database)")
    verify = sub.add_parser("verify", parents=[common],
                            help="compare every load-balanced table across the databases",
                            epilog="exit status: 0 identical, 1 the databases differ, 2 invalid settings or arguments, "
                                   "4 a database could not be read (2 before 2026-12)")
    verify.add_argument("--chunk-size", type=int, default=2000,
                        help="rows read per query from each database and table (default 2000); bounds the memory used")
    verify.add_argument("--show", type=int, default=10, help="how many differing keys to name per table")
    verify.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is only drawn on a terminal anyway)")
    _add_resync_parser(sub, common)
    sub.add_parser("check", parents=[common], help="run the system checks only")
    return parser


RESYNC_DESCRIPTION = """Refill database ALIAS from another one while the coordinator runs: ALIAS leaves the
reads (state RESYNCING) and its writes wait in the journal; ALIAS is migrated; a consistent
snapshot of every load-balanced table of SOURCE is copied into ALIAS in one transaction,
with SOURCE's marker; the coordinator replays the writes after it; then ALIAS is RUNNING and
compared with SOURCE. Use it for a DIVERGED database, or to fill a NEW one (added to
LOAD_BALANCER['DATABASES'])."""


def _add_resync_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    resync = sub.add_parser("resync", parents=[common], help="refill one database from another, online",
                            description=RESYNC_DESCRIPTION,
                            epilog="exit status: 0 ALIAS is RUNNING and identical to SOURCE, 1 the resync failed "
                                   "(ALIAS is left out of reads until a resync completes, or untouched), "
                                   "2 invalid settings or arguments")
    resync.add_argument("alias", metavar="ALIAS",
                        help="the database to refill (an alias of LOAD_BALANCER['DATABASES'])")
    resync.add_argument("--from", dest="source", metavar="SOURCE", default=None,
                        help="the database to copy (default: a RUNNING one other than the leader, when there is one)")
    resync.add_argument("--chunk-size", type=int, default=10000,
                        help="rows copied per step (default 10000; PostgreSQL: at most 1 MiB); bounds the memory "
                             "and the work per step")
    resync.add_argument("--max-rate", type=float, default=0.0, metavar="ROWS_PER_S",
                        help="copy at most this many rows per second (default: no limit), to spare the disks")
    resync.add_argument("--no-migrate", action="store_true", help="do not run `migrate` on ALIAS first")
    resync.add_argument("--no-verify", action="store_true", help="do not compare ALIAS with SOURCE at the end")


def _add_status_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="show the coordinator's databases, counters and health",
                            epilog=STATUS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", type=_interval, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2, at least 0.1), in place on a terminal; Ctrl-C stops")
    status.add_argument("--count", type=int, default=0, metavar="N",
                        help="with --watch: stop after N refreshes (default: until Ctrl-C)")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0.1 to 3600 seconds, got {text}")
    return value


def _add_django_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--settings", default=default,
                        help="Django settings module (default: DJANGO_SETTINGS_MODULE or manage.py's)")
    parser.add_argument("--pythonpath", default=default,
                        help="directory to add to sys.path (default: the current directory)")


def main(argv: Optional[Sequence[str]] = None, prog: str = "djangoloadbalancer") -> int:
    def steps() -> int:
        args = parse_args(build_parser(prog), argv)
        setup_django(args.settings, args.pythonpath)
        return dispatch(args)

    return quiet_on_broken_pipe(steps)


def quiet_on_broken_pipe(steps: Callable[[], int]) -> int:
    """`status | head -1`: when the reader of our output goes away, stop without a traceback."""
    try:
        code = steps()
        sys.stdout.flush()   # inside: a pipe closed under buffered output fails here, not at exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Everything after `migrate` is migrate's own (`migrate --verbosity 0`, `migrate app 0002`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "migrate" not in argv:
        return parser.parse_args(argv)
    at = argv.index("migrate")
    if {"-h", "--help"} & set(argv[at + 1:]):
        return parser.parse_args(argv[: at + 1] + ["--help"])   # ours (it exits): nothing is migrated
    args = parser.parse_args(argv[: at + 1])
    args.migrate_args = _take_django_options(argv[at + 1:], args)
    return args


def _take_django_options(argv: list[str], args: argparse.Namespace) -> list[str]:
    """--settings / --pythonpath among migrate's arguments are ours: they choose the project."""
    kept: list[str] = []
    values = iter(argv)
    for arg in values:
        name, equals, value = arg.partition("=")
        if name in ("--settings", "--pythonpath"):
            setattr(args, name[2:], value if equals else next(values, None))
        else:
            kept.append(arg)
    return kept


def dispatch(args: argparse.Namespace) -> int:
    command = args.command or "run"
    # `run` does not read the copies here: the coordinator compares their migrations itself.
    if command in ("run", "check", "migrate", "verify", "resync") and not run_checks(read_databases=command != "run"):
        return EXIT_CONFIG_ERROR
    if command == "check":
        print("System check identified no issues.")
        return EXIT_OK
    if command == "run":
        return run()
    if command == "status":
        if args.watch is not None:
            return watch_status(args.json, args.watch, args.count)
        return status(as_json=args.json)
    if command == "migrate":
        return migrate(args.migrate_args)
    if command == "resync":
        from django_lb_shm.ops.resync import resync

        return resync(args.alias, args.source, chunk_size=args.chunk_size, max_rate=args.max_rate,
                      migrate=not args.no_migrate, verify=not args.no_verify)
    from django_lb_shm.ops.verify import verify

    return verify(chunk_size=args.chunk_size, show=args.show, progress=not args.no_progress)


# -- settings bootstrap -------------------------------------------------------------------
def setup_django(settings_module: Optional[str], pythonpath: Optional[str]) -> None:
    path = os.path.abspath(pythonpath or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    elif not os.environ.get("DJANGO_SETTINGS_MODULE"):
        found = settings_from_manage_py(Path(path) / "manage.py")
        if found is None:
            sys.stderr.write(
                "djangoloadbalancer: no Django settings: pass --settings, set DJANGO_SETTINGS_MODULE, "
                "or run it in the directory of the project's manage.py\n"
            )
            raise SystemExit(EXIT_CONFIG_ERROR)
        os.environ["DJANGO_SETTINGS_MODULE"] = found
    try:
        apply_runtime_settings_from_environment()
        django.setup()
    except ImportError as exc:
        sys.stderr.write(f"djangoloadbalancer: cannot import the settings {os.environ['DJANGO_SETTINGS_MODULE']!r} "
                         f"({exc}); check --settings / DJANGO_SETTINGS_MODULE and --pythonpath\n")
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def settings_from_manage_py(manage_py: Path) -> Optional[str]:
    try:
        text = manage_py.read_text()
    except OSError:
        return None
    match = re.search(r"DJANGO_SETTINGS_MODULE['\"]\s*,\s*['\"]([\w.]+)['\"]", text)
    return match.group(1) if match else None


def run_checks(read_databases: bool = False) -> bool:
    """Django's system checks (all apps), and with ``read_databases`` W035 over every copy; print
    them, False if any is serious."""
    from django.core import checks

    found = checks.run_checks(include_deployment_checks=False)
    if read_databases and not any(m.is_serious() for m in found):
        found += _applied_migrations_check()
    messages = [m for m in found if not m.is_silenced()]
    serious = [m for m in messages if m.is_serious()]
    for message in messages:
        sys.stderr.write(f"{message}\n")
    if serious:
        sys.stderr.write(f"djangoloadbalancer: {len(serious)} system check error(s); nothing was started.\n")
    return not serious


def _applied_migrations_check() -> list:
    """W035 on every load-balanced database: Django runs database checks only for the databases a
    command names, and the load-balanced ones are all of them here."""
    from django_lb_shm.checks import check_applied_migrations

    return check_applied_migrations(databases=list(get_config().databases))


# -- commands ---------------------------------------------------------------------------------
def run() -> int:
    from django_lb_shm.ops.logging_setup import configure_logging
    from django_lb_shm.supervisor.supervisor import Supervisor

    config = get_config()
    configure_logging(config.log_level)
    try:
        return Supervisor(config, os.environ.get("DJANGO_SETTINGS_MODULE")).run()
    except (RuntimeError, SharedMemoryNotOwned) as exc:  # the address's segment is taken or not ours
        sys.stderr.write(f"djangoloadbalancer: {exc}\n")
        return EXIT_BOOT_ERROR


def status(as_json: bool = False) -> int:
    config = _status_config()
    if config is None:
        return EXIT_CONFIG_ERROR
    code, text = status_once(config, as_json)
    (sys.stderr if code == EXIT_UNAVAILABLE else sys.stdout).write(text + "\n")
    return code


def _status_config() -> Any:
    try:
        return get_config()
    except ConfigurationError as exc:
        sys.stderr.write(f"djangoloadbalancer status: {exc}\n")
        return None


def status_once(config: LoadBalancerConfig, as_json: bool) -> tuple[int, str]:
    """(exit status, what to print): the table or JSON, or why no coordinator answers."""
    from django_lb_shm.client.connection import read_status

    try:
        data = read_status(config)
    except LoadBalancerError as exc:
        return EXIT_UNAVAILABLE, f"djangoloadbalancer status: {exc}"
    text = json.dumps(data, indent=2, sort_keys=True) if as_json else format_status(data)
    return status_code(data), text


def status_code(data: dict) -> int:
    ready = data["coordinator"].get("state") == "READY"
    return EXIT_OK if ready and all(db["state"] == "RUNNING" for db in data["databases"]) else EXIT_DEGRADED


def watch_status(as_json: bool, interval: float, count: int = 0) -> int:
    """`status --watch`: redraw every ``interval`` s (in place on a terminal) until Ctrl-C or ``count``."""
    config = _status_config()
    if config is None:
        return EXIT_CONFIG_ERROR
    on_terminal = sys.stdout.isatty()
    refreshes = 0
    try:
        while True:
            code, text = status_once(config, as_json)
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            _show(f"{when}  every {interval:g}s  status {code}  (Ctrl-C stops)\n{text}", on_terminal)
            refreshes += 1
            if count and refreshes >= count:
                return code
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _show(text: str, on_terminal: bool) -> None:
    if on_terminal:
        # Cursor home, each line cleared to its end, then the rest of the screen: no flicker.
        text = "\x1b[H" + "".join(line + "\x1b[K\n" for line in text.splitlines()) + "\x1b[J"
    else:
        text += "\n\n"
    sys.stdout.write(text)
    sys.stdout.flush()


def format_status(data: dict) -> str:
    c = data["coordinator"]
    s = data.get("supervisor", {})
    lines = [
        f"coordinator {c.get('address', '')}  pid {c['pid']}  state {c.get('state')}  "
        f"restarts {c['restarts']}  uptime {c['uptime_s']:.0f}s  rss {c.get('rss_mb', '?')} MB  "
        f"cpu {c.get('cpu_times_s', '?')}s  threads {c.get('threads', '?')}",
        f"supervisor pid {s.get('pid', '?')}  rss {s.get('rss_mb', '?')} MB   "
        f"read algorithm {c.get('read_algorithm')}  write ack {c.get('write_ack')}  "
        f"last write #{c.get('last_seq')}  journal {c.get('journal_entries')} entries / {c.get('journal_bytes')} B",
    ]
    groups = c.get("write_groups")
    if groups and groups.get("groups"):
        lines.append(f"write groups {groups['groups']}  writes in them {groups['writes']}  "
                     f"mean size {groups['writes'] / groups['groups']:.1f}  waiting {groups['waiting']}")
    if c.get("write_order") is not None:
        lines.append(format_write_order(c["write_order"]))
    lines += [
        "",
    ]
    header = ("database", "state", "reads", "writes", "pending", "latency ms", "in flight", "read conns",
              "errors", "heartbeat", "answered")
    rows = [
        (db["name"], db["state"], str(db["reads"]), str(db["writes"]), str(db["pending_writes"]),
         f"{db['latency_ms']:.3f}", str(db.get("inflight_reads", 0)), _read_connections(db),
         str(db.get("errors", 0)), _ago(db.get("heartbeat_age_s")), _ago(db.get("probe_age_s")))
        for db in data["databases"]
    ]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    why = [_why_not_running(db) for db in data["databases"] if db["state"] != "RUNNING" or db.get("missing_migrations")]
    return "\n".join(lines + ([""] + why if why else []))


def _why_not_running(db: dict) -> str:
    line = f"{db['name']} is {db['state']}"
    if db.get("state_age_s") is not None:
        line += f" (for {db['state_age_s']:.0f}s)"
    resync = db.get("resync")
    if resync:
        copied = resync.get("progress", {}).get("copied_rows", 0)
        line += (f"; resync from {resync['source']} by pid {resync['pid']} on {resync['host']}: {resync['phase']}, "
                 f"{copied} rows copied, last word {resync['silent_s']:.0f}s ago")
    missing = ", ".join(db.get("missing_migrations") or ())
    if db["state"] == "SCHEMA_BEHIND":
        return (f"{line}: missing migrations {missing}, which another copy has applied; it serves no reads and "
                "its writes wait in the journal until `djangoloadbalancer migrate` has run")
    if missing and db["state"] == "RUNNING":
        return (f"{line} but lacks migrations {missing} that another copy has applied, and has others that copy "
                "lacks (code of two branches?): migrate every copy to the same migrations")
    if not resync and db.get("last_error"):
        at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(db["last_error_at"]))
        line += f"; last error {db['last_error_age_s']:.0f}s ago, at {at}: {db['last_error']}"
    return line


def format_write_order(order: dict) -> str:
    """Who holds the write order: "write order free", or "write order held 3.2 s by a transaction
    of pid 1234 via 127.0.0.1:50000 (request 1234-…-7), idle 3.1 s, leader DB1; limit 5 s"."""
    if not order.get("held"):
        return "write order free"
    by = {"transaction": "a transaction", "autocommit writes": f"{order.get('writes', 0)} autocommit writes",
          "replay": "a catch-up"}.get(order.get("by", ""), order.get("by", "?"))
    text = f"write order held {order.get('held_s', 0):.1f} s by {by}"
    if order.get("client"):
        text += f" of {order['client']}"
    if order.get("request"):
        text += f" (request {order['request']})"
    if "idle_s" in order:
        text += f", idle {order['idle_s']:.1f} s"
    if order.get("leader"):
        text += f", leader {order['leader']}"
    if "leader_silent_s" in order:
        text += f" (no answer for {order['leader_silent_s']:.1f} s)"
    return text + f"; limit {order.get('hold_timeout_s', 0):g} s"


def _ago(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s ago"


def _read_connections(db: dict) -> str:
    pool = db.get("read_connections")
    return f"{pool['busy']}/{pool['open']}/{pool['size']}" if pool else "-"


def migrate(extra_args: Sequence[str]) -> int:
    from django_lb_shm import apps

    apps.migrating_every_database = True   # no "only this copy" warning per database
    extra = without_database_option(extra_args)
    databases = get_config().databases
    outcomes: list[str] = []
    ok = True
    for alias in databases:
        print(f"== migrating {alias}", flush=True)
        outcome, ok = _migrate_one(alias, extra)
        outcomes.append(outcome)
        if not ok:
            break   # the next copies keep their schema: the same migration would likely fail there too
    print("== summary")
    for alias, outcome in zip(databases, outcomes + ["not migrated"] * (len(databases) - len(outcomes))):
        print(f"{alias}: {outcome}")
    return EXIT_OK if ok else EXIT_MIGRATE_FAILED


def _migrate_one(alias: str, extra: Sequence[str]) -> tuple[str, bool]:
    """(summary line, success) of `migrate` on one database."""
    from django.core.management import CommandError, call_command

    before = _applied_migrations(alias)
    try:
        call_command("migrate", *extra, database=alias, interactive=False)
    except Exception as exc:
        if not isinstance(exc, CommandError):
            traceback.print_exc()
        sys.stderr.write(f"djangoloadbalancer migrate: {alias}: {exc}\n")
        return f"FAILED: {exc}", False
    after = _applied_migrations(alias)
    applied, unapplied = len(after - before), len(before - after)
    change = ", ".join(filter(None, [f"{_migrations(applied)} applied" if applied else "",
                                     f"{_migrations(unapplied)} unapplied" if unapplied else ""]))
    return f"{change or 'nothing applied'} ({len(after)} recorded)", True


def _migrations(n: int) -> str:
    return f"{n} migration{'' if n == 1 else 's'}"


def _applied_migrations(alias: str) -> set:
    from django.db import connections
    from django.db.migrations.recorder import MigrationRecorder

    return set(MigrationRecorder(connections[alias]).applied_migrations())


def without_database_option(args: Sequence[str]) -> list[str]:
    """Drop --database X / --database=X: every load-balanced database is migrated."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--database":
            skip = True
        elif not arg.startswith("--database="):
            kept.append(arg)
    return kept
