"""The app side: what runs inside every Django process that uses the load-balanced alias.

connection (the per-process link to the coordinator), session (the DB-API session and cursors
behind the virtual connection), statements (what a statement is), transaction (its state
machine), reads (zero-hop reads routed by shared memory), breaker (fail fast when the
coordinator is gone), determinism (clock and random values fixed before a write is sent).
Nothing here imports the coordinator or the supervisor.
"""
