#!/usr/bin/env bash
# Developer entry point; works on a fresh machine with only python3 (>= 3.11) installed.
#
#   ./dev.sh run   [keyledger serve args]   start the service (embedded PostgreSQL/NATS
#                                           unless DATABASE_URL / NATS_URL are set)
#   ./dev.sh test  [pytest args]            run the test-suite (and the TypeScript client's, on a whole run)
#   ./dev.sh test-stress [N] [pytest args]  run the suite N times (default 5) on a machine kept busy
#   ./dev.sh bench [bench args]             run the benchmark (bench/run.py)
#   ./dev.sh cluster [dev-cluster args]     a local 3-node NATS cluster, PostgreSQL and two service processes
#
# The venv is created on first use and the project reinstalled only when pyproject.toml
# changed since the last install (a stamp file in .venv holds its hash), so repeated
# runs start immediately.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.keyledger-install-stamp"
EXTRAS="server,embedded,test"  # the service, its embedded servers and the test-suite (pyproject.toml's extras)

usage() {
    sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//' >&2
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
    # the stamp covers what is installed: pyproject.toml and the extras asked for
    want="$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    if [[ "$want" != "$have" || ! -x "$VENV/bin/keyledger" ]]; then
        echo "dev.sh: installing keyledger with its $EXTRAS dependencies into $VENV" >&2
        "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
        echo "$want" > "$STAMP"
    fi
}

# The flake hunt (docs/testing.md): the whole suite RUNS times while two busy loops, at normal priority,
# compete with it for the two cores, then every test that failed at least once, with its count. The load
# generators are this script's own children, stopped by their pids on exit.
stress() {
    local runs="$1"
    shift
    local out
    out="$(mktemp -d "${TMPDIR:-/tmp}/keyledger-stress.XXXXXX")"
    HOGS=()
    stop_hogs() {
        local pid
        for pid in ${HOGS[@]+"${HOGS[@]}"}; do
            kill "$pid" 2>/dev/null || true
        done
        for pid in ${HOGS[@]+"${HOGS[@]}"}; do
            wait "$pid" 2>/dev/null || true
        done
        HOGS=()
    }
    trap stop_hogs EXIT
    trap 'stop_hogs; exit 130' INT TERM
    local i
    for i in 1 2; do
        "$VENV/bin/python" -c "while True: pass" &
        HOGS+=("$!")
    done
    echo "dev.sh: stress: ${runs} runs of the suite beside ${#HOGS[@]} busy loops (pids ${HOGS[*]}); reports in $out" >&2
    local started rc=0 run_rc
    started=$(date +%s)
    for ((i = 1; i <= runs; i++)); do
        local run_started=$(date +%s)
        run_rc=0
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$out/run-$i.xml" "$@" \
            > "$out/run-$i.log" 2>&1 || run_rc=$?
        echo "dev.sh: stress: run $i/$runs: exit $run_rc in $(( $(date +%s) - run_started )) s: $(tail -n 1 "$out/run-$i.log")" >&2
        [[ $run_rc -ne 0 ]] && rc=1
    done
    stop_hogs
    echo "dev.sh: stress: $runs runs in $(( $(date +%s) - started )) s" >&2
    "$VENV/bin/python" - "$out" "$runs" <<'PY' || rc=1
import collections, pathlib, sys
import xml.etree.ElementTree as ET

out, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
failed, seen = collections.Counter(), 0
for report in sorted(out.glob("run-*.xml")):
    for case in ET.parse(report).iter("testcase"):
        seen += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed[f"{case.get('classname')}::{case.get('name')}"] += 1
missing = runs - len(list(out.glob("run-*.xml")))
print(f"stress: {runs} runs, {seen} test results, {sum(failed.values())} failures"
      + (f", {missing} runs without a report" if missing else ""))
for name, n in sorted(failed.items()):
    print(f"  failed {n}/{runs}: {name}")
if not failed and not missing:
    print("  no test failed")
sys.exit(1 if failed or missing else 0)
PY
    return "$rc"
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
        # The TypeScript client's tests (node --test, against a real keyledger and nats-server), on a whole run
        # only; KEYLEDGER_SKIP_NODE=1 skips them (CI's second pass, which has run them already).
        if [[ $# -eq 0 && -z "${KEYLEDGER_SKIP_NODE:-}" && -x clients/typescript/ci.sh ]]; then
            if command -v node >/dev/null && command -v npm >/dev/null; then
                node_rc=0
                KEYLEDGER_PYTHON="$PWD/$VENV/bin/python" clients/typescript/ci.sh || node_rc=$?
                [[ $rc -eq 0 ]] && rc=$node_rc
            else
                echo "dev.sh: node/npm not found: the TypeScript client's tests were NOT run" >&2
            fi
        fi
        exit "$rc"
        ;;
    test-stress)
        setup
        runs=5
        if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
            runs="$1"
            shift
        fi
        stress "$runs" "$@"
        ;;
    cluster)
        setup
        exec "$VENV/bin/keyledger" dev-cluster "$@"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    *)
        usage
        ;;
esac
