"""Fault injection against real processes: NATS down, SIGKILL under load, Postgres down, redelivery.

Every test starts its own ``keyledger serve`` (and, where it breaks them, its own private nats-server or
PostgreSQL), on loopback or a Unix socket only: the machine's own servers are never stopped. Each test is
bounded (a SIGALRM fails it after ``TEST_TIMEOUT_S``) and stops everything it started in ``finally``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import nats
import psycopg
import pytest

from harness import Service, delete_streams, read_stream_messages, term_consumer_info, unique_topology, wait_until
from keyledger.config import Topology
from keyledger.storage import store
from keyledger.core.domain import KeyState, RevokeKey, fold
from keyledger.embedded import start_nats, start_postgres
from keyledger.core.events import ApiKeyCreated, RecordedEvent, encode_data, encode_envelope, kind
from keyledger.storage.log import as_fold_input
from keyledger.core.records import hash_key, new_key, new_key_id
from keyledger.storage.store import read_stream
from keyledger.storage.schema import migrate

# Hard per-test bound. Generous: the slowest test takes ~20 s on a quiet machine and must not be failed by this
# bound on a loaded one (where everything takes several times longer); it only turns a hang into a failure.
TEST_TIMEOUT_S = 150
INVALID = {"valid": False, "error": {"message": "Invalid API key.", "code": "INVALID_API_KEY"}, "key": None}
UNAVAILABLE = {"message": "The database is unavailable; nothing was changed", "code": "SERVICE_UNAVAILABLE"}
PROJECTION = "active_api_keys"
SUBSCRIBER_DURABLE = "active-api-keys"  # ActiveKeysSubscriber: NAME with '_' -> '-'


@pytest.fixture(autouse=True)
def _hard_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail (not hang) a test that exceeds TEST_TIMEOUT_S; its ``finally`` blocks still run."""

    def expired(signum: int, frame: Any) -> None:
        pytest.fail(f"{request.node.name} exceeded {TEST_TIMEOUT_S}s", pytrace=True)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------
def query(database_url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def outbox(database_url: str) -> list[tuple[str, str, str, int]]:
    """(event id, type, key id, version) of every event still waiting in the outbox, in position order."""
    return [
        tuple(r)  # type: ignore[misc]
        for r in query(
            database_url,
            "SELECT e.id::text, e.type, e.stream_id, e.version FROM outbox o"
            " JOIN events e ON e.position = o.position ORDER BY o.position",
        )
    ]


def log_of(database_url: str, key_id: str) -> list[tuple[str, str, int]]:
    """(event id, type, version) of a key's events, in version order."""
    return [tuple(r) for r in query(  # type: ignore[misc]
        database_url, "SELECT id::text, type, version FROM events WHERE stream_id = %s ORDER BY version", (key_id,))]


def assert_consistent(database_url: str) -> None:
    """Log and projection agree for every key: nothing half-done, nothing applied twice."""
    rows = query(
        database_url,
        """
        SELECT e.stream_id, max(e.version), count(*) FILTER (WHERE e.type = 'ApiKeyRevoked'),
               bool_or(e.type = 'ApiKeyRevoked' AND e.version = (SELECT max(version) FROM events x
                                                                WHERE x.stream_id = e.stream_id)),
               a.version, t.version
        FROM events e
        LEFT JOIN active_api_keys a ON a.id = e.stream_id
        LEFT JOIN projection_tracking t ON t.projection = %s AND t.stream_id = e.stream_id
        GROUP BY e.stream_id, a.version, t.version
        """,
        (PROJECTION,),
    )
    problems = []
    for key_id, last, revokes, revoked_last, row_version, tracked in rows:
        if revokes > 1:
            problems.append(f"{key_id}: {revokes} ApiKeyRevoked events")
        if revokes and not revoked_last:
            problems.append(f"{key_id}: events after ApiKeyRevoked")
        if revokes and row_version is not None:
            problems.append(f"{key_id}: revoked in the log but still in active_api_keys (v{row_version})")
        if not revokes and row_version != last:
            problems.append(f"{key_id}: log at v{last}, active_api_keys row at {row_version}")
        if tracked != last:
            problems.append(f"{key_id}: log at v{last}, projection_tracking at {tracked}")
    orphans = query(database_url, "SELECT id FROM active_api_keys a"
                                  " WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.stream_id = a.id)")
    problems += [f"{r[0]}: active_api_keys row without events" for r in orphans]
    assert not problems, "\n".join(problems[:20])


def stream_index(nats_url: str, stream: str) -> list[tuple[str, str, str, int]]:
    """(subject, Nats-Msg-Id, keyId, version) of every message in a JetStream stream, in stream order; every
    one of them is an event (no freshness checkpoint is ever stored there: core/freshness.py)."""
    out = []
    for m in read_stream_messages(nats_url, stream):
        assert not m.subject.endswith(".checkpoint"), m.subject
        envelope = json.loads(m.data)
        out.append((m.subject, (m.headers or {}).get("Nats-Msg-Id"), envelope["keyId"], envelope["version"]))
    return out


def assert_stream_matches_log(nats_url: str, topology: Topology, database_url: str) -> list[tuple[str, str, str, int]]:
    """Every event of the log is in the stream exactly once (by Nats-Msg-Id and by (keyId, version)),
    on ``<prefix>.events.<kind>.<keyId>``, and the stream holds nothing else."""
    messages = stream_index(nats_url, topology.events_stream)
    ids = collections.Counter(m[1] for m in messages)
    assert not [i for i, n in ids.items() if n > 1], f"duplicate Nats-Msg-Id in the stream: {ids.most_common(3)}"
    versions = collections.Counter((m[2], m[3]) for m in messages)
    assert not [v for v, n in versions.items() if n > 1], f"duplicate (keyId, version): {versions.most_common(3)}"
    log = {r[0]: r for r in query(database_url, "SELECT id::text, type, stream_id, version FROM events")}
    assert set(ids) == set(log), (
        f"{len(set(log) - set(ids))} logged events missing from the stream, "
        f"{len(set(ids) - set(log))} unknown messages in it")
    for subject, msg_id, key_id, version in messages:
        _, type_, stream_id, logged_version = log[msg_id]
        assert (key_id, version) == (stream_id, logged_version)
        assert subject == topology.event_subject(kind(type_), stream_id)
    return messages


def leading(service: Service) -> bool:
    """Whether the service process currently runs the background work (its /metrics gauge)."""
    try:
        text = httpx.get(f"{service.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return True
    return any(line.split()[-1] not in ("0", "0.0") for line in text.splitlines()
               if line.startswith("keyledger_leader "))


def log_text(service: Service) -> str:
    assert service.log_path is not None
    return service.log_path.read_text(errors="replace") if service.log_path.exists() else ""


def new_service(database_url: str, nats_url: str, topology: Topology, tmp_path: Path) -> Service:
    return Service(database_url=database_url, nats_url=nats_url, topology=topology,
                   log_path=tmp_path / "keyledger.log")


def short_dir(tmp_path: Path, name: str) -> tuple[Path, Path | None]:
    """A data dir whose Unix socket path fits sun_path, so a restarted PostgreSQL keeps the same URL."""
    candidate = tmp_path / name
    if len(str(candidate / ".s.PGSQL.5432")) <= 100:
        return candidate, None
    parent = Path(tempfile.mkdtemp(prefix="klf-", dir="/tmp"))
    return parent / name, parent


class PostgresRig:
    """A PostgreSQL of the test's own (so it can be stopped, killed and started again on the same URL), with
    the schema applied, and a ``keyledger serve`` on it."""

    def __init__(self, data_dir: Path, topology: Topology) -> None:
        self.data_dir = data_dir
        self.topology = topology
        self.pg = start_postgres(data_dir)
        self.service: Service | None = None

    def restart(self) -> Any:
        """Start PostgreSQL again on the same data directory (after a stop or a kill); returns the server."""
        self.pg = start_postgres(self.data_dir)
        return self.pg


@contextlib.contextmanager
def private_postgres(nats_url: str, tmp_path: Path, hint: str) -> Iterator[PostgresRig]:
    data_dir, extra_dir = short_dir(tmp_path, "pg")
    topology = unique_topology(hint)
    rig = PostgresRig(data_dir, topology)
    try:
        migrate(rig.pg.url)
        rig.service = new_service(rig.pg.url, nats_url, topology, tmp_path).start()
        yield rig
    finally:
        if rig.service is not None:
            rig.service.stop()
        rig.pg.stop()
        asyncio.run(delete_streams(nats_url, topology))
        if extra_dir is not None:
            shutil.rmtree(extra_dir, ignore_errors=True)


class NatsRig(NamedTuple):
    server: Any  # the test's own nats-server: kill() / stop() / restart() on the same port and store
    database_url: str
    topology: Topology
    service: Service
    boot_s: float  # how long ``keyledger serve`` took to answer /health


@contextlib.contextmanager
def private_nats(db_factory: Any, tmp_path: Path, hint: str, *, running: bool = True) -> Iterator[NatsRig]:
    """A nats-server of the test's own, a fresh database, and a ``keyledger serve`` on both. With
    ``running=False`` the service boots while nothing listens on NATS's (known) port."""
    server = start_nats(tmp_path / "nats", port=None)
    if not running:
        server.stop()
    service: Service | None = None
    try:
        database_url = db_factory.create(f"faults_{hint}")
        topology = unique_topology(hint)
        service, boot_s = timed(new_service(database_url, server.url, topology, tmp_path).start)
        yield NatsRig(server, database_url, topology, service, boot_s)
    finally:
        if service is not None:
            service.stop()
        server.stop()


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - started


# ------------------------------------------------------------------------------------------------------
# 1. NATS down: revocation is not blocked, the event waits in the outbox and goes out exactly once
# ------------------------------------------------------------------------------------------------------
def test_nats_down_delete_is_immediate_and_published_once_after_restart(db_factory: Any, tmp_path: Path) -> None:
    with private_nats(db_factory, tmp_path, "nats") as rig:
        server, database_url, topology, service = rig.server, rig.database_url, rig.topology, rig.service
        me = service.session()
        key = service.create_key(me, name="nats-down")
        wait_until(lambda: not outbox(database_url), timeout=30, what="the create event published")

        server.kill()
        response, elapsed = timed(service.delete, me, key["id"])
        # NATS stays down for the whole request: a delete that waited for NATS would not answer at all
        # (the client gives up after 10 s). The bound on top is only a sanity check: normally milliseconds.
        assert response.status_code == 200 and response.json() == {"success": True}, response.text
        assert elapsed < 5.0, f"delete took {elapsed:.3f}s with NATS down"
        assert service.verify(key["key"]) == INVALID

        events = log_of(database_url, key["id"])
        assert [e[1] for e in events] == ["ApiKeyCreated", "ApiKeyRevoked"]
        revoked_id = events[1][0]
        assert outbox(database_url) == [(revoked_id, "ApiKeyRevoked", key["id"], 2)]
        health = httpx.get(f"{service.url}/health", timeout=5)
        assert health.status_code == 200 and health.json() == {"ok": True, "nats": False}

        # Keep NATS down until the relay really could not publish (not just a lucky gap), then restart it: either
        # its publish timed out, or it made no progress for a whole progress window and gave up leadership
        # (whichever comes first; /metrics then shows keyledger_leader 0).
        wait_until(lambda: "publish failed" in log_text(service) or not leading(service), timeout=30,
                   interval=0.1, what="the relay failing to publish")
        assert outbox(database_url) == [(revoked_id, "ApiKeyRevoked", key["id"], 2)]
        server.restart()

        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained after NATS restart")
        messages = assert_stream_matches_log(server.url, topology, database_url)
        revoked = [m for m in messages if m[0] == f"{topology.prefix}.events.revoked.{key['id']}"]
        assert revoked == [(f"{topology.prefix}.events.revoked.{key['id']}", revoked_id, key["id"], 2)]
        assert_consistent(database_url)


def test_service_starts_and_revokes_while_nats_is_down(db_factory: Any, tmp_path: Path) -> None:
    with private_nats(db_factory, tmp_path, "natsboot", running=False) as rig:
        server, database_url, topology, service = rig.server, rig.database_url, rig.topology, rig.service
        health = httpx.get(f"{service.url}/health", timeout=5)
        assert health.status_code == 200 and health.json() == {"ok": True, "nats": False}

        me = service.session()
        key = service.create_key(me, name="born-offline")
        response, elapsed = timed(service.delete, me, key["id"])
        assert response.status_code == 200 and elapsed < 5.0, (response.text, elapsed)  # see the test above
        assert service.verify(key["key"]) == INVALID
        assert [(e[1], e[3]) for e in outbox(database_url)] == [("ApiKeyCreated", 1), ("ApiKeyRevoked", 2)]

        server.restart()
        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained once NATS started")
        messages = assert_stream_matches_log(server.url, topology, database_url)
        assert [m[0] for m in messages] == [f"{topology.prefix}.events.created.{key['id']}",
                                            f"{topology.prefix}.events.revoked.{key['id']}"]
        wait_until(lambda: httpx.get(f"{service.url}/health", timeout=5).json()["nats"] is True, timeout=30,
                   what="/health reporting NATS connected")
        assert_consistent(database_url)
        print(f"\n[faults] service boot with NATS down: {rig.boot_s:.2f}s")


# ------------------------------------------------------------------------------------------------------
# 2. SIGKILL under load: every acknowledged revoke survives and is published once; nothing is half-done
# ------------------------------------------------------------------------------------------------------
N_KEYS = 300
CONCURRENCY = 16
KILL_AFTER_ACKS = 100


async def _create_keys(service: Service, headers: dict[str, str], n: int) -> dict[str, str]:
    keys: dict[str, str] = {}
    remaining = iter(range(n))
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=10) as client:
        async def worker() -> None:
            for i in remaining:
                r = await client.post("/api/auth/api-key/create", json={"name": f"load-{i}"})
                assert r.status_code == 200, r.text
                keys[r.json()["id"]] = r.json()["key"]

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return keys


async def _revoke_until_killed(service: Service, headers: dict[str, str], key_ids: list[str]) -> dict[str, Any]:
    """Revoke concurrently; SIGKILL the service once KILL_AFTER_ACKS deletes were acknowledged."""
    acked: list[str] = []
    failed: dict[str, str] = {}
    other: dict[str, int] = {}
    not_sent: list[str] = []
    killed = asyncio.Event()
    remaining = iter(key_ids)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=10, limits=limits) as client:
        async def worker() -> None:
            for key_id in remaining:
                if killed.is_set():
                    not_sent.append(key_id)
                    continue
                try:
                    r = await client.post("/api/auth/api-key/delete", json={"keyId": key_id})
                except httpx.TransportError as exc:
                    failed[key_id] = type(exc).__name__
                    continue
                if r.status_code != 200:
                    other[key_id] = r.status_code
                    continue
                acked.append(key_id)
                if len(acked) >= KILL_AFTER_ACKS and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(service.kill)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {"acked": acked, "failed": failed, "other": other, "not_sent": not_sent}


async def _verify_all(service: Service, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    remaining = iter(keys.items())
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        async def worker() -> None:
            for key_id, key in remaining:
                r = await client.post("/api/auth/api-key/verify", json={"key": key})
                assert r.status_code == 200, r.text
                out[key_id] = r.json()

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


def test_sigkill_under_revoke_load_loses_and_duplicates_nothing(db_factory: Any, nats_url: str,
                                                                 tmp_path: Path) -> None:
    topology = unique_topology("kill")
    database_url = db_factory.create("faults_kill")
    service = new_service(database_url, nats_url, topology, tmp_path)
    try:
        service.start()
        me = service.session()
        keys = asyncio.run(_create_keys(service, me, N_KEYS))
        assert len(keys) == N_KEYS
        result = asyncio.run(_revoke_until_killed(service, me, list(keys)))
        assert service.proc is not None and service.proc.returncode == -signal.SIGKILL
        acked, failed = set(result["acked"]), result["failed"]
        assert not result["other"], f"unexpected statuses: {result['other']}"
        assert len(acked) >= KILL_AFTER_ACKS
        print(f"\n[faults] SIGKILL after {len(acked)} acknowledged deletes; {len(failed)} in flight failed "
              f"({collections.Counter(failed.values())}), {len(result['not_sent'])} not sent")

        # Straight after the crash, before any restart: the log alone already holds every acknowledged revoke.
        revokes = collections.Counter(r[0] for r in query(
            database_url, "SELECT stream_id FROM events WHERE type = 'ApiKeyRevoked'"))
        assert not [k for k, n in revokes.items() if n > 1], "a key was revoked twice"
        lost = acked - set(revokes)
        assert not lost, f"{len(lost)} acknowledged deletes are not in the log: {sorted(lost)[:5]}"
        assert set(revokes) <= acked | set(failed), "a revoke appeared for a key nobody tried to delete"
        assert_consistent(database_url)

        service.start()  # same port, database and topology
        verdicts = asyncio.run(_verify_all(service, keys))
        for key_id in keys:
            if key_id in revokes:
                assert verdicts[key_id] == INVALID, (key_id, verdicts[key_id])
            else:
                assert verdicts[key_id]["valid"] is True, (key_id, verdicts[key_id])

        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained after the restart")
        messages = assert_stream_matches_log(nats_url, topology, database_url)
        published_revokes = collections.Counter(m[2] for m in messages if ".events.revoked." in m[0])
        assert published_revokes == revokes  # each revocation exactly once, acknowledged ones included
        assert_consistent(database_url)
        print(f"[faults] {len(revokes)} revocations in the log ({len(revokes) - len(acked)} of the failed "
              f"requests had committed), all published once")
    finally:
        service.stop()
        asyncio.run(delete_streams(nats_url, topology))


# ------------------------------------------------------------------------------------------------------
# 3. Postgres down: a prompt 503 JSON error, nothing written, recovery without a restart of the service
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_postgres_down_is_a_prompt_503_and_the_service_recovers(nats_url: str, tmp_path: Path,
                                                                outage: str) -> None:
    with private_postgres(nats_url, tmp_path, "pgdown") as rig:
        pg, service, topology = rig.pg, rig.service, rig.topology
        me = service.session()
        doomed = service.create_key(me, name="doomed")
        survivor = service.create_key(me, name="survivor")
        wait_until(lambda: not outbox(pg.url), timeout=30, what="the create events published")

        assert httpx.get(f"{service.url}/health", timeout=5).json() == {"ok": True, "nats": True}
        getattr(pg, outage)()
        timings = {}
        for label, call in (
            ("delete", lambda: service.delete(me, doomed["id"])),
            ("verify", lambda: service.post("api-key/verify", json={"key": doomed["key"]})),
            ("delete again", lambda: service.delete(me, doomed["id"])),
            ("health", lambda: httpx.get(f"{service.url}/health", timeout=20)),
        ):
            response, timings[label] = timed(call)
            assert response.status_code == 503 and response.json() == UNAVAILABLE, (label, response.text)
            # "Prompt": the pool's 5 s timeout, not a hang (the client would wait 10-20 s). Doubled for load.
            assert timings[label] < 10, f"{label} took {timings[label]:.2f}s with PostgreSQL down"

        old_url = pg.url
        pg = rig.restart()
        assert pg.url == old_url
        restarted = time.monotonic()

        def revoke() -> bool:
            r = service.delete(me, doomed["id"])
            assert r.status_code in (200, 503), r.text  # 404 would mean a "503" had written the revoke
            return r.status_code == 200

        wait_until(revoke, timeout=30, interval=0.2, what="a successful delete after PostgreSQL restarted")
        recovery = time.monotonic() - restarted
        health = httpx.get(f"{service.url}/health", timeout=10)  # liveness is back with the database
        assert health.status_code == 200 and health.json()["ok"] is True, health.text
        assert service.verify(doomed["key"]) == INVALID
        assert service.verify(survivor["key"])["valid"] is True
        assert [e[1] for e in log_of(pg.url, doomed["id"])] == ["ApiKeyCreated", "ApiKeyRevoked"]
        assert_consistent(pg.url)
        wait_until(lambda: not outbox(pg.url), timeout=30, what="the outbox drained after recovery")
        assert_stream_matches_log(nats_url, topology, pg.url)
        print(f"\n[faults] postgres {outage}: " + ", ".join(f"{k} 503 in {v:.2f}s" for k, v in timings.items())
              + f"; first 200 {recovery:.2f}s after restart")


def test_first_request_after_an_idle_postgres_restart_succeeds(nats_url: str, tmp_path: Path) -> None:
    with private_postgres(nats_url, tmp_path, "pgidle") as rig:
        pg, service = rig.pg, rig.service
        me = service.session()
        key = service.create_key(me, name="idle")
        assert service.verify(key["key"])["valid"] is True

        pg.stop()  # no request reaches the service while PostgreSQL is down
        pg = rig.restart()
        first = service.post("api-key/verify", json={"key": key["key"]})
        assert first.status_code == 200 and first.json()["valid"] is True, first.text
        assert service.delete(me, key["id"]).status_code == 200
        assert_consistent(pg.url)


def test_service_recovers_promptly_after_a_longer_postgres_outage(nats_url: str, tmp_path: Path) -> None:
    with private_postgres(nats_url, tmp_path, "pglong") as rig:
        pg, service = rig.pg, rig.service
        key = service.create_key(service.session(), name="long-outage")
        pg.kill()
        down = time.monotonic()
        while time.monotonic() - down < 16:  # traffic all along: every answer is a prompt 503
            response, elapsed = timed(service.post, "api-key/verify", json={"key": key["key"]})
            assert response.status_code == 503 and elapsed < 10, (response.text, elapsed)
            time.sleep(0.5)
        pg = rig.restart()
        back = time.monotonic()
        # Each probe may itself wait the 5 s pool timeout, so measure the lag instead of trusting the poll.
        wait_until(lambda: service.post("api-key/verify", json={"key": key["key"]}).status_code == 200,
                   timeout=30, interval=0.2, what="a 200 after PostgreSQL was back")
        lag = time.monotonic() - back
        print(f"\n[faults] 16s outage: first 200 {lag:.2f}s after PostgreSQL was back")
        # The pool gives up a failing reconnect after 10 s and the next request starts a fresh one: back within
        # about one pool timeout (5 s) on a quiet machine. (With psycopg_pool's default backoff, doubling up to
        # 300 s, a 30 s outage once kept the service at 503 for 27 s: service/background/runtime.py.) 12 s leaves room
        # for a busy machine and is still below what a doubling backoff gives after 16 s down.
        assert lag < 12, f"503 for {lag:.1f}s after PostgreSQL was back"


def test_relay_redeclares_the_streams_when_nats_comes_back_empty(db_factory: Any, tmp_path: Path) -> None:
    with private_nats(db_factory, tmp_path, "natsempty") as rig:
        server, database_url, service = rig.server, rig.database_url, rig.service
        me = service.session()
        key = service.create_key(me, name="state-lost")
        wait_until(lambda: not outbox(database_url), timeout=30, what="the create event published")

        server.kill()  # NATS loses its JetStream state (a new volume, a wiped store)
        for path in server.store_dir.iterdir():
            if path != server.log_path:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        server.restart()

        assert service.delete(me, key["id"]).status_code == 200
        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained into fresh streams")
        messages = stream_index(server.url, rig.topology.events_stream)
        assert [m[0] for m in messages] == [f"{rig.topology.prefix}.events.revoked.{key['id']}"]


# ------------------------------------------------------------------------------------------------------
# 4. Redelivered, duplicated and reordered events: the subscriber rebuilds from the log, exactly once
# ------------------------------------------------------------------------------------------------------
async def _read_log(database_url: str, key_id: str) -> list[RecordedEvent]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await read_stream(conn, key_id)


async def _publish(nats_url: str, topology: Topology, events: list[RecordedEvent]) -> int:
    """Publish envelopes as the relay would, but with fresh Nats-Msg-Ids so JetStream keeps every copy."""
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(timeout=5)
        seq = 0
        for e in events:
            ack = await js.publish(topology.event_subject(kind(e.type), e.stream_id), encode_envelope(e),
                                   headers={"Nats-Msg-Id": str(uuid.uuid4())})
            assert not ack.duplicate
            seq = ack.seq
        return seq
    finally:
        await nc.close()


async def _consumer_acked(nats_url: str, topology: Topology, stream_seq: int) -> bool:
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(timeout=5)
        try:
            info = await term_consumer_info(js, topology, SUBSCRIBER_DURABLE)
        except Exception:
            return False
        return info.ack_floor.stream_seq >= stream_seq and info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await nc.close()


async def _stream_last_seq(nats_url: str, topology: Topology) -> int:
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return (await nc.jetstream(timeout=5).stream_info(topology.events_stream)).state.last_seq
    finally:
        await nc.close()


ROW = ("SELECT id, key_hash, reference_id, name, enabled, expires_at, created_at, updated_at, version"
       " FROM active_api_keys WHERE id = %s")


def _expected_row(state: KeyState) -> tuple[Any, ...]:
    return (state.id, state.key_hash, state.reference_id, state.name, state.enabled, state.expires_at,
            state.created_at, state.updated_at, state.version)


def test_subscriber_rebuilds_from_duplicated_and_reordered_deliveries(db_factory: Any, nats_url: str,
                                                                      tmp_path: Path) -> None:
    topology = unique_topology("redeliver")
    database_url = db_factory.create("faults_redeliver")
    service = new_service(database_url, nats_url, topology, tmp_path)
    try:
        service.start()
        me = service.session()
        live = service.create_key(me, name="v1")                                                  # v1 created
        for body in ({"name": "v2"}, {"enabled": False}, {"enabled": True, "name": "final"}):   # v2..v5
            r = service.post("api-key/update", me, json={"keyId": live["id"], **body})
            assert r.status_code == 200, r.text
        gone = service.create_key(me, name="gone")                                                # v1 created
        assert service.delete(me, gone["id"]).status_code == 200                                  # v2 revoked

        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained")
        last_seq = asyncio.run(_stream_last_seq(nats_url, topology))
        wait_until(lambda: asyncio.run(_consumer_acked(nats_url, topology, last_seq)), timeout=30,
                   what="the subscriber consumed the relay's messages")
        inline_row = query(database_url, "SELECT * FROM active_api_keys WHERE id = %s", (live["id"],))
        live_log = asyncio.run(_read_log(database_url, live["id"]))
        gone_log = asyncio.run(_read_log(database_url, gone["id"]))
        assert [e.version for e in live_log] == [1, 2, 3, 4, 5] and [e.version for e in gone_log] == [1, 2]
        log_offset = len(log_text(service))

        # Reset the projection for both keys, as a rebuild would.
        with psycopg.connect(database_url, autocommit=True) as conn:
            for key_id in (live["id"], gone["id"]):
                conn.execute("DELETE FROM active_api_keys WHERE id = %s", (key_id,))
                conn.execute("DELETE FROM projection_tracking WHERE projection = %s AND stream_id = %s",
                             (PROJECTION, key_id))
        assert service.verify(live["key"]) == INVALID

        def tracked(key_id: str) -> int | None:
            rows = query(database_url, "SELECT version FROM projection_tracking WHERE projection = %s"
                                       " AND stream_id = %s", (PROJECTION, key_id))
            return rows[0][0] if rows else None

        def settle(seq: int, versions: dict[str, int]) -> None:
            wait_until(lambda: asyncio.run(_consumer_acked(nats_url, topology, seq))
                       and all(tracked(k) == v for k, v in versions.items()),
                       timeout=30, interval=0.05, what=f"the subscriber to settle at {versions}")

        # Round 1: v2 before v1, each twice, interleaved with the revoked key's events in reverse.
        L, G = live_log, gone_log
        seq = asyncio.run(_publish(nats_url, topology, [L[1], G[1], L[0], L[1], G[0], G[1], L[0]]))
        settle(seq, {live["id"]: 2, gone["id"]: 2})
        state2 = fold(as_fold_input(L[:2]), live["id"])
        assert state2 is not None and state2.name == "v2"
        assert query(database_url, ROW, (live["id"],)) == [_expected_row(state2)]
        assert query(database_url, ROW, (gone["id"],)) == []  # a revoked key never comes back

        # Round 2: a gap (v5 first), duplicates of new and of already-applied versions, all out of order.
        seq = asyncio.run(_publish(nats_url, topology, [L[4], L[2], L[4], L[3], L[0], L[2], L[1], G[0], G[1]]))
        settle(seq, {live["id"]: 5, gone["id"]: 2})
        state5 = fold(as_fold_input(L), live["id"])
        assert state5 is not None and (state5.name, state5.enabled, state5.version) == ("final", True, 5)
        assert query(database_url, ROW, (live["id"],)) == [_expected_row(state5)]
        # The rebuilt row is identical, column for column, to the one the inline projection had written.
        assert query(database_url, "SELECT * FROM active_api_keys WHERE id = %s", (live["id"],)) == inline_row
        assert query(database_url, ROW, (gone["id"],)) == []
        assert service.verify(live["key"])["valid"] is True and service.verify(gone["key"]) == INVALID

        # Nothing was applied twice: the tracking guard (KL409) never fired, the subscriber never retried.
        since = log_text(service)[log_offset:]
        assert "subscriber:" not in since and "KL409" not in since and "not at version" not in since, since
        assert_consistent(database_url)
        # The log itself is untouched by all this: the relay published nothing new.
        assert [e.id for e in asyncio.run(_read_log(database_url, live["id"]))] == [e.id for e in L]
        assert not outbox(database_url)
    finally:
        service.stop()
        asyncio.run(delete_streams(nats_url, topology))


# ------------------------------------------------------------------------------------------------------
# 5. The relay and the gap problem; a crash between JetStream's PubAck and the outbox delete
# ------------------------------------------------------------------------------------------------------
def test_relay_publishes_a_lower_position_that_commits_late(db_factory: Any, nats_url: str, tmp_path: Path) -> None:
    """A transaction that inserted an event (drawing a position) and stays open while later positions commit
    and are published: a relay tailing ``position > last published`` would skip it for good. The relay reads the
    outbox, so the late row goes out as soon as it commits, and the subscriber projects it."""
    topology = unique_topology("late")
    database_url = db_factory.create("faults_late")
    service = new_service(database_url, nats_url, topology, tmp_path)
    slow = None
    try:
        service.start()
        me = service.session()
        secret = new_key(None)
        late_id = new_key_id()
        created = ApiKeyCreated(key_hash=hash_key(secret), reference_id=me["x-test-user-id"], start=secret[:6],
                                name="late")
        slow = psycopg.connect(database_url)  # one open transaction, held across the whole scenario
        late_position = slow.execute(
            "INSERT INTO events (id, stream_id, version, type, data, metadata) VALUES (gen_random_uuid(), %s, 1, "
            "'ApiKeyCreated', %s::jsonb, '{}') RETURNING position", (late_id, encode_data(created).decode())
        ).fetchone()[0]
        later = [service.create_key(me, name=f"later{i}") for i in range(3)]
        later_ids = {k["id"] for k in later}

        def published_ids() -> list[str]:
            return [m[2] for m in stream_index(nats_url, topology.events_stream)]

        wait_until(lambda: later_ids <= set(published_ids()), timeout=30, what="the later positions published")
        assert late_id not in published_ids()
        assert service.verify(secret) == INVALID  # not committed: nothing knows it yet
        later_positions = [r[0] for r in query(database_url, "SELECT position FROM events WHERE stream_id = ANY(%s)",
                                               (list(later_ids),))]
        assert all(late_position < p for p in later_positions)

        slow.commit()  # the lower position becomes visible only now, after the higher ones went out
        wait_until(lambda: late_id in published_ids(), timeout=30, what="the late event published")
        order = published_ids()
        assert order.index(late_id) > max(order.index(k) for k in later_ids)  # picked up late, not skipped
        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained")
        assert_stream_matches_log(nats_url, topology, database_url)
        # The subscriber projection applied it from NATS (it was never projected inline): it verifies now.
        wait_until(lambda: service.verify(secret)["valid"] is True, timeout=30, what="the late key projected")
        assert_consistent(database_url)
    finally:
        if slow is not None:
            slow.close()
        service.stop()
        asyncio.run(delete_streams(nats_url, topology))


async def _note_publishes(nats_url: str, subject: str, seen: list[tuple[str, str | None]],
                          stop: asyncio.Event, ready: asyncio.Event) -> None:
    """Every message published on ``subject`` (core NATS sees each publish, duplicates JetStream drops included),
    as (subject, Nats-Msg-Id), until ``stop``."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        async def note(msg: Any) -> None:
            seen.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id")))

        await nc.subscribe(subject, cb=note)
        await nc.flush()
        ready.set()
        await stop.wait()
        await nc.flush()
    finally:
        await nc.close()


def test_a_kill_between_puback_and_outbox_delete_republishes_with_the_same_msg_id(
        db_factory: Any, nats_url: str, tmp_path: Path) -> None:
    """Deterministic: the test holds a row lock on the event's outbox row, so the relay's delete (which it sends
    only after JetStream's PubAck) waits; the service is SIGKILLed right there. After the restart the row is
    still in the outbox and is published again with the same Nats-Msg-Id: JetStream keeps one copy, and the
    projections apply it once."""
    topology = unique_topology("puback")
    database_url = db_factory.create("faults_puback")
    service = new_service(database_url, nats_url, topology, tmp_path)
    locker = None
    seen: list[tuple[str, str | None]] = []
    loop = asyncio.new_event_loop()
    stop, ready = asyncio.Event(), asyncio.Event()
    watcher = None
    try:
        service.start()
        me = service.session()
        key = service.create_key(me, name="puback")
        wait_until(lambda: not outbox(database_url), timeout=30, what="the create event published")
        service.stop()  # no relay runs now: the next event waits in the outbox

        async def revoke() -> None:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await store.execute(conn, RevokeKey(actor_id=me["x-test-user-id"], now=dt.datetime.now(dt.timezone.utc),
                                                    key_id=key["id"]), key["id"], {"userId": me["x-test-user-id"]})

        asyncio.run(revoke())
        [(event_id, event_type, _, version)] = outbox(database_url)
        assert (event_type, version) == ("ApiKeyRevoked", 2)
        locker = psycopg.connect(database_url)
        locker.execute("SELECT position FROM outbox FOR UPDATE").fetchall()  # the relay's DELETE will wait on it

        watcher = threading.Thread(target=lambda: loop.run_until_complete(
            _note_publishes(nats_url, f"{topology.prefix}.events.>", seen, stop, ready)), daemon=True)
        watcher.start()
        wait_until(ready.is_set, timeout=30, what="the watcher subscribed")

        service.start()
        wait_until(lambda: event_id in [m[1] for m in stream_index(nats_url, topology.events_stream)], timeout=30,
                   what="the revoke acknowledged by JetStream")

        def relay_delete_waiting() -> int | None:
            rows = query(database_url, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND query LIKE 'DELETE FROM outbox%%'")
            return rows[0][0] if rows else None

        backend = wait_until(relay_delete_waiting, timeout=30, what="the relay's outbox delete waiting on the lock")
        service.kill()  # between the PubAck and the delete...
        # ...which therefore never takes effect: a dead client's statement would still run to completion in its
        # backend once the lock is free, so end that backend too, as a crash before the delete was sent would.
        query(database_url, "SELECT pg_terminate_backend(%s)", (backend,))
        wait_until(lambda: not query(database_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)),
                   timeout=30, what="the relay's backend gone")
        locker.rollback()
        assert [r[0] for r in outbox(database_url)] == [event_id]  # still there: it will be published again
        first_copies = sum(1 for _, msg_id in seen if msg_id == event_id)
        assert first_copies >= 1

        service.start()
        wait_until(lambda: not outbox(database_url), timeout=30, what="the outbox drained after the restart")
        wait_until(lambda: sum(1 for _, msg_id in seen if msg_id == event_id) > first_copies, timeout=30,
                   what="the republished copy seen on the subject")
        # Published again under the same Nats-Msg-Id, so JetStream kept one copy; the log, the stream and the
        # projection agree; the key stays revoked.
        messages = assert_stream_matches_log(nats_url, topology, database_url)
        assert [m[1] for m in messages if m[1] == event_id] == [event_id]
        assert {subject for subject, msg_id in seen if msg_id == event_id} == {
            f"{topology.prefix}.events.revoked.{key['id']}"}
        assert service.verify(key["key"]) == INVALID
        assert_consistent(database_url)
    finally:
        if locker is not None:
            locker.close()
        loop.call_soon_threadsafe(stop.set)
        if watcher is not None:
            watcher.join(10)
        service.stop()
        asyncio.run(delete_streams(nats_url, topology))
