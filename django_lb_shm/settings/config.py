"""settings.LOAD_BALANCER, validated and frozen into a ``LoadBalancerConfig``.

Settings are read on demand, never at import time.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from django_lb_shm.errors import ConfigurationError
from django_lb_shm.settings.validation import (
    DEFAULT_ALIAS,
    DEFAULT_METRICS_HOST,
    INTEGER_KEYS,
    NUMERIC_DEFAULTS,
    SETTING_NAME,
    find_problems,
    hold_timeout,
    is_loopback_host,
    resolve_authkey,
    vendor_of,
)


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    authkey: bytes = field(repr=False)
    path: str = ""   # a Unix socket instead of TCP
    local_socket: bool = True   # loopback TCP: also serve same-host clients on a private Unix socket

    @property
    def tuple(self) -> Any:
        """What multiprocessing.connection takes: (host, port), or the socket's path."""
        return self.path or (self.host, self.port)

    @property
    def is_loopback(self) -> bool:
        return bool(self.path) or is_loopback_host(self.host)

    @property
    def local_socket_path(self) -> str:
        """The same-host Unix socket next to a loopback TCP address ('' when there is none)."""
        if self.path or not self.local_socket or not self.is_loopback:
            return ""
        # settings.py may import this module: it stays light
        from django_lb_shm.wire.protocol import local_socket_path

        return local_socket_path(self.host, self.port)

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MetricsConfig:
    """Where the supervisor serves Prometheus metrics (``LOAD_BALANCER['METRICS']``)."""

    port: int
    host: str = DEFAULT_METRICS_HOST

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


@dataclass(frozen=True)
class ReadAlgorithmConfig:
    name: str
    interval: float = 5.0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadBalancerConfig:
    databases: tuple[str, ...]
    address: Address
    read_algorithm: ReadAlgorithmConfig
    cud_algorithm: str = "MULTITHREADING"
    wait_time: float = 2.0
    alias: str = DEFAULT_ALIAS
    journal_dir: str = ""
    journal_fsync: bool = True
    legacy_journal_dirs: tuple[str, ...] = ()   # older defaults of JOURNAL_DIR, imported into a new journal
    write_ack: str = "FIRST"
    client_timeout: float = 30.0
    connect_timeout: float = 5.0
    heartbeat_timeout: float = 15.0
    graceful_timeout: float = 10.0
    max_rss_mb: float = 0.0
    max_request_bytes: int = 64 * 1024 * 1024
    statement_timeout: float = 0.0
    read_timeout: float = 0.0
    read_connections: int = 4
    log_level: str = "INFO"
    read_path: str = "AUTO"
    plain_atomic: str = "JOIN"
    count_queries_on_default: str = "TESTS"
    transaction_hold_timeout: float = 5.0
    metrics: Optional[MetricsConfig] = None   # None: no metrics served

    @property
    def database_answer_timeout(self) -> float:
        """How long one database may take to answer a read before the copy is probed."""
        return self.read_timeout or self.client_timeout / 2

    @property
    def probe_timeout(self) -> float:
        """How long a copy may take to answer a probe (``SELECT 1`` on a connection of its own)."""
        return min(2.0, max(1.0, self.database_answer_timeout))

    @property
    def probe_every(self) -> float:
        """How often each copy that is not DOWN is probed."""
        return max(1.0, self.wait_time)


def metrics_config(raw: Any) -> Optional[MetricsConfig]:
    """The METRICS setting of a valid LOAD_BALANCER (None: off)."""
    if raw is None:
        return None
    return MetricsConfig(port=int(raw["PORT"]), host=str(raw.get("HOST", DEFAULT_METRICS_HOST)))


def _journal_base_dir() -> str:
    from django.conf import settings

    base = getattr(settings, "BASE_DIR", None) or os.getcwd()
    return str(Path(base) / ".loadbalancer-journal")


def _default_journal_dir(aliases: Any, django_dbs: Mapping[str, Any]) -> str:
    """Named after the databases it numbers writes for (their vendor and NAME), not after the
    coordinator's ADDRESS: moving the coordinator to another port keeps its journal."""
    identities = [[alias, vendor_of(django_dbs[alias].get("ENGINE", "")), str(django_dbs[alias].get("NAME", ""))]
                  for alias in aliases]
    key = zlib.crc32(repr(identities).encode())
    return str(Path(_journal_base_dir()) / f"databases-{key:08x}")


def database_identity(alias: str) -> list:
    """What app and coordinator must agree on for ``alias``: its vendor and database NAME
    (HOST and PORT may differ: a proxy, another route to the same server)."""
    from django.conf import settings

    entry = settings.DATABASES[alias]
    return [vendor_of(entry["ENGINE"]), str(entry.get("NAME", ""))]


def _legacy_journal_dir(address: Address) -> str:
    """JOURNAL_DIR's default before it named the databases: one directory per address."""
    # not at module top: settings.py may import this module, and shm.state brings multiprocessing.shared_memory
    from django_lb_shm.shm.state import address_key

    return _journal_base_dir() + os.sep + address_key(address)


def build_config(raw: Any, django_dbs: Mapping[str, Any]) -> LoadBalancerConfig:
    """A frozen config from a raw LOAD_BALANCER dict; ConfigurationError if invalid."""
    errors = [p for p in find_problems(raw, django_dbs) if p.level == "error"]
    if errors:
        raise ConfigurationError(
            "Invalid settings.LOAD_BALANCER:\n" + "\n".join(f"  {p.id}: {p.msg} HINT: {p.hint}" for p in errors)
        )
    address_raw = raw["ADDRESS"]
    address = Address(
        host=str(address_raw.get("HOST", "localhost")),
        port=int(address_raw.get("PORT") or 0),
        authkey=resolve_authkey(address_raw),
        path=str(address_raw.get("PATH") or ""),
        local_socket=bool(address_raw.get("LOCAL_SOCKET", True)),
    )
    r_raw = dict(raw.get("R_ALGORITHM", {"NAME": "ROUND_ROBIN"}))
    read_algorithm = ReadAlgorithmConfig(
        name=r_raw.pop("NAME"), interval=float(r_raw.pop("INTERVAL", 5)), options=r_raw
    )
    numbers = {key.lower(): raw.get(key, default) for key, (default, _z) in NUMERIC_DEFAULTS.items()}
    for key in INTEGER_KEYS:
        numbers[key.lower()] = int(numbers[key.lower()])
    numbers["transaction_hold_timeout"] = hold_timeout(raw, float(numbers["client_timeout"]))
    return LoadBalancerConfig(
        databases=tuple(raw["DATABASES"]),
        address=address,
        read_algorithm=read_algorithm,
        cud_algorithm=raw.get("CUD_ALGORITHM", "MULTITHREADING"),
        wait_time=float(raw.get("WAIT_TIME", 2)),
        alias=raw.get("ALIAS", DEFAULT_ALIAS),
        journal_dir=str(raw.get("JOURNAL_DIR") or _default_journal_dir(raw["DATABASES"], django_dbs)),
        legacy_journal_dirs=() if raw.get("JOURNAL_DIR") else (_legacy_journal_dir(address),),
        journal_fsync=bool(raw.get("JOURNAL_FSYNC", True)),
        write_ack=raw.get("WRITE_ACK", "FIRST"),
        log_level=str(raw.get("LOG_LEVEL", "INFO")).upper(),
        read_path=raw.get("READ_PATH", "AUTO"),
        plain_atomic=raw.get("PLAIN_ATOMIC", "JOIN"),
        count_queries_on_default=raw.get("COUNT_QUERIES_ON_DEFAULT", "TESTS"),
        metrics=metrics_config(raw.get("METRICS")),
        **numbers,
    )


_cached: list = [object(), None]  # [raw LOAD_BALANCER value, its config]
_settings: list = [None]          # django.conf.settings


def get_config() -> LoadBalancerConfig:
    """The validated LOAD_BALANCER of the current Django settings (rebuilt when the setting changes)."""
    settings = _settings[0]
    if settings is None:   # imported on first use (never at import time), then kept: this runs per query
        from django.conf import settings

        _settings[0] = settings
    raw = getattr(settings, SETTING_NAME, None)
    if _cached[0] is not raw:
        _cached[1] = build_config(raw, settings.DATABASES)
        _cached[0] = raw
    return _cached[1]


