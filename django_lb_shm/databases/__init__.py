"""What every process knows about the copies: failures (down or wrong?), probes, ownership
(one coordinator per database) and schema (applied migrations across copies).
"""
