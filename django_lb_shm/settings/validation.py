"""settings.LOAD_BALANCER's keys and their checks (E0xx / W0xx).

:func:`find_problems` is the single validator: the system checks (``checks.py``), the launcher
and ``settings.config.get_config`` all use it, so every entry point reports a bad key the same way.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from django_lb_shm.errors import ConfigurationError

SETTING_NAME = "LOAD_BALANCER"
DEFAULT_ALIAS = "loadbalancer"
CUD_ALGORITHMS = ("MULTITHREADING",)
BUILTIN_READ_ALGORITHMS = (
    "ROUND_ROBIN",
    "INTERVAL_TIME",
    "LEAST_CONNECTIONS",
    "INTERVAL_NUMBER_OF_CONNECTIONS",  # the seed's name for least connections
)
WRITE_ACK_POLICIES = ("FIRST", "QUORUM", "ALL")
READ_PATHS = ("AUTO", "COORDINATOR")  # AUTO: zero-hop reads where the shared memory can be attached
# JOIN: load-balanced writes inside a plain transaction.atomic() on 'default' join it (plain_atomic.py);
# AUTOCOMMIT: they are applied one by one at once, with a LoadBalancerTransactionWarning (before issue 19).
PLAIN_ATOMIC_MODES = ("JOIN", "AUTOCOMMIT")
# When 'default''s query count (CaptureQueriesContext, assertNumQueries) includes the load-balanced
# alias's statements: TESTS: under LoadBalancerTestRunner (backend/base.py).
COUNT_QUERIES_MODES = ("TESTS", "ALWAYS", "NEVER")
DEFAULT_DB_ALIAS = "default"   # django.db's (not imported here: settings.py may import this module)
SUPPORTED_VENDORS = ("sqlite", "postgresql")
MIN_REMOTE_AUTHKEY_LENGTH = 32

KNOWN_KEYS = {
    "CUD_ALGORITHM", "R_ALGORITHM", "DATABASES", "WAIT_TIME", "ADDRESS", "ALIAS",
    "JOURNAL_DIR", "JOURNAL_FSYNC", "WRITE_ACK", "CLIENT_TIMEOUT", "CONNECT_TIMEOUT",
    "HEARTBEAT_TIMEOUT", "GRACEFUL_TIMEOUT", "MAX_RSS_MB", "MAX_REQUEST_BYTES",
    "STATEMENT_TIMEOUT", "READ_TIMEOUT", "READ_CONNECTIONS", "LOG_LEVEL", "READ_PATH",
    "TRANSACTION_HOLD_TIMEOUT", "METRICS", "MODELS", "PLAIN_ATOMIC", "COUNT_QUERIES_ON_DEFAULT",
}
METRICS_KEYS = {"HOST", "PORT"}
DEFAULT_METRICS_HOST = "127.0.0.1"   # loopback: the metrics have no authentication
# Optional numeric settings: name -> (default, zero allowed)
NUMERIC_DEFAULTS: dict[str, tuple[float, bool]] = {
    "CLIENT_TIMEOUT": (30.0, False),
    "CONNECT_TIMEOUT": (5.0, False),
    "HEARTBEAT_TIMEOUT": (15.0, False),
    "GRACEFUL_TIMEOUT": (10.0, False),
    "MAX_RSS_MB": (0.0, True),  # 0 disables the RSS limit
    "MAX_REQUEST_BYTES": (64 * 1024 * 1024, False),
    "STATEMENT_TIMEOUT": (0.0, True),  # 0 disables the per-statement timeout
    "READ_TIMEOUT": (0.0, True),  # 0: half of CLIENT_TIMEOUT
    "READ_CONNECTIONS": (4, True),  # per database, for reads run on the server threads; 0: none
    "TRANSACTION_HOLD_TIMEOUT": (5.0, False),  # unset: the smaller of 5 and CLIENT_TIMEOUT / 2
}
INTEGER_KEYS = ("MAX_REQUEST_BYTES", "READ_CONNECTIONS")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the settings; ``id`` is the system-check id."""

    id: str
    msg: str
    hint: str
    level: str = "error"  # or "warning"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def authkey_is_strong(key: bytes) -> bool:
    """At least MIN_REMOTE_AUTHKEY_LENGTH bytes and 10 distinct ones (e.g. secrets.token_urlsafe(32))."""
    return len(key) >= MIN_REMOTE_AUTHKEY_LENGTH and len(set(key)) >= 10


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_databases(raw: Mapping[str, Any], django_dbs: Mapping[str, Any]) -> list[Problem]:
    dbs = raw.get("DATABASES")
    if not isinstance(dbs, (list, tuple)) or not dbs or not all(isinstance(a, str) for a in dbs):
        return [Problem(
            "django_lb_shm.E002",
            f"LOAD_BALANCER['DATABASES'] must be a non-empty list of database aliases, got {dbs!r}.",
            "List aliases of settings.DATABASES, e.g. ['default', 'DB1', 'DB2'].",
        )]
    problems = []
    duplicates = sorted({a for a in dbs if list(dbs).count(a) > 1})
    if duplicates:
        problems.append(Problem(
            "django_lb_shm.E015",
            f"LOAD_BALANCER['DATABASES'] lists {', '.join(map(repr, duplicates))} more than once.",
            "Name each database once.",
        ))
    missing = [a for a in dbs if a not in django_dbs]
    if missing:
        problems.append(Problem(
            "django_lb_shm.E003",
            "LOAD_BALANCER['DATABASES'] names "
            f"{', '.join(map(repr, missing))}, not defined in settings.DATABASES.",
            f"Define them in settings.DATABASES or remove them; defined: {', '.join(sorted(django_dbs))}.",
        ))
    present = [a for a in dbs if a in django_dbs]
    problems += _check_vendors(present, django_dbs)
    return problems


def vendor_of(engine: str) -> str:
    """'django.db.backends.postgresql' -> 'postgresql' (best effort, no import)."""
    tail = (engine or "").rsplit(".", 1)[-1]
    if "sqlite" in tail:
        return "sqlite"
    if "postg" in tail or tail == "postgis":
        return "postgresql"
    return tail


def _check_vendors(aliases: list[str], django_dbs: Mapping[str, Any]) -> list[Problem]:
    problems = []
    vendors = {alias: vendor_of(django_dbs[alias].get("ENGINE", "")) for alias in aliases}
    unsupported = {a: v for a, v in vendors.items() if v not in SUPPORTED_VENDORS}
    if unsupported:
        problems.append(Problem(
            "django_lb_shm.E011",
            "Unsupported database engine for "
            + ", ".join(f"{a!r} ({django_dbs[a].get('ENGINE')})" for a in unsupported) + ".",
            f"django_lb_shm supports: {', '.join(SUPPORTED_VENDORS)}.",
        ))
    if len(set(vendors.values())) > 1:
        problems.append(Problem(
            "django_lb_shm.E012",
            "LOAD_BALANCER['DATABASES'] mixes engines: "
            + ", ".join(f"{a}={v}" for a, v in vendors.items()) + ".",
            "All load-balanced databases must be copies on the same engine.",
        ))
    for alias in aliases:
        name = str(django_dbs[alias].get("NAME", ""))
        if vendors[alias] == "sqlite" and (":memory:" in name or "mode=memory" in name or not name):
            problems.append(Problem(
                "django_lb_shm.E013",
                f"Database {alias!r} is an in-memory SQLite database.",
                "The coordinator runs in its own process; give every SQLite database a file NAME. "
                "Under `manage.py test` (in-memory test databases), set "
                "TEST_RUNNER = 'django_lb_shm.testing.LoadBalancerTestRunner'.",
            ))
    return problems


def _check_algorithms(raw: Mapping[str, Any]) -> list[Problem]:
    problems = _check_choice(raw, "CUD_ALGORITHM", CUD_ALGORITHMS, "django_lb_shm.E004", "write algorithm")
    r_alg = raw.get("R_ALGORITHM", {"NAME": "ROUND_ROBIN"})
    if not isinstance(r_alg, Mapping) or not isinstance(r_alg.get("NAME"), str):
        return problems + [Problem(
            "django_lb_shm.E005",
            f"LOAD_BALANCER['R_ALGORITHM'] must be a dict with a 'NAME', got {r_alg!r}.",
            "For example {'NAME': 'ROUND_ROBIN'} or {'NAME': 'INTERVAL_TIME', 'INTERVAL': 5}.",
        )]
    name = r_alg["NAME"]
    if name not in BUILTIN_READ_ALGORITHMS and "." not in name:
        problems.append(Problem(
            "django_lb_shm.E005",
            f"LOAD_BALANCER['R_ALGORITHM']['NAME'] is {name!r}, not a known read algorithm.",
            f"Use one of: {', '.join(BUILTIN_READ_ALGORITHMS)}, or a dotted path to a ReadAlgorithm subclass.",
        ))
    problems += _check_read_options(r_alg, raw.get("DATABASES"))
    return problems + _check_seconds(r_alg.get("INTERVAL", 5), "['R_ALGORITHM']['INTERVAL']", "django_lb_shm.E006", 5)


def _check_read_options(r_alg: Mapping[str, Any], databases: Any) -> list[Problem]:
    names = list(databases) if isinstance(databases, (list, tuple)) else []
    problems = [p for p in (weights_problem(r_alg.get("WEIGHTS", {}), names),
                            exclude_problem(r_alg.get("EXCLUDE", ()), names)) if p]
    name = r_alg.get("NAME")
    if isinstance(name, str) and "." in name:
        problems += _check_custom_algorithm(name)
    return problems


# The one validation of R_ALGORITHM's WEIGHTS and EXCLUDE: the system checks (above) and
# balancing.ReadAlgorithm (an algorithm built by hand) both ask these.
def weights_problem(weights: Any, names: Any) -> Optional[Problem]:
    """What is wrong with R_ALGORITHM['WEIGHTS'] for these database names (E018), or None."""
    if isinstance(weights, Mapping) and all(
        k in names and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in weights.items()
    ):
        return None
    return Problem(
        "django_lb_shm.E018",
        f"LOAD_BALANCER['R_ALGORITHM']['WEIGHTS'] must map names from LOAD_BALANCER['DATABASES'] to "
        f"whole numbers >= 0, got {weights!r}.",
        "For example 'WEIGHTS': {'DB1': 3, 'DB2': 1}; a weight of 0 keeps a database out of reads.",
    )


def exclude_problem(excluded: Any, names: Any) -> Optional[Problem]:
    """What is wrong with R_ALGORITHM['EXCLUDE'] for these database names (E019), or None."""
    if not isinstance(excluded, (list, tuple)) or any(n not in names for n in excluded):
        return Problem(
            "django_lb_shm.E019",
            f"LOAD_BALANCER['R_ALGORITHM']['EXCLUDE'] must list names from LOAD_BALANCER['DATABASES'], got {excluded!r}.",
            "Excluded databases get every write but serve no reads.",
        )
    if names and set(excluded) >= set(names):
        return Problem("django_lb_shm.E019", "LOAD_BALANCER['R_ALGORITHM']['EXCLUDE'] keeps every database out of reads.",
                       "Leave at least one database to serve reads.")
    return None


def _check_custom_algorithm(path: str) -> list[Problem]:
    # not at module top: balancing imports conf, and settings.py may import conf (light)
    from django_lb_shm.balancing import load_read_algorithm

    try:
        load_read_algorithm(path)
    except ConfigurationError as exc:
        return [Problem("django_lb_shm.E020", str(exc),
                        "Give the dotted path of a django_lb_shm.balancing.ReadAlgorithm subclass "
                        "that implements choose().")]
    return []


def _check_address(raw: Mapping[str, Any]) -> list[Problem]:
    address = raw.get("ADDRESS")
    if not isinstance(address, Mapping):
        return [Problem(
            "django_lb_shm.E008",
            f"LOAD_BALANCER['ADDRESS'] must be a dict with HOST, PORT and AUTHKEY, got {address!r}.",
            "For example {'HOST': 'localhost', 'PORT': 6000, 'AUTHKEY': '<a long random secret>'}.",
        )]
    problems = _check_path(address) if "PATH" in address else _check_host_port(address)
    if not isinstance(address.get("LOCAL_SOCKET", True), bool):
        problems.append(Problem(
            "django_lb_shm.E008",
            f"LOAD_BALANCER['ADDRESS']['LOCAL_SOCKET'] must be True or False, got {address['LOCAL_SOCKET']!r}.",
            "Leave it out (True: same-host apps use a private Unix socket) or set False to use TCP only.",
        ))
    authkey = resolve_authkey(address)
    if not authkey:
        env_name = address.get("AUTHKEY_ENV")
        problems.append(Problem(
            "django_lb_shm.E010",
            "LOAD_BALANCER['ADDRESS']['AUTHKEY'] is missing or empty"
            + (f" (environment variable {env_name!r} is not set)." if env_name else "."),
            "Set AUTHKEY to a secret string (or AUTHKEY_ENV to the name of an environment "
            "variable holding it); whoever knows it can run code in the coordinator.",
        ))
    elif "PATH" not in address and isinstance(address.get("HOST", "localhost"), str) \
            and not is_loopback_host(address.get("HOST", "localhost")) and not authkey_is_strong(authkey):
        problems.append(Problem(
            "django_lb_shm.E021",
            f"LOAD_BALANCER['ADDRESS']['HOST'] {address.get('HOST')!r} is not a loopback address and the AUTHKEY "
            f"is weak (needs {MIN_REMOTE_AUTHKEY_LENGTH}+ characters, 10+ distinct).",
            "Bind to 'localhost' or a Unix socket PATH, or use a key from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` (best kept in AUTHKEY_ENV).",
        ))
    return problems


def _check_path(address: Mapping[str, Any]) -> list[Problem]:
    path = address.get("PATH")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isabs(str(path)):
        return [Problem(
            "django_lb_shm.E022",
            f"LOAD_BALANCER['ADDRESS']['PATH'] must be an absolute filesystem path for a Unix socket, got {path!r}.",
            "For example '/run/djangoloadbalancer/lb.sock' (the directory must exist); or use HOST and PORT.",
        )]
    if not os.path.isdir(os.path.dirname(str(path))):
        return [Problem(
            "django_lb_shm.E022",
            f"the directory of LOAD_BALANCER['ADDRESS']['PATH'] {str(path)!r} does not exist.",
            "Create it, owned by the user that runs djangoloadbalancer.",
        )]
    return []


def _check_host_port(address: Mapping[str, Any]) -> list[Problem]:
    problems = []
    host = address.get("HOST", "localhost")
    if not isinstance(host, str) or not host:
        problems.append(Problem(
            "django_lb_shm.E008",
            f"LOAD_BALANCER['ADDRESS']['HOST'] must be a host name or IP address, got {host!r}.",
            "Use 'localhost' unless app servers on other hosts must reach the coordinator.",
        ))
    port = address.get("PORT")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        problems.append(Problem(
            "django_lb_shm.E009",
            f"LOAD_BALANCER['ADDRESS']['PORT'] must be an integer from 1 to 65535, got {port!r}.",
            "Pick a free TCP port, e.g. 6000.",
        ))
    return problems


def _check_models(raw: Mapping[str, Any]) -> list[Problem]:
    """MODELS: a list of app labels and 'app_label.ModelName' strings (E040; E041/E042 need the
    app registry: checks.py)."""
    entries = raw.get("MODELS", ())
    example = "For example 'MODELS': ['auth', 'contenttypes', 'sessions', 'shop.Order']."
    if not isinstance(entries, (list, tuple)):
        return [Problem("django_lb_shm.E040",
                        f"LOAD_BALANCER['MODELS'] must be a list of app labels and 'app_label.ModelName' strings, "
                        f"got {type(entries).__name__} {entries!r}.", example)]
    bad = [e for e in entries if not isinstance(e, str) or not all(e.split(".")) or e.count(".") > 1]
    if bad:
        return [Problem("django_lb_shm.E040",
                        f"LOAD_BALANCER['MODELS'] has entries that are neither an app label nor "
                        f"'app_label.ModelName': {', '.join(map(repr, bad))}.", example)]
    return []


def models_setting(raw: Any) -> tuple[str, ...]:
    """LOAD_BALANCER['MODELS'] of a raw setting, () when it is absent or not valid (E040 says so)."""
    if not isinstance(raw, Mapping) or _check_models(raw):
        return ()
    return tuple(raw.get("MODELS", ()))


def _check_metrics(raw: Mapping[str, Any]) -> list[Problem]:
    """METRICS: absent or None (off), or {'PORT': ..., 'HOST': ...} (E031-E033; E034 is in checks.py)."""
    metrics = raw.get("METRICS")
    if metrics is None:
        return []
    example = "For example {'PORT': 9808} (HOST defaults to '127.0.0.1'), or leave METRICS out: no metrics."
    if not isinstance(metrics, Mapping):
        return [Problem("django_lb_shm.E031",
                        f"LOAD_BALANCER['METRICS'] must be a dict with a PORT and optionally a HOST, got {metrics!r}.",
                        example)]
    problems = []
    unknown = sorted(map(str, set(metrics) - METRICS_KEYS))
    if unknown:
        problems.append(Problem("django_lb_shm.E031",
                                f"LOAD_BALANCER['METRICS'] has unknown keys: {', '.join(unknown)}.",
                                "Its keys are HOST and PORT."))
    return problems + _check_metrics_host(metrics.get("HOST", DEFAULT_METRICS_HOST)) \
        + _check_metrics_port(metrics.get("PORT"), raw.get("ADDRESS"))


def _check_metrics_host(host: Any) -> list[Problem]:
    if isinstance(host, str) and host:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            return []
        except (OSError, UnicodeError):
            problem = f"LOAD_BALANCER['METRICS']['HOST'] {host!r} cannot be resolved to an address."
    else:
        problem = f"LOAD_BALANCER['METRICS']['HOST'] must be a host name or IP address, got {host!r}."
    return [Problem("django_lb_shm.E032", problem,
                    f"Leave it out for {DEFAULT_METRICS_HOST!r} (loopback), or give the address of the interface "
                    "Prometheus scrapes; the metrics have no authentication.")]


def _check_metrics_port(port: Any, address: Any) -> list[Problem]:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        problem = f"LOAD_BALANCER['METRICS']['PORT'] must be an integer from 1 to 65535, got {port!r}."
    elif isinstance(address, Mapping) and "PATH" not in address and address.get("PORT") == port:
        problem = f"LOAD_BALANCER['METRICS']['PORT'] {port} is the coordinator's ADDRESS PORT."
    else:
        return []
    return [Problem("django_lb_shm.E033", problem, "Pick another free TCP port, e.g. 9808.")]


def resolve_authkey(address: Mapping[str, Any]) -> bytes:
    """AUTHKEY from settings, or from the environment variable named by AUTHKEY_ENV."""
    env_name = address.get("AUTHKEY_ENV")
    value = os.environ.get(env_name, "") if isinstance(env_name, str) and env_name else address.get("AUTHKEY")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    return b""


MIN_SENSIBLE_RSS_MB = 100


def _check_numbers(raw: Mapping[str, Any]) -> list[Problem]:
    problems = _check_seconds(raw.get("WAIT_TIME", 2), "['WAIT_TIME']", "django_lb_shm.E007", 2)
    for key, (_default, zero_ok) in NUMERIC_DEFAULTS.items():
        if key not in raw:
            continue
        value = raw[key]
        whole = key not in INTEGER_KEYS or (_is_number(value) and float(value).is_integer())
        if not _is_number(value) or value < 0 or (value == 0 and not zero_ok) or not whole:
            bound = "zero or a positive number" if zero_ok else "a positive number"
            bound = bound if key not in INTEGER_KEYS else bound.replace("number", "integer")
            problems.append(Problem(
                "django_lb_shm.E017",
                f"LOAD_BALANCER[{key!r}] must be {bound}, got {value!r}.",
                f"Remove it to use the default ({NUMERIC_DEFAULTS[key][0]:g}).",
            ))
    rss = raw.get("MAX_RSS_MB", 0)
    if _is_number(rss) and 0 < rss < MIN_SENSIBLE_RSS_MB:
        problems.append(Problem(
            "django_lb_shm.W003",
            f"LOAD_BALANCER['MAX_RSS_MB'] is {rss:g}: a coordinator uses about 50-80 MB once started, so it "
            "would be recycled over and over.",
            f"Use at least {MIN_SENSIBLE_RSS_MB} (or 0, no limit).",
            level="warning",
        ))
    return (problems + _check_choice(raw, "WRITE_ACK", WRITE_ACK_POLICIES, "django_lb_shm.E014",
                                     "acknowledgement policy") + _check_log_level(raw)
            + _check_choice(raw, "READ_PATH", READ_PATHS, "django_lb_shm.E026", "read path")
            + _check_hold_timeout(raw))


def _check_hold_timeout(raw: Mapping[str, Any]) -> list[Problem]:
    hold, client = raw.get("TRANSACTION_HOLD_TIMEOUT"), raw.get("CLIENT_TIMEOUT", NUMERIC_DEFAULTS["CLIENT_TIMEOUT"][0])
    if not (_is_number(hold) and _is_number(client) and 0 < client <= hold):
        return []
    return [Problem(
        "django_lb_shm.W004",
        f"LOAD_BALANCER['TRANSACTION_HOLD_TIMEOUT'] ({hold:g} s) is not under CLIENT_TIMEOUT ({client:g} s): "
        "writers waiting behind a stuck transaction or a hung leader give up (WriteNotApplied) before it is ended.",
        "Leave it out (the smaller of 5 s and CLIENT_TIMEOUT / 2) or make it well under CLIENT_TIMEOUT.",
        level="warning",
    )]


def hold_timeout(raw: Mapping[str, Any], client_timeout: float) -> float:
    """TRANSACTION_HOLD_TIMEOUT, or its default: well under CLIENT_TIMEOUT."""
    if "TRANSACTION_HOLD_TIMEOUT" in raw:
        return float(raw["TRANSACTION_HOLD_TIMEOUT"])
    return min(NUMERIC_DEFAULTS["TRANSACTION_HOLD_TIMEOUT"][0], client_timeout / 2)


def _check_plain_atomic(raw: Mapping[str, Any], django_dbs: Mapping[str, Any]) -> list[Problem]:
    problems = _check_choice(raw, "PLAIN_ATOMIC", PLAIN_ATOMIC_MODES, "django_lb_shm.E043",
                             "mode for load-balanced writes inside a plain transaction.atomic()")
    problems += _check_choice(raw, "COUNT_QUERIES_ON_DEFAULT", COUNT_QUERIES_MODES, "django_lb_shm.E044",
                              "mode for counting load-balanced queries on 'default'")
    if raw.get("PLAIN_ATOMIC", "JOIN") != "JOIN" or raw.get("WRITE_ACK", "FIRST") not in ("QUORUM", "ALL"):
        return problems
    dbs = raw.get("DATABASES")
    entry = django_dbs.get(DEFAULT_DB_ALIAS) if isinstance(dbs, (list, tuple)) and DEFAULT_DB_ALIAS in dbs else None
    if not isinstance(entry, Mapping) or vendor_of(entry.get("ENGINE", "")) != "sqlite":
        return problems
    # The load-balanced part commits first: with WRITE_ACK waiting for the 'default' copy, whose
    # file the block's own direct writes lock until the 'default' commit that comes after it.
    return problems + [Problem(
        "django_lb_shm.W042",
        f"LOAD_BALANCER['WRITE_ACK'] is {raw.get('WRITE_ACK')!r} and the SQLite database 'default' is one of the "
        "load-balanced copies: a plain transaction.atomic() block that writes both load-balanced models and "
        "other models on 'default' waits up to CLIENT_TIMEOUT at its commit (the copy 'default' cannot apply the "
        "load-balanced commit while the block holds its file's write lock).",
        "Use WRITE_ACK 'FIRST', keep plain models off the load-balanced 'default' in such blocks, or set "
        "PLAIN_ATOMIC 'AUTOCOMMIT'.",
        level="warning",
    )]


def _check_log_level(raw: Mapping[str, Any]) -> list[Problem]:
    level = raw.get("LOG_LEVEL", "INFO")
    if isinstance(level, str) and isinstance(logging.getLevelName(level.upper()), int):
        return []
    return [Problem("django_lb_shm.E025", f"LOAD_BALANCER['LOG_LEVEL'] is {level!r}, not a logging level name.",
                    "Use one of DEBUG, INFO, WARNING, ERROR, CRITICAL.")]


def _check_seconds(value: Any, key: str, check_id: str, example: float) -> list[Problem]:
    """A required-positive number of seconds."""
    if _is_number(value) and value > 0:
        return []
    name = key.strip("[]'").split("']['")[-1]
    return [Problem(check_id, f"LOAD_BALANCER{key} must be a positive number of seconds, got {value!r}.",
                    f"For example '{name}': {example:g}.")]


def _check_choice(raw: Mapping[str, Any], key: str, choices: tuple, check_id: str, what: str) -> list[Problem]:
    """An optional key whose value must be one of ``choices`` (the first is the default)."""
    value = raw.get(key, choices[0])
    if value in choices:
        return []
    return [Problem(check_id, f"LOAD_BALANCER[{key!r}] is {value!r}, not a known {what}.",
                    f"Use one of: {', '.join(choices)}.")]


def _check_alias(raw: Mapping[str, Any], django_dbs: Mapping[str, Any]) -> list[Problem]:
    alias = raw.get("ALIAS", DEFAULT_ALIAS)
    if not isinstance(alias, str) or not alias:
        return [Problem("django_lb_shm.E016", f"LOAD_BALANCER['ALIAS'] must be a non-empty string, got {alias!r}.",
                        f"Remove it to use the default {DEFAULT_ALIAS!r}.")]
    if alias in django_dbs:
        return [Problem(
            "django_lb_shm.E016",
            f"LOAD_BALANCER['ALIAS'] {alias!r} is already a database in settings.DATABASES.",
            "The alias names the virtual load-balanced connection; choose a name not in settings.DATABASES.",
        )]
    return []


def find_problems(raw: Any, django_dbs: Mapping[str, Any]) -> list[Problem]:
    """Every problem with a LOAD_BALANCER value; empty when it is valid."""
    if raw is None:
        return [Problem(
            "django_lb_shm.E001",
            "settings.LOAD_BALANCER is not defined.",
            "Add LOAD_BALANCER = {'DATABASES': [...], 'ADDRESS': {...}, ...} to settings.py "
            "(see the django_lb_shm README).",
        )]
    if not isinstance(raw, Mapping):
        return [Problem("django_lb_shm.E001", f"settings.LOAD_BALANCER must be a dict, got {type(raw).__name__}.",
                        "See the django_lb_shm README for an example.")]
    problems = (
        _check_databases(raw, django_dbs)
        + _check_algorithms(raw)
        + _check_address(raw)
        + _check_numbers(raw)
        + _check_alias(raw, django_dbs)
        + _check_metrics(raw)
        + _check_models(raw)
        + _check_plain_atomic(raw, django_dbs)
    )
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        problems.append(Problem(
            "django_lb_shm.W001",
            f"LOAD_BALANCER has unknown keys: {', '.join(unknown)}.",
            f"Known keys: {', '.join(sorted(KNOWN_KEYS))}.",
            level="warning",
        ))
    return problems


