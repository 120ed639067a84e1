"""settings.LOAD_BALANCER: validation (its keys and checks), config (frozen), overrides (from
the test runner).
"""
