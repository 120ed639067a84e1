#!/usr/bin/env bash
# The demo: the example Django project (example/) on five SQLite copies of one
# database, load balanced by django_lb_shm.  On a fresh Debian 12 machine, as root:
#
#     bash scripts/demo.sh
#
#   1. installs what it needs (scripts/install.sh: pip install -e '.[test]' into the
#      checkout's own virtual environment, .venv/, never into the system interpreter);
#   2. recreates example/run/ and migrates all five databases;
#   3. starts the coordinator (`djangoloadbalancer`) in the background;
#   4. runs a workload of creates/updates/deletes/reads from several app processes;
#   5. prints `djangoloadbalancer status` and shows that the five databases hold
#      identical rows;
#   6. prints a few lines of the supervisor's Prometheus metrics (http://127.0.0.1:PORT/metrics);
#   7. stops the coordinator with SIGTERM and shows that it exited 0.
#
# Exits non-zero if any step fails.  Env: DEMO_LB_PORT (default 6000, or a free
# port when 6000 is taken), DEMO_METRICS_PORT (9808, or a free port), DEMO_PROCESSES (4),
# DEMO_OPS (50 per process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd -P)"
VENV="${LB_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"   # made by scripts/install.sh
T0=${EPOCHREALTIME/./}
LB_PID=""

step() {
    local us=$(( ${EPOCHREALTIME/./} - T0 ))
    printf '\n=== [%3d.%d s] %s\n' $((us / 1000000)) $((us / 100000 % 10)) "$*"
}
die() { echo "[demo] ERROR: $*" >&2; exit 1; }

stop_coordinator() {
    # SIGTERM by pid, then wait for it; prints and returns its exit status.
    local pid=$LB_PID rc=0
    LB_PID=""
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    echo "djangoloadbalancer (pid $pid) exited with status $rc"
    return "$rc"
}
on_exit() {
    local rc=$?
    if [ -n "$LB_PID" ]; then
        echo "[demo] stopping the coordinator (pid $LB_PID)" >&2
        stop_coordinator >&2 || true
    fi
    if [ "$rc" -ne 0 ]; then
        echo "[demo] FAILED (exit $rc); coordinator log: $REPO/example/run/coordinator.log" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "install (scripts/install.sh)"
bash scripts/install.sh

export PATH="$VENV/bin:$PATH"
LB=("$VENV/bin/djangoloadbalancer")   # the console script pip made in .venv/

cd example
export PYTHONUNBUFFERED=1
port_or_free() {
    # $1 if it is free on 127.0.0.1, else a free port; $2: one the caller already took
    "$PY" - "$@" <<'PYEOF'
import socket, sys
def free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator's listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
wanted, taken = int(sys.argv[1]), sys.argv[2:]
if free(wanted) and str(wanted) not in taken:
    print(wanted)
else:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
PYEOF
}
DEMO_LB_PORT=${DEMO_LB_PORT:-$(port_or_free 6000)}
DEMO_METRICS_PORT=${DEMO_METRICS_PORT:-$(port_or_free 9808 "$DEMO_LB_PORT")}
export DEMO_LB_PORT DEMO_METRICS_PORT

step "fresh databases: example/run/ (5 SQLite files), djangoloadbalancer migrate"
rm -rf run
mkdir run
"${LB[@]}" migrate >run/migrate.log 2>&1 || { cat run/migrate.log >&2; die "djangoloadbalancer migrate failed"; }
awk '/^== migrating/ { if (db) print db " (" n " migrations applied)"; db = $0; n = 0 }
     /Applying/ { n++ }
     END { print db " (" n " migrations applied)" }' run/migrate.log

step "start djangoloadbalancer in the background (port $DEMO_LB_PORT, metrics on $DEMO_METRICS_PORT)"
"${LB[@]}" >run/coordinator.log 2>&1 &
LB_PID=$!
echo "supervisor pid $LB_PID, log example/run/coordinator.log"
deadline=$((SECONDS + 60))
# `timeout`: a foreign program listening on the port would never answer the handshake.
until timeout 15 "${LB[@]}" status >/dev/null 2>&1; do
    kill -0 "$LB_PID" 2>/dev/null || { cat run/coordinator.log >&2; die "djangoloadbalancer exited during start-up"; }
    [ "$SECONDS" -lt "$deadline" ] || { cat run/coordinator.log >&2; die "djangoloadbalancer status did not answer within 60 s"; }
    sleep 0.3
done
grep -E 'ready at|metrics at' run/coordinator.log | sed 's/^/  log: /'

step "workload: ${DEMO_PROCESSES:-4} app processes x ${DEMO_OPS:-50} operations"
"$PY" manage.py demo_workload --processes "${DEMO_PROCESSES:-4}" --ops "${DEMO_OPS:-50}"

step "copies in sync? (demo_compare: coordinator counters, then direct connections to each database)"
"$PY" manage.py demo_compare

step "djangoloadbalancer status"
"${LB[@]}" status

if "$PY" -c 'import django_lb_shm.ops.verify' 2>/dev/null; then
    step "djangoloadbalancer verify"
    "${LB[@]}" verify --no-progress
fi

step "metrics: a few lines of http://127.0.0.1:$DEMO_METRICS_PORT/metrics (served by the supervisor)"
"$PY" - "$DEMO_METRICS_PORT" <<'PYEOF' || die "the supervisor's /metrics did not answer as expected"
import re, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10) as response:
    text = response.read().decode()
shown = re.compile(r"django_lb_shm_(coordinator_up|coordinator_restarts_total|journal_bytes|database_up"
                   r"|reads_total|writes_total|pending_writes|read_latency_seconds)[ {]")
lines = [line for line in text.splitlines() if shown.match(line) and not re.search(r'database="DB[2-9]"', line)]
print("\n".join(lines))
print(f"... ({len(text.splitlines())} lines in all, with DB2-DB4, states, errors, sequences)")
sys.exit(0 if "django_lb_shm_coordinator_up 1.0" in lines else 1)
PYEOF

step "stop the coordinator (SIGTERM)"
rc=0
stop_coordinator || rc=$?
grep -E 'received SIGTERM|coordinator pid [0-9]+ stopped' run/coordinator.log | sed 's/^/  log: /'
[ "$rc" -eq 0 ] || die "djangoloadbalancer exited with status $rc, expected 0"

step "demo passed"
