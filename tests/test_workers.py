"""``serve --workers 2``: two HTTP processes, one background leader (relay + subscribers).

Which worker answers a request is the kernel's choice, so the tests find out: a keep-alive connection stays with
the process that accepted it, and that process's ``/metrics`` says whether it leads (``keyledger_leader``) and
how many events it appended. A revocation sent on a connection whose ``/metrics`` said ``keyledger_leader 0``
was served by the non-leader.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import nats
import psycopg
import pytest

from harness import Service, delete_streams, read_stream_messages, unique_topology, wait_until
from servers import DatabaseFactory


@pytest.fixture(scope="module")
def workers(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("workers")
    svc = Service(database_url=db_factory.create("workers"), nats_url=nats_url, topology=topology,
                  # A 30 s poll: the relay is woken by a nudge (local, or the ping from the other worker).
                  extra_env={"KEYLEDGER_WORKERS": "2", "KEYLEDGER_RELAY_POLL_S": "30"}).start(timeout=60)
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


def _metric(client: httpx.Client, name: str) -> float:
    """One sample of this connection's process, e.g. ``keyledger_leader`` or
    ``keyledger_events_appended_total{type="ApiKeyRevoked"}`` (0 when absent)."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _connection(service: Service) -> httpx.Client:
    """A client holding exactly one keep-alive connection, hence talking to one worker process."""
    return httpx.Client(base_url=service.url, timeout=10, limits=httpx.Limits(max_connections=1,
                                                                              max_keepalive_connections=1))


def _connection_to(service: Service, wanted: Callable[[str], bool], what: str) -> tuple[httpx.Client, str]:
    """A fresh connection (and its worker's role, "leader" or "other") that landed on a worker ``wanted`` takes;
    those that did not are closed unused. Which worker takes a connection is the kernel's choice: up to 200 tries."""
    for _ in range(200):
        client = _connection(service)
        role = "leader" if _metric(client, "keyledger_leader") == 1 else "other"
        if wanted(role):
            return client, role
        client.close()
    pytest.fail(f"no connection reached {what} in 200 attempts")


class WakePings:
    """Counts the empty core-NATS messages on ``<prefix>.internal.wake`` (a non-leader's nudge of the relay)."""

    def __init__(self, nats_url: str, prefix: str) -> None:
        self.count = 0
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._run(nats_url, f"{prefix}.internal.wake"),), daemon=True)

    async def _run(self, url: str, subject: str) -> None:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            async def note(msg: Any) -> None:
                self.count += 1

            await nc.subscribe(subject, cb=note)
            await nc.flush()
            self._ready.set()
            await self._stop.wait()
        finally:
            await nc.close()

    def __enter__(self) -> "WakePings":
        self._thread.start()
        assert self._ready.wait(10), "could not subscribe to the wake subject"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _revoked_in_stream(service: Service) -> set[str]:
    messages = read_stream_messages(service.nats_url, service.topology.events_stream)
    return {m.subject.rsplit(".", 1)[1] for m in messages if ".events.revoked." in m.subject}


def test_every_revocation_is_published_promptly_whichever_worker_took_it(workers: Service) -> None:
    me = workers.session()
    # Keys created on a connection to the leader (it nudges its relay in-process: no ping).
    creator, _ = _connection_to(workers, lambda role: role == "leader", "the leading worker")
    keys = []
    try:
        for _ in range(10):
            response = creator.post("/api/auth/api-key/create", json={}, headers=me)
            assert response.status_code == 200, response.text
            keys.append(response.json())
    finally:
        creator.close()

    served: dict[str, list[str]] = {"leader": [], "other": []}
    with WakePings(workers.nats_url, workers.topology.prefix) as pings:
        for key in keys:
            # A fresh connection: either worker may take it, the idler more often (a loaded CI machine once gave all
            # 40 to the non-leader, the leader busy with its background work). One that lands on a worker that has
            # served its five is dropped unused, so each serves five.
            client, role = _connection_to(workers, lambda role: len(served[role]) < 5,
                                          f"a worker that served fewer than five ({served})")
            try:
                metric = 'keyledger_events_appended_total{type="ApiKeyRevoked"}'
                appended = _metric(client, metric)
                pinged = pings.count
                response = client.post("/api/auth/api-key/delete", json={"keyId": key["id"]}, headers=me)
                assert response.status_code == 200, response.text
                # That very process appended the revocation...
                assert _metric(client, metric) == appended + 1
                if role == "other":  # ...and, not leading, pinged the leader's relay on NATS
                    wait_until(lambda: pings.count > pinged, timeout=10, what="the non-leader's wake ping")
            finally:
                client.close()
            served[role].append(key["id"])
    assert len(served["leader"]) == len(served["other"]) == 5, served
    revoked = served["leader"] + served["other"]
    assert all(workers.verify(k["key"])["valid"] is False for k in keys if k["id"] in revoked)

    # Published long before the relay's 30 s poll, from whichever worker took them.
    wait_until(lambda: set(revoked) <= _revoked_in_stream(workers), timeout=15, interval=0.1,
               what="every revocation on JetStream")
    with psycopg.connect(workers.database_url, autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, timeout=15,
                   what="the outbox drained")


def test_an_http_only_process_wakes_the_relay_of_another(workers: Service) -> None:
    """``serve --no-relay --no-projections`` beside a leader: it never leads, and after each commit it pings
    the leader on NATS, so its revocations are published promptly rather than at the leader's next poll."""
    http_only = Service(database_url=workers.database_url, nats_url=workers.nats_url, topology=workers.topology,
                        extra_env={"KEYLEDGER_RUN_RELAY": "0", "KEYLEDGER_RUN_PROJECTIONS": "0"}).start(timeout=60)
    try:
        me = http_only.session()
        key = http_only.create_key(me)
        with _connection(http_only) as client:
            assert _metric(client, "keyledger_leader") == 0
        with WakePings(workers.nats_url, workers.topology.prefix) as pings:
            assert http_only.delete(me, key["id"]).status_code == 200
            wait_until(lambda: pings.count >= 1, timeout=10, what="the http-only process's wake ping")
        wait_until(lambda: key["id"] in _revoked_in_stream(workers), timeout=15, interval=0.1,
                   what="the revocation on JetStream")
        assert http_only.verify(key["key"])["valid"] is False
    finally:
        http_only.stop()
