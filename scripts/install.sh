#!/usr/bin/env bash
# Idempotent set-up for the test suite on Debian 12 (run as root on a fresh
# machine; also fine when everything is already installed, and needs no TTY):
#   1. PostgreSQL server binaries (apt package "postgresql") if no initdb exists;
#   2. runuser (util-linux), and a virtual environment of the checkout's own,
#      .venv/ (python3 -m venv; Debian's python3-venv if venv is missing);
#   3. this package in editable mode with its test extras, into .venv/ — never into
#      the system interpreter.  Scripts use .venv/bin/python; so can you:
#      `. .venv/bin/activate`, or `.venv/bin/djangoloadbalancer`.
# Debian's package may create and start a cluster "main" on port 5432: it is
# left alone; the tests run their own servers on free ports.
# Env: LB_FORCE_INSTALL=1 re-runs pip even if nothing changed; PYTHON (default python3)
# is the interpreter the environment is made from; LB_VENV (default .venv) its directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd -P)"
export DEBIAN_FRONTEND=noninteractive
BASE_PY="${PYTHON:-python3}"
VENV="${LB_VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"

log() { echo "[install] $*"; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n env DEBIAN_FRONTEND=noninteractive "$@"
    else
        die "need root to run: $* (re-run this script as root)"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >/dev/null
}

# -- 1. PostgreSQL server binaries -------------------------------------------
if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    log "PostgreSQL present: $(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)"
else
    apt_install postgresql
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
        || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
    log "PostgreSQL installed: $(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)"
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    die "no 'postgres' OS user (normally created by the postgresql-common package)"
fi

# -- 2. runuser and the virtual environment -----------------------------------
if ! command -v runuser >/dev/null 2>&1 && [ ! -x /usr/sbin/runuser ] && [ ! -x /sbin/runuser ]; then
    apt_install util-linux
fi
if [ ! -x "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    if ! "$BASE_PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    log "python virtual environment: $VENV (from $("$BASE_PY" -c 'import sys; print(sys.executable)'))"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
fi

# -- 3. the package and its test dependencies --------------------------------
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
cache_dir="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/django_lb_shm"
stamp="$cache_dir/install-$(printf '%s' "$REPO_ROOT" | sha1sum | cut -c1-12).stamp"
want="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

installed_here() {
    # Editable install points at this checkout and every test dependency imports.
    (cd / && "$PY" - "$REPO_ROOT" <<'PYEOF'
import importlib.util, os, sys
repo = os.path.realpath(sys.argv[1])
spec = importlib.util.find_spec("django_lb_shm")
if spec is None or not os.path.realpath(spec.origin or "").startswith(repo + os.sep):
    sys.exit(1)
for mod in ("django", "cloudpickle", "psutil", "pytest", "pytest_timeout", "hypothesis", "psycopg", "prometheus_client", "wheel"):
    if importlib.util.find_spec(mod) is None:
        sys.exit(1)
PYEOF
    ) >/dev/null 2>&1
}

if [ "${LB_FORCE_INSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed_here; then
    log "python package already installed (editable, setup.py and pyproject.toml unchanged)"
else
    log "pip install -e '.[test]'"
    "$PY" -m pip install -q -e '.[test]'
    installed_here || die "pip install finished but django_lb_shm/test deps are not importable from $REPO_ROOT"
    mkdir -p "$cache_dir" && printf '%s' "$want" > "$stamp" || true
fi
log "done"
