"""A newcomer's first hour with the embedded servers: one ``keyledger serve`` owns a data directory, a second one
stops without touching it, a taken port is said before anything starts, and the short-lived commands use the
running instance's servers, or say plainly that there are none, wherever they are run from."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ROOT, free_port, wait_until


def embedded_env(data: Path, nats_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")
           and not k.startswith("KEYLEDGER_")}
    env.update(KEYLEDGER_DATA_DIR=str(data), KEYLEDGER_NATS_PORT=str(nats_port))
    return env


def keyledger(*args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keyledger.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("newcomer") / "kl"
    env = embedded_env(data, free_port())
    port = free_port()
    log = open(data.parent / "first.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "keyledger.cli", "serve", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=90, interval=0.2, what="the embedded serve")
        yield {"env": env, "url": url, "port": port, "data": data, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_a_second_serve_on_the_same_data_dir_stops_and_leaves_the_first_alone(first: dict[str, Any]) -> None:
    second = keyledger("serve", "--port", str(free_port()), env=first["env"])
    assert second.returncode == 2, second.stderr
    assert "another `keyledger serve` is running on" in second.stderr and "Traceback" not in second.stderr
    assert first["proc"].poll() is None
    wait_until(lambda: httpx.get(f"{first['url']}/ready", timeout=5).status_code == 200, timeout=30,
               what="the first instance still ready")


def test_a_taken_port_is_said_before_anything_starts(first: dict[str, Any], tmp_path: Path) -> None:
    other = keyledger("serve", "--port", str(first["port"]), env=embedded_env(tmp_path / "other", free_port()))
    assert other.returncode == 2 and "already in use" in other.stderr, other.stderr
    assert not (tmp_path / "other").exists()  # no embedded server was started for nothing
    assert httpx.get(f"{first['url']}/health", timeout=5).status_code == 200


def test_commands_use_the_running_instance_wherever_they_run(first: dict[str, Any], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cookie = keyledger("dev-session", "--email", "newcomer@example.com", env=first["env"], cwd=elsewhere)
    assert cookie.returncode == 0, cookie.stderr
    header = cookie.stdout.strip().split(": ", 1)
    assert header[0] == "Cookie"
    listed = httpx.get(f"{first['url']}/api/auth/api-key/list", headers={"cookie": header[1]}, timeout=5)
    assert listed.status_code == 200, listed.text  # the running service accepts the printed cookie
    assert not (elsewhere / ".keyledger").exists()


def test_a_command_without_embedded_data_says_so(tmp_path: Path) -> None:
    env = embedded_env(tmp_path / "nothing-here", free_port())
    done = keyledger("history", "abc", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no embedded keyledger data in" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "nothing-here").exists()


def test_the_command_line_explains_itself() -> None:
    env = {**os.environ}
    top = keyledger("--help", env=env)
    assert top.returncode == 0 and "``" not in top.stdout
    for command in ("serve", "migrate", "dev-session", "dev-cluster", "history", "replay", "audit", "import"):
        assert command in top.stdout
    assert keyledger("--version", env=env).stdout.startswith("keyledger ")
    serve = keyledger("serve", "--help", env=env)
    assert "(default: 3000)" in serve.stdout.replace("\n", " ") or "default: 3000" in serve.stdout
