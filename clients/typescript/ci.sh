#!/usr/bin/env bash
# keyledger-client (TypeScript): install exactly the locked dependencies, build with tsc, and run the tests
# (node's built-in runner) against a real `keyledger serve` with its embedded PostgreSQL and nats-server.
#
# Needs Node >= 20 and keyledger's Python environment: ../../.venv (./dev.sh sets it up), or KEYLEDGER_PYTHON.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

python="${KEYLEDGER_PYTHON:-../../.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "ci.sh: no keyledger Python at $python (run ./dev.sh once, or set KEYLEDGER_PYTHON)" >&2
    exit 2
fi

npm ci --no-audit --no-fund
npm run build
npm test
