"""The supervisor: the djangoloadbalancer foreground process that spawns, watches and restarts
the coordinator (the manager process), and serves metrics.
"""
