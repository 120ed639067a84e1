"""The shared-memory segment: per-copy state, counters and latency, readable by every process
on the host.  It depends on nothing in the package but errors.
"""
