#!/usr/bin/env bash
# Developer entry point; works on a fresh machine with only python3 (>= 3.11) installed.
#
#   ./dev.sh run   [keyledger serve args]   start the service (embedded PostgreSQL/NATS
#                                           unless DATABASE_URL / NATS_URL are set)
#   ./dev.sh test  [pytest args]            run the test-suite
#   ./dev.sh bench [bench args]             run the benchmark (bench/run.py)
#
# The venv is created on first use and the project reinstalled only when pyproject.toml
# changed since the last install (a stamp file in .venv holds its hash), so repeated
# runs start immediately.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.keyledger-install-stamp"

usage() {
    sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

setup() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "dev.sh: creating $VENV with $PYTHON" >&2
        "$PYTHON" - <<'PY' || { echo "dev.sh: Python >= 3.11 required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
        "$PYTHON" -m venv "$VENV"
        rm -f "$STAMP"
    fi
    local want have=""
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    if [[ "$want" != "$have" || ! -x "$VENV/bin/keyledger" ]]; then
        echo "dev.sh: installing keyledger and its test dependencies into $VENV" >&2
        "$VENV/bin/python" -m pip install -q -e '.[test]'
        echo "$want" > "$STAMP"
    fi
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift

case "$cmd" in
    run)
        setup
        exec "$VENV/bin/keyledger" serve "$@"
        ;;
    test)
        setup
        rc=0
        "$VENV/bin/python" -m pytest "$@" || rc=$?
        if [[ $rc -eq 5 ]]; then
            echo "dev.sh: pytest collected no tests -- treating as failure (an empty run is not green)" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    *)
        usage
        ;;
esac
