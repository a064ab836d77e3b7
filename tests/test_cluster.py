"""The shape operators deploy: a 3-node JetStream cluster with R3 streams, one PostgreSQL, two service processes,
all on loopback (``keyledger dev-cluster`` starts the same). Under revoke load:

* killing the node that leads the events stream loses nothing: every revoke answered 200 is in the stream
  (by ``Nats-Msg-Id``) and has its invalidation, and a cache on a surviving node refuses each revoked key
  within staleness + 1 s of its 200, election or not;
* killing the leading service process hands the background work over within 3 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import psycopg
import pytest

from harness import Service, stream_messages, unique_topology, wait_until
from keyledger.client import KeyCache
from keyledger.embedded import NatsCluster

STALENESS = 1.0
TAKEOVER_BOUND_S = 3.0 + 7.0  # the 3 s contract plus a generous margin for a loaded CI machine
KEYS = 40
KILL_AFTER = 12


def is_leader(service: Service) -> bool:
    try:
        return "keyledger_leader 1.0" in httpx.get(f"{service.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return False


async def stream_leader(url: str, stream: str) -> str:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    try:
        return (await nc.jetstream(timeout=5).stream_info(stream)).cluster.leader
    finally:
        await nc.close()


def terms(logs: Path) -> int:
    """Leadership terms begun so far by the two service processes (their logs: a.log, b.log)."""
    return sum(path.read_text(errors="replace").count("leading background work (epoch")
               for path in (logs / "a.log", logs / "b.log") if path.exists())


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    nodes = NatsCluster(tmp_path / "nats")
    yield nodes
    nodes.stop()


def test_losing_the_stream_leaders_node_and_the_leading_process_loses_nothing(
        cluster: NatsCluster, db_factory: Any, tmp_path: Path) -> None:
    database_url = db_factory.create("cluster")
    topology = unique_topology("cluster")
    env = {"KEYLEDGER_STREAM_REPLICAS": "3"}
    first = Service(database_url=database_url, nats_url=cluster.url, topology=topology,
                    log_path=tmp_path / "a.log", extra_env=env).start(timeout=40)
    second: Service | None = None
    try:
        wait_until(lambda: httpx.get(f"{first.url}/ready", timeout=5).status_code == 200, timeout=60,
                   what="the first process ready on the cluster (R3 streams need the meta leader)")
        second = Service(database_url=database_url, nats_url=cluster.url, topology=topology, secret=first.secret,
                         log_path=tmp_path / "b.log", extra_env=env).start(timeout=40)
        services = (first, second)
        me = first.session()
        keys = [first.create_key(me) for _ in range(KEYS)]
        leader_name = asyncio.run(stream_leader(cluster.url, topology.events_stream))
        doomed = cluster.by_name[leader_name]
        survivor = next(n for n in cluster.nodes if n is not doomed)

        async def scenario() -> list[str]:
            revoked: list[str] = []
            async with KeyCache([s.url for s in services], survivor.url, topology=topology,
                                staleness=STALENESS) as cache, httpx.AsyncClient(timeout=30) as http:
                deadline = time.monotonic() + 30
                while not cache.trusted:
                    assert time.monotonic() < deadline, "the cache never got a freshness proof"
                    await asyncio.sleep(0.05)
                for key in keys:
                    assert (await cache.verify(key["key"])).valid
                for i, key in enumerate(keys):
                    if i == KILL_AFTER:
                        await asyncio.to_thread(doomed.kill)
                    service = services[i % 2]
                    r = await http.post(f"{service.url}/api/auth/api-key/delete", headers=me,
                                        json={"keyId": key["id"]})
                    assert r.status_code == 200, r.text
                    answered = time.monotonic()
                    revoked.append(key["id"])
                    while (await cache.verify(key["key"])).valid:
                        assert time.monotonic() - answered <= STALENESS + 1.0, (
                            f"revoked key {i} served as valid {time.monotonic() - answered:.2f}s after its 200")
                        await asyncio.sleep(0.02)
            return revoked

        terms_before = terms(tmp_path)
        revoked = asyncio.run(scenario())
        assert len(revoked) == KEYS
        # While the events stream elected a new leader nobody could publish: the lease was not handed around
        # (each new term restarts every projection's consumers). At most one handover, once JetStream was back.
        assert terms(tmp_path) - terms_before <= 1, "leadership changed hands more than once over the election"

        # Nothing lost: the outbox drains on the two surviving nodes, and every revocation is in both streams.
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_until(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, timeout=60,
                       what="the outbox drained after the election")
            ids = {r[0]: r[1] for r in conn.execute(
                "SELECT id::text, stream_id FROM events WHERE type = 'ApiKeyRevoked'").fetchall()}
        assert set(ids.values()) == set(revoked)

        def all_published() -> bool:
            try:
                events = asyncio.run(stream_messages(survivor.url, topology.events_stream))
                invalidations = asyncio.run(stream_messages(survivor.url, topology.invalidations_stream))
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                # A stream whose leader was on the killed node answers nothing (or 503) until its election ends,
                # seconds on a loaded machine: "not yet", not "never"; the deadline below decides.
                return False
            published = {(m.headers or {}).get("Nats-Msg-Id") for m in events}
            invalidated = {json.loads(m.data)["keyId"] for m in invalidations}
            return set(ids) <= published and set(revoked) <= invalidated

        wait_until(all_published, timeout=60, interval=0.5, what="every revocation and its invalidation in the R3 streams")

        # The leading process dies: the other takes over within 3 s.
        leading, other = (first, second) if is_leader(first) else (second, first)
        assert is_leader(leading) and not is_leader(other)
        leading.kill()
        killed = time.monotonic()
        wait_until(lambda: is_leader(other), timeout=30, what="the surviving process to lead")
        takeover = time.monotonic() - killed
        print(f"\n[cluster] leading process killed: takeover after {takeover:.2f}s")
        # The contract is 3 s (about 1.5 s here; bench/takeover_bench.py measures it): a test asserts it with a
        # margin a loaded 2-core machine cannot miss, and prints what it saw.
        assert takeover < TAKEOVER_BOUND_S
    finally:
        first.stop()
        if second is not None:
            second.stop()
