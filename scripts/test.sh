#!/usr/bin/env bash
# The one test command (README and CI): set up, then run the whole suite
# against SQLite and against PostgreSQL.  Extra arguments go to both pytest runs,
# e.g.  scripts/test.sh -x -k journal
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
# Everything runs from the checkout's own environment (.venv/, made by install.sh): the
# coordinators the tests start use the same interpreter (sys.executable), and its bin/
# comes first on PATH for the `djangoloadbalancer` launcher.
VENV="${LB_VENV:-$(pwd -P)/.venv}"
export PATH="$VENV/bin:$PATH" LB_TEST_VENV="$VENV"

declare -A rc=()
for backend in sqlite postgres; do
    echo
    echo "=== pytest: LB_TEST_BACKEND=$backend ==="
    set +e
    LB_TEST_BACKEND="$backend" "$VENV/bin/python" -m pytest tests -p no:cacheprovider "$@"
    rc[$backend]=$?
    set -e
done

summary=""
status=0
for backend in sqlite postgres; do
    code=${rc[$backend]}
    case "$code" in
        0) word="passed" ;;
        5) word="FAILED (no tests collected)" ;;
        *) word="FAILED (exit $code)" ;;
    esac
    [ "$code" -eq 0 ] || status=1
    summary+="$backend: $word; "
done
echo
if [ "$status" -eq 0 ]; then
    echo "=== SUMMARY: ${summary%; } -> ALL PASSED ==="
else
    echo "=== SUMMARY: ${summary%; } -> FAILED ==="
fi
exit "$status"
