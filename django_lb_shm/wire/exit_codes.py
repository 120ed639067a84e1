"""Every exit status of the package, in one place.

Two families share the numbers:

* what ``djangoloadbalancer <subcommand>`` returns to a shell or a monitor (``--help`` of
  each subcommand and README's "How to use" list them): 0 is success, 2 is always invalid
  settings or arguments (as argparse's own usage error), and each subcommand's other codes
  mean one thing in that subcommand;
* what the coordinator process returns to its supervisor (``COORDINATOR_EXITS``): a protocol
  between the two processes; only EXIT_OK, EXIT_CONFIG_ERROR and EXIT_BOOT_ERROR reach the shell,
  as the exit status of ``run``.
"""
from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2    # invalid settings (every subcommand); for the coordinator: never restart it
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE   # what a shell reports for a tool whose reader went away

# `run` (and the coordinator process to its supervisor)
EXIT_BOOT_ERROR = 3      # could not boot (journal unusable, databases claimed...): never restart
EXIT_ORPHANED = 4        # supervisor went away; not restarted (nobody left to restart it)
EXIT_RESTART = 5         # the coordinator asks to be restarted (its journal must be read again)
EXIT_ADDRESS_IN_USE = 6  # ADDRESS is taken: a boot error at the first boot, retried with backoff after it
EXIT_RELOAD = 7          # LOAD_BALANCER['DATABASES'] changed: the supervisor starts over with the new settings

COORDINATOR_EXITS = {
    EXIT_OK: "stopped",
    EXIT_CONFIG_ERROR: "invalid settings",
    EXIT_BOOT_ERROR: "boot error",
    EXIT_ORPHANED: "orphaned",
    EXIT_RESTART: "restart requested",
    EXIT_ADDRESS_IN_USE: "address in use",
    EXIT_RELOAD: "the databases changed",
}

# `status` (README: 0/1/2/3 are for monitors and stay)
EXIT_UNAVAILABLE = 1     # no coordinator answers
EXIT_DEGRADED = 3        # the coordinator answers, but a copy is not RUNNING (or it is not READY)

# `migrate`
EXIT_MIGRATE_FAILED = 1  # a database could not be migrated

# `verify`
EXIT_IDENTICAL = 0
EXIT_DIFFERENT = 1
EXIT_UNREADABLE = 4      # a database could not be read (2 until 2026-12: it said "invalid settings" elsewhere)

# `resync`
EXIT_RESYNCED = 0
EXIT_RESYNC_FAILED = 1
EXIT_RESYNC_USAGE = 2    # bad arguments (an unknown alias, a bad --chunk-size...)
