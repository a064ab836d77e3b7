"""``serve --workers 2``: two HTTP processes, one background leader (relay + subscribers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from harness import Service, delete_streams, read_stream_messages, unique_topology, wait_until
from servers import DatabaseFactory


@pytest.fixture(scope="module")
def workers(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("workers")
    svc = Service(database_url=db_factory.create("workers"), nats_url=nats_url, topology=topology,
                  # A 30 s poll: anything published sooner was woken by a nudge (local, or the ping from the other worker).
                  extra_env={"KEYLEDGER_WORKERS": "2", "KEYLEDGER_RELAY_POLL_S": "30"}).start(timeout=40)
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


def test_every_revocation_is_published_promptly_whichever_worker_took_it(workers: Service) -> None:
    me = workers.session()
    keys = [workers.create_key(me) for _ in range(20)]

    async def revoke_all() -> list[int]:
        # Separate connections, so both worker processes get requests.
        async def one(key_id: str) -> int:
            async with httpx.AsyncClient(base_url=workers.url, timeout=10) as client:
                return (await client.post("/api/auth/api-key/delete", json={"keyId": key_id}, headers=me)).status_code
        return await asyncio.gather(*(one(k["id"]) for k in keys))

    assert asyncio.run(revoke_all()) == [200] * 20
    assert all(workers.verify(k["key"])["valid"] is False for k in keys)
    started = time.monotonic()

    def revoked_in_stream() -> int:
        messages = read_stream_messages(workers.nats_url, workers.topology.events_stream)
        return sum(".events.revoked." in m.subject for m in messages)

    wait_until(lambda: revoked_in_stream() == 20, timeout=10, what="20 revocations on JetStream")
    # The non-leader worker pings the leader instead of waiting for the relay's (here 30 s) poll.
    assert time.monotonic() - started < 2.0
    with __import__("psycopg").connect(workers.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_an_http_only_process_wakes_the_relay_of_another(workers: Service) -> None:
    """``serve --no-relay --no-projections`` beside a leader: its revocations are published promptly, not at the
    leader's next poll (30 s here), because it pings the leader after each commit."""
    http_only = Service(database_url=workers.database_url, nats_url=workers.nats_url, topology=workers.topology,
                        extra_env={"KEYLEDGER_RUN_RELAY": "0", "KEYLEDGER_RUN_PROJECTIONS": "0"}).start()
    try:
        me = http_only.session()
        key = http_only.create_key(me)
        started = time.monotonic()
        assert http_only.delete(me, key["id"]).status_code == 200

        def published() -> bool:
            messages = read_stream_messages(workers.nats_url, workers.topology.events_stream)
            return any(m.subject.endswith(f".revoked.{key['id']}") for m in messages)

        wait_until(published, timeout=10, what="the revocation on JetStream")
        assert time.monotonic() - started < 2.0
    finally:
        http_only.stop()
