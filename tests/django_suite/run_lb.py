"""Run Django's tests/runtests.py with 'django_lb_shm' installed.

runtests.py sets INSTALLED_APPS itself (ALWAYS_INSTALLED_APPS + the chosen test apps), after
the settings module is read; this adds the package to that list and runs the script as is.
Usage: python run_lb.py <django>/tests/runtests.py [runtests.py arguments]
"""
import os
import sys

MARK = "ALWAYS_INSTALLED_APPS = ["


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        source = f.read()
    if source.count(MARK) != 1:
        sys.exit(f"run_lb.py: {path} has no single {MARK!r} line; this Django version's runtests.py "
                 "is laid out differently: update run_lb.py")
    source = source.replace(MARK, MARK + '"django_lb_shm", ')
    sys.argv = [path] + sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))   # as when runtests.py is run itself
    exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})


if __name__ == "__main__":
    main()
