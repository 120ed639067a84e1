"""What crosses between processes: query descriptors, the Manager protocol, exit codes.

Every use of a private name of multiprocessing is in mp_private.  Both sides import from here;
nothing here imports the client, the coordinator or the supervisor.
"""
