"""``keyledger`` (the console script) and ``python -m keyledger``: cli.py's command line, once the server's
dependencies are there.

``pip install keyledger`` installs only what the client library (``keyledger.client``) needs; the service is
``pip install 'keyledger[server]'``. On a client-only install the command says so in one line and exits with
status 1, instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util
import sys

# The `server` extra of pyproject.toml, by import name.
SERVER_MODULES = ("litestar", "psycopg", "psycopg_pool", "uvicorn", "prometheus_client")


def missing_server_module() -> str | None:
    """The first of ``SERVER_MODULES`` that cannot be imported, or None."""
    for name in SERVER_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:  # a finder that refuses the module outright
            return name
    return None


def main() -> int:
    missing = missing_server_module()
    if missing is not None:
        print(f"keyledger: the service's dependencies are not installed (no module {missing!r}): "
              "pip install 'keyledger[server]'", file=sys.stderr)
        return 1
    from .cli import main as run  # only now: the command line imports the server's dependencies

    return run()


if __name__ == "__main__":
    sys.exit(main())
