"""Truthful outcomes: a write whose database connection fails after the statement was sent.

The service talks to PostgreSQL through a proxy the test controls, and a test-only trigger makes marked appends
sleep inside their statement, so the failure lands exactly between "sent" and "answered":

* the reply is lost after the commit: the service finds the event on another connection and answers 200;
* the backend is killed before the commit: it finds no event and answers 503 "nothing was changed";
* the database stays unreachable: it answers 503 ``OUTCOME_UNKNOWN``, and says so, rather than guess.

Each time the answer is checked against what the log holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from harness import Service, delete_streams, unique_topology, wait_until
from proxy import TcpProxy

SLOW_APPENDS = """
CREATE OR REPLACE FUNCTION test_slow_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metadata->>'requestId' LIKE 'slow-%' THEN
        PERFORM pg_sleep(0.6);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER test_slow_append AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION test_slow_append();
"""
SLEEPING = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = current_database()"


class Rig:
    def __init__(self, database_url: str, proxy: TcpProxy, service: Service) -> None:
        self.database_url = database_url  # direct, not through the proxy
        self.proxy = proxy
        self.service = service

    def query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def slow_delete(self, headers: dict[str, str], key_id: str) -> tuple[threading.Thread, list[httpx.Response]]:
        """Send a delete whose append will sleep 0.6 s inside its statement; returns (thread, [response])."""
        answer: list[httpx.Response] = []
        slow = {**headers, "x-request-id": f"slow-{uuid.uuid4()}"}
        thread = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{self.service.url}/api/auth/api-key/delete", headers=slow,
                                                    json={"keyId": key_id}, timeout=60)))
        thread.start()
        wait_until(lambda: self.query(SLEEPING), timeout=10, interval=0.005, what="the append inside its statement")
        return thread, answer

    def revoked(self, key_id: str) -> int:
        return self.query("SELECT count(*) FROM events WHERE stream_id = %s AND type = 'ApiKeyRevoked'",
                          (key_id,))[0][0]


@pytest.fixture
def rig(db_factory: Any, nats_url: str) -> Iterator[Rig]:
    database_url = db_factory.create("outcomes")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SLOW_APPENDS)
    proxy, proxied_url = TcpProxy.to_postgres(database_url)
    proxy.start()
    topology = unique_topology("outcomes")
    service = Service(database_url=proxied_url, nats_url=nats_url, topology=topology).start()
    try:
        yield Rig(database_url, proxy, service)
    finally:
        service.stop()
        proxy.close()
        asyncio.run(delete_streams(nats_url, topology))


def test_a_reply_lost_after_the_commit_is_answered_with_the_real_result(rig: Rig) -> None:
    me = rig.service.session()
    key = rig.service.create_key(me)
    thread, answer = rig.slow_delete(me, key["id"])
    rig.proxy.blackhole()  # the server finishes and commits; its answer never arrives
    wait_until(lambda: rig.revoked(key["id"]) == 1 and not rig.query(SLEEPING), timeout=10,
               what="the revocation committed")
    rig.proxy.cut()  # the connection fails with the answer in flight
    rig.proxy.restore()
    thread.join(30)
    assert answer and answer[0].status_code == 200 and answer[0].json() == {"success": True}, answer
    assert rig.revoked(key["id"]) == 1
    assert rig.service.verify(key["key"])["valid"] is False


def test_a_write_killed_before_its_commit_is_a_503_that_changed_nothing(rig: Rig) -> None:
    me = rig.service.session()
    key = rig.service.create_key(me)
    thread, answer = rig.slow_delete(me, key["id"])
    [(pid,)] = rig.query(SLEEPING)
    rig.query("SELECT pg_terminate_backend(%s)", (pid,))
    thread.join(30)
    assert answer and answer[0].status_code == 503, answer
    assert answer[0].json() == {"message": "The database is unavailable; nothing was changed",
                                "code": "SERVICE_UNAVAILABLE"}
    assert rig.revoked(key["id"]) == 0
    assert rig.service.verify(key["key"])["valid"] is True


def test_an_outcome_that_cannot_be_found_out_is_said_to_be_unknown(rig: Rig) -> None:
    me = rig.service.session()
    key = rig.service.create_key(me)
    thread, answer = rig.slow_delete(me, key["id"])
    rig.proxy.blackhole()
    wait_until(lambda: rig.revoked(key["id"]) == 1, timeout=10, what="the revocation committed")
    rig.proxy.cut()  # and it stays cut: the service cannot reach the database to find out
    started = time.monotonic()
    thread.join(30)
    assert answer and answer[0].status_code == 503, answer
    body = answer[0].json()
    assert body["code"] == "OUTCOME_UNKNOWN" and "could not be found out" in body["message"], body
    assert time.monotonic() - started < 15
    rig.proxy.restore()
    assert rig.revoked(key["id"]) == 1  # it had committed: "unknown" was the truth, "nothing changed" a lie
