"""A real ``keyledger serve`` process for tests, plus the small helpers every test module needs.

Tests talk to the service over real HTTP on loopback; the service talks to real Postgres and real NATS.
Each instance gets its own database and its own JetStream stream/subject names, so modules never see each
other's events (and never leftovers of earlier runs).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from keyledger.http.auth import cookie_value
from keyledger.config import Topology

ROOT = Path(__file__).resolve().parent.parent
_ALNUM = string.ascii_letters + string.digits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_topology(hint: str = "t") -> Topology:
    tag = "".join(c for c in hint.lower() if c.isalnum())[:12] + uuid.uuid4().hex[:8]
    return Topology(
        prefix=f"kl{tag}",
        events_stream=f"KL_{tag.upper()}_EVENTS",
        invalidations_stream=f"KL_{tag.upper()}_INV",
        consumer_prefix=f"kl{tag}",
    )


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """``wait_until`` for async tests: checks after every event-loop turn, with a bounded timeout (a deadline
    for a condition, generous so that a busy machine passes: it only matters when the condition never comes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.001)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds (a deadline,
    not a duration the test expects: generous, so a busy machine passes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Service:
    database_url: str
    nats_url: str
    topology: Topology
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return "http://dashboard.test"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLEDGER_")}
        env.update(
            DATABASE_URL=self.database_url,
            NATS_URL=self.nats_url,
            BETTER_AUTH_SECRET=self.secret,
            TRUSTED_ORIGINS=self.origin,
            KEYLEDGER_SUBJECT_PREFIX=self.topology.prefix,
            KEYLEDGER_EVENTS_STREAM=self.topology.events_stream,
            KEYLEDGER_INVALIDATIONS_STREAM=self.topology.invalidations_stream,
            KEYLEDGER_CONSUMER_PREFIX=self.topology.consumer_prefix,
            KEYLEDGER_LOG_LEVEL="INFO",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> "Service":
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"keyledger-test-{self.port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyledger.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyledger serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"keyledger serve did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- test data ----------------------------------------------------------------------------------
    def session(self, email: str | None = None, *, expires_in: str = "7 days", banned: bool = False) -> dict[str, str]:
        """A better-auth user + session written straight into the tables; returns Cookie + Origin headers."""
        email = email or f"{uuid.uuid4().hex[:10]}@example.com"
        token = "".join(secrets.choice(_ALNUM) for _ in range(32))
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute('SELECT id FROM "user" WHERE email = %s', (email,)).fetchone()
            user_id = row[0] if row else uuid.uuid4().hex
            if not row:
                conn.execute('INSERT INTO "user" (id, name, email, banned) VALUES (%s, %s, %s, %s)',
                             (user_id, email, email, banned))
            conn.execute(
                f"INSERT INTO session (id, \"expiresAt\", token, \"userId\") VALUES (%s, now() + interval '{expires_in}', %s, %s)",
                (uuid.uuid4().hex, token, user_id),
            )
        return {
            "cookie": f"better-auth.session_token={cookie_value(token, self.secret)}",
            "origin": self.origin,
            "x-test-user-id": user_id,
        }

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/api/auth/{path}", headers=headers, timeout=10, **kwargs)

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}/api/auth/{path}", headers=headers, timeout=10, **kwargs)

    def create_key(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        response = self.post("api-key/create", headers, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def verify(self, key: str) -> dict[str, Any]:
        response = self.post("api-key/verify", json={"key": key})
        assert response.status_code == 200, response.text
        return response.json()

    def delete(self, headers: dict[str, str], key_id: Any) -> httpx.Response:
        return self.post("api-key/delete", headers, json={"keyId": key_id})



def metric(service: Service, name: str) -> float | None:
    """One unlabelled sample of a service's /metrics, or None if it has none."""
    text = httpx.get(f"{service.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def count_events(database_url: str, key_id: str | None = None, type_: str | None = None) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM events WHERE (%(k)s::text IS NULL OR stream_id = %(k)s)"
            " AND (%(t)s::text IS NULL OR type = %(t)s)",
            {"k": key_id, "t": type_},
        ).fetchone()[0]


async def stream_messages(nats_url: str, stream: str) -> list[Any]:
    """Every message in a JetStream stream, in stream order (raw messages with .subject/.data/.headers)."""
    import nats

    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out.append(await js.get_msg(stream, seq))
            except Exception:  # deleted message
                continue
        return out
    finally:
        await nc.close()


async def term_consumer_info(js: Any, topology: Topology, name: str) -> Any:
    """Info of the durable consumer of projection ``name`` for the current leadership term (the newest
    ``<prefix>-<name>-e<epoch>``; projections/consumer.py)."""
    base = topology.consumer(name)
    names = [c.name for c in await js.consumers_info(topology.events_stream) if c.name.startswith(base)]
    if not names:
        raise LookupError(f"no consumer {base}*")
    newest = max(names, key=lambda n: int(n.rsplit("-e", 1)[1]) if n.rsplit("-e", 1)[-1].isdigit() else 0)
    return await js.consumer_info(topology.events_stream, newest)


def read_stream_messages(nats_url: str, stream: str) -> list[Any]:
    return asyncio.run(stream_messages(nats_url, stream))


async def delete_streams(nats_url: str, topology: Topology) -> None:
    import nats

    try:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return
    try:
        js = nc.jetstream(timeout=2)
        for name in (topology.events_stream, topology.invalidations_stream):
            try:
                await js.delete_stream(name)
            except Exception:
                pass
    finally:
        await nc.close()


async def create_key_in_the_past(url: str, owner: str, *, days_ago: float,
                                 expires_in: int | None = None) -> tuple[str, str]:
    """(key id, secret) of a key created ``days_ago`` days ago through the real write path, bypassing HTTP:
    the only way to get a key whose deadline has passed, since expiresIn is at least a day."""
    import datetime as dt

    from keyledger.core import records
    from keyledger.storage import store
    from keyledger.core.domain import CreateKey

    key, key_id = records.new_key(None), records.new_key_id()
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await store.execute(conn, CreateKey(actor_id=owner, now=past, key_id=key_id, key_hash=records.hash_key(key),
                                            start=key[:6], expires_in=expires_in), key_id, {"userId": owner})
    return key_id, key
