#!/usr/bin/env python3
"""The seed README's name of the launcher (`python3 venv/bin/djangoloadbalancer.py`): runs `djangoloadbalancer`."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "djangoloadbalancer"), run_name="__main__")
