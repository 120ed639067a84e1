"""Operator tools run from the command line: verify, and the logging set-up of the processes.
"""
