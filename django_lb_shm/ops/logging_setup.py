"""Logging defaults of the ``djangoloadbalancer`` processes (cli.py's, and the manager process)."""
from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    """A default handler for django_lb_shm's loggers when the project configured none."""
    root = logging.getLogger("django_lb_shm")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(processName)s %(process)d] %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
