#!/usr/bin/env python3
"""The seed README's name of the launcher (`python3 venv/bin/djangoloadbalancer.py`): runs `djangoloadbalancer`."""
import sys

from django_lb_shm.cli import main

if __name__ == "__main__":
    sys.exit(main())
