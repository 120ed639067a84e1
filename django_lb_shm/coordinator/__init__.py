"""The coordinator: the manager process, one per host.

process (life cycle) -> server (the Manager server at ADDRESS) -> router (one request) ->
sequencer (the global write order, group commit) -> journal (the record that decides every
write) and db_thread (one thread per database).  A write goes down that list and its answer
comes back up; nothing lower imports what is above it (tests/test_layering.py).
"""
