#!/usr/bin/env bash
# The Django-suite bar (issue 19): Django's own tests/runtests.py for 19 ORM apps, plain and
# with every model of those apps load-balanced (LOAD_BALANCER['MODELS']) over 3 SQLite files
# with LoadBalancerTestRunner; prints the per-app comparison and fails if `verify` finds the
# copies different at the end of the load-balanced run.
#
#   tests/django_suite/run.sh [app ...]      (default: the 19 apps)
#
# Environment: DJSUITE_BACKEND (sqlite, the default, or postgres: three throw-away PostgreSQL
# servers on 127.0.0.1, tests/support/pg_cluster.py), DJSUITE_CACHE (sdist cache, default
# ~/.cache/django_lb_shm/django_suite),
# DJSUITE_OUT (logs and results, default ./django_suite_out), DJSUITE_TIMEOUT (seconds per
# run, default 2400), DJSUITE_MIN_RATIO (fail below this percentage, e.g. 98; default 0),
# PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${DJSUITE_CACHE:-$HOME/.cache/django_lb_shm/django_suite}"
OUT="$(mkdir -p "${DJSUITE_OUT:-$PWD/django_suite_out}" && cd "${DJSUITE_OUT:-$PWD/django_suite_out}" && pwd)"
TIMEOUT="${DJSUITE_TIMEOUT:-2400}"
APPS="${*:-basic lookup queries aggregation expressions update delete get_or_create bulk_create many_to_one
many_to_many one_to_one model_inheritance select_related prefetch_related ordering custom_managers transactions
annotations}"
APPS="$(echo $APPS)"

if [ "${DJSUITE_BACKEND:-sqlite}" = postgres ] && [ -z "${DJSUITE_DATABASES:-}" ]; then
    # Both runs on the same servers, stopped and removed afterwards.
    exec env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$HERE/with_postgres.py" \
        "$((2 * TIMEOUT + 300))" "$0" "$@"
fi

VERSION="$(cd "$REPO" && PYTHONPATH="$REPO" "$PYTHON" -c 'import django; print(django.get_version())')"
SRC="$CACHE/django-$VERSION"
if [ ! -f "$SRC/tests/runtests.py" ]; then
    mkdir -p "$CACHE"
    "$PYTHON" -m pip download "django==$VERSION" --no-deps --no-binary :all: -d "$CACHE" -q
    tar -xzf "$CACHE/django-$VERSION.tar.gz" -C "$CACHE"
fi
[ -f "$SRC/tests/runtests.py" ] || { echo "run.sh: no $SRC/tests/runtests.py after extracting the sdist" >&2; exit 2; }

run() {   # run <name> <settings module> <runtests command...>
    local name="$1" settings="$2"; shift 2
    echo "== $name run of Django $VERSION's tests: $APPS (log: $OUT/$name.log)"
    local start=$SECONDS rc=0
    (cd "$SRC/tests" && \
        DJSUITE_RESULTS="$OUT/$name.json" DJSUITE_APPS="$APPS" DJSUITE_WORK="$OUT/work-$name" \
        PYTHONPATH="$HERE:$REPO:$SRC/tests${PYTHONPATH:+:$PYTHONPATH}" \
        timeout --kill-after=30 "$TIMEOUT" "$@" --settings="$settings" --parallel 1 -v 2 --noinput $APPS \
        >"$OUT/$name.log" 2>&1) || rc=$?
    echo "   exit $rc after $((SECONDS - start)) s; $(grep -E '^(Ran|OK|FAILED)' "$OUT/$name.log" | tr '\n' ' ')"
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || { echo "run.sh: the $name run hit the ${TIMEOUT}s timeout" >&2; exit 2; }
}

rm -f "$OUT/plain.json" "$OUT/lb.json"
run plain djsuite_plain_settings "$PYTHON" runtests.py
run lb djsuite_lb_settings "$PYTHON" "$HERE/run_lb.py" "$SRC/tests/runtests.py"
"$PYTHON" "$HERE/compare.py" "$OUT/plain.json" "$OUT/lb.json" $APPS | tee "$OUT/comparison.txt"
