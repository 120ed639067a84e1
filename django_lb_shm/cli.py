"""``djangoloadbalancer``: run the coordinator, show its status, migrate or verify the databases.

Run it in the Django project directory.  Settings come from ``--settings``,
DJANGO_SETTINGS_MODULE, or the project's manage.py.  The same system checks
as ``manage.py check`` run first; with errors nothing is started.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .protocol import EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR, EXIT_OK

EXIT_UNAVAILABLE = 1


def build_parser(prog: str = "djangoloadbalancer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="django_lb_shm load balancer coordinator")
    _add_django_options(parser, default=None)
    # Also accepted after the subcommand, where Django users put them (`status --settings x`).
    common = argparse.ArgumentParser(add_help=False)
    _add_django_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="start the supervisor and coordinator in the foreground (default)")
    status = sub.add_parser("status", parents=[common], help="show the coordinator's databases, counters and health")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    migrate = sub.add_parser("migrate", parents=[common], help="apply migrations to every load-balanced database")
    migrate.add_argument("migrate_args", nargs="*", help="arguments passed to `migrate` (not --database)")
    verify = sub.add_parser("verify", parents=[common],
                            help="compare every LoadBalancerModel table across the databases")
    verify.add_argument("--chunk-size", type=int, default=2000)
    verify.add_argument("--show", type=int, default=10, help="how many differing keys to name per table")
    verify.add_argument("--no-progress", action="store_true")
    sub.add_parser("check", parents=[common], help="run the system checks only")
    return parser


def _add_django_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--settings", default=default,
                        help="Django settings module (default: DJANGO_SETTINGS_MODULE or manage.py's)")
    parser.add_argument("--pythonpath", default=default,
                        help="directory to add to sys.path (default: the current directory)")


def main(argv: Optional[Sequence[str]] = None, prog: str = "djangoloadbalancer") -> int:
    args = parse_args(build_parser(prog), argv)
    setup_django(args.settings, args.pythonpath)
    return dispatch(args)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Everything after `migrate` is migrate's own (`migrate --verbosity 0`, `migrate app 0002`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "migrate" not in argv:
        return parser.parse_args(argv)
    at = argv.index("migrate")
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
    if command in ("run", "check", "migrate", "verify") and not run_checks():
        return EXIT_CONFIG_ERROR
    if command == "check":
        print("System check identified no issues.")
        return EXIT_OK
    if command == "run":
        return run()
    if command == "status":
        return status(as_json=args.json)
    if command == "migrate":
        return migrate(args.migrate_args)
    from .verify import verify

    return verify(chunk_size=args.chunk_size, show=args.show, progress=not args.no_progress)


# -- settings bootstrap -------------------------------------------------------------------
def setup_django(settings_module: Optional[str], pythonpath: Optional[str]) -> None:
    import django

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


def run_checks() -> bool:
    """Django's system checks (all apps); print the serious ones, False if any."""
    from django.core import checks

    messages = [m for m in checks.run_checks(include_deployment_checks=False) if not m.is_silenced()]
    serious = [m for m in messages if m.is_serious()]
    for message in messages:
        sys.stderr.write(f"{message}\n")
    if serious:
        sys.stderr.write(f"djangoloadbalancer: {len(serious)} system check error(s); nothing was started.\n")
    return not serious


# -- commands ---------------------------------------------------------------------------------
def run() -> int:
    from .conf import get_config
    from .coordinator import configure_logging
    from .supervisor import Supervisor

    config = get_config()
    configure_logging(config.log_level)
    try:
        return Supervisor(config, os.environ.get("DJANGO_SETTINGS_MODULE")).run()
    except RuntimeError as exc:  # another supervisor already serves this address
        sys.stderr.write(f"djangoloadbalancer: {exc}\n")
        return EXIT_BOOT_ERROR


def status(as_json: bool = False) -> int:
    from .client import read_status
    from .conf import get_config
    from .errors import ConfigurationError, LoadBalancerError

    try:
        config = get_config()
    except ConfigurationError as exc:
        sys.stderr.write(f"djangoloadbalancer status: {exc}\n")
        return EXIT_CONFIG_ERROR
    try:
        data = read_status(config)
    except LoadBalancerError as exc:
        sys.stderr.write(f"djangoloadbalancer status: {exc}\n")
        return EXIT_UNAVAILABLE
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else format_status(data))
    return EXIT_OK


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
    return "\n".join(lines)


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
    from django.core.management import call_command

    from .conf import get_config

    from . import apps

    apps.migrating_every_database = True   # no "only this copy" warning per database
    extra = without_database_option(extra_args)
    for alias in get_config().databases:
        print(f"== migrating {alias}", flush=True)
        call_command("migrate", *extra, database=alias, interactive=False)
    return EXIT_OK


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
