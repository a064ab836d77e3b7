"""Issue 5, the parts landed so far: server callers, permissions in verify, the expiry sweeper."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from harness import (Service, count_events, create_key_in_the_past, delete_streams, read_stream_messages,
                     unique_topology, wait_until)
from keyledger import sweeper
from servers import DatabaseFactory

TOKEN = "s3rv1ce-token-for-tests-only-0123456789"


@pytest.fixture(scope="module")
def server(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("lifecycle")
    svc = Service(database_url=db_factory.create("lifecycle"), nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_SERVICE_TOKEN": TOKEN}).start()
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


BEARER = {"authorization": f"Bearer {TOKEN}"}


def test_a_server_caller_acts_for_a_user_and_may_set_server_only_fields(server: Service) -> None:
    user = server.session()
    user_id = user["x-test-user-id"]
    created = server.post("api-key/create", BEARER, json={
        "userId": user_id, "name": "backend", "remaining": 100, "rateLimitEnabled": True, "rateLimitMax": 50,
        "rateLimitTimeWindow": 60_000, "refillAmount": 100, "refillInterval": 86_400_000,
        "permissions": {"sites": ["read", "write"]},
    })
    assert created.status_code == 200, created.text
    key = created.json()
    assert key["referenceId"] == user_id and key["remaining"] == 100 and key["rateLimitEnabled"] is True
    assert key["permissions"] == {"sites": ["read", "write"]} and key["rateLimitMax"] == 50

    # The owner's browser session sees it; the record in the projection agrees with the create answer.
    got = server.get("api-key/get", user, params={"id": key["id"]}).json()
    assert {k: got[k] for k in ("remaining", "permissions", "rateLimitTimeWindow", "refillInterval")} == {
        "remaining": 100, "permissions": {"sites": ["read", "write"]}, "rateLimitTimeWindow": 60_000,
        "refillInterval": 86_400_000}

    updated = server.post("api-key/update", BEARER, json={"userId": user_id, "keyId": key["id"],
                                                          "permissions": {"sites": ["read"]}, "remaining": 5})
    assert updated.status_code == 200, updated.text
    assert updated.json()["permissions"] == {"sites": ["read"]} and updated.json()["remaining"] == 5
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        event = conn.execute("SELECT type, data, metadata FROM events WHERE stream_id = %s AND version = 2",
                             (key["id"],)).fetchone()
    assert event[0] == "ApiKeyUpdated" and event[1]["permissions"] == {"sites": ["read"]}
    assert event[2]["userId"] == user_id and event[2]["via"] == "server" and TOKEN not in json.dumps(event[2])

    listed = server.get("api-key/list", BEARER, params={"userId": user_id}).json()
    assert [k["id"] for k in listed["apiKeys"]] == [key["id"]]
    # Acting for another user, the key does not exist.
    stranger = server.session()["x-test-user-id"]
    assert server.post("api-key/delete", BEARER, json={"userId": stranger, "keyId": key["id"]}).status_code == 404
    assert server.post("api-key/delete", BEARER, json={"userId": user_id, "keyId": key["id"]}).status_code == 200


def test_a_browser_cannot_set_server_only_fields(server: Service) -> None:
    user = server.session()
    for field, value in (("remaining", 5), ("permissions", {"a": ["b"]}), ("rateLimitEnabled", True),
                         ("userId", "someoneelse")):
        response = server.post("api-key/create", user, json={field: value})
        assert response.status_code == 400 and response.json()["code"] == "SERVER_ONLY_PROPERTY", field


def test_a_wrong_bearer_token_is_401_without_falling_back_to_the_cookie(server: Service) -> None:
    user = server.session()
    key = server.create_key(user)
    for token in ("wrong", TOKEN + "x", TOKEN[:-1]):
        headers = {**user, "authorization": f"Bearer {token}"}
        response = server.post("api-key/delete", headers, json={"keyId": key["id"], "userId": user["x-test-user-id"]})
        assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED", token
    assert count_events(server.database_url, key["id"]) == 1
    bad_user = server.post("api-key/create", BEARER, json={"userId": 42})
    assert bad_user.status_code == 400 and bad_user.json()["code"] == "VALIDATION_ERROR"
    bad_field = server.post("api-key/create", BEARER, json={"userId": "u1", "remaining": -1})
    assert bad_field.status_code == 400 and bad_field.json()["code"] == "VALIDATION_ERROR"


def test_without_a_configured_token_there_are_no_server_callers(service: Service) -> None:
    response = service.post("api-key/create", BEARER, json={"userId": "u1"})
    assert response.status_code == 401


def test_verify_checks_requested_permissions(server: Service) -> None:
    user = server.session()
    key = server.post("api-key/create", BEARER, json={
        "userId": user["x-test-user-id"], "permissions": {"files": ["read", "write"], "sites": ["read"]},
    }).json()["key"]

    def verify(permissions: Any) -> dict[str, Any]:
        return server.post("api-key/verify", json={"key": key, "permissions": permissions}).json()

    assert verify({"files": ["read"]})["valid"] is True
    assert verify({"files": ["read", "write"], "sites": ["read"]})["valid"] is True
    for missing in ({"files": ["delete"]}, {"users": ["read"]}, {"files": ["read"], "sites": ["write"]}):
        answer = verify(missing)
        assert answer["valid"] is False and answer["error"]["code"] == "KEY_NOT_FOUND", missing
    malformed = server.post("api-key/verify", json={"key": key, "permissions": {"files": "read"}})
    assert malformed.status_code == 400 and malformed.json()["code"] == "VALIDATION_ERROR"
    plain = server.create_key(user)["key"]  # no permissions at all
    assert server.post("api-key/verify", json={"key": plain, "permissions": {"a": ["b"]}}).json()["valid"] is False


async def _create_expired(url: str, owner: str) -> tuple[str, str]:
    """A key created two days ago that expired one day later (expiresIn's minimum is a day)."""
    return await create_key_in_the_past(url, owner, days_ago=2, expires_in=86_400)


def test_two_sweepers_at_once_record_one_expiry(db_factory: DatabaseFactory) -> None:
    url = db_factory.create("sweepers")  # no service here: only our two sweepers write

    async def scenario() -> list[int]:
        keys = [await _create_expired(url, "owner") for _ in range(30)]
        connections = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(2)]
        try:
            counts = await asyncio.gather(*(sweeper.sweep_once(c) for c in connections))
            again = await sweeper.sweep_once(connections[0])
        finally:
            for c in connections:
                await c.close()
        assert again == 0
        assert len(keys) == 30
        return counts

    counts = asyncio.run(scenario())
    assert sum(counts) == 30
    with psycopg.connect(url, autocommit=True) as conn:
        per_key = conn.execute("SELECT stream_id, count(*) FROM events WHERE type = 'ApiKeyExpired' "
                               "GROUP BY stream_id").fetchall()
        assert len(per_key) == 30 and {n for _, n in per_key} == {1}
        assert conn.execute("SELECT count(*) FROM active_api_keys WHERE NOT expired").fetchone() == (0,)


def test_the_running_service_records_expiry_and_caches_hear_of_it(server: Service) -> None:
    owner = server.session()["x-test-user-id"]
    key_id, key = asyncio.run(_create_expired(server.database_url, owner))
    assert server.verify(key)["error"]["code"] == "KEY_EXPIRED"  # verify needs no event
    wait_until(lambda: count_events(server.database_url, key_id, "ApiKeyExpired") == 1, timeout=10,
               what="the service's sweeper to record the expiry")

    def published() -> bool:
        events = read_stream_messages(server.nats_url, server.topology.events_stream)
        invalidations = read_stream_messages(server.nats_url, server.topology.invalidations_stream)
        return (any(m.subject.endswith(f".expired.{key_id}") for m in events)
                and any(json.loads(m.data)["keyId"] == key_id and json.loads(m.data)["reason"] == "expired"
                        for m in invalidations))

    wait_until(published, timeout=10, what="ApiKeyExpired on NATS and its invalidation")
    assert count_events(server.database_url, key_id, "ApiKeyExpired") == 1


def _limited_key(server: Service, **limits: Any) -> dict[str, Any]:
    user = server.session()
    response = server.post("api-key/create", BEARER, json={"userId": user["x-test-user-id"], **limits})
    assert response.status_code == 200, response.text
    return {**response.json(), "owner": user["x-test-user-id"]}


def test_usage_limit_counts_down_and_concurrent_verifies_never_overspend(server: Service) -> None:
    key = _limited_key(server, remaining=3)
    answers = [server.verify(key["key"]) for _ in range(4)]
    assert [a["valid"] for a in answers] == [True, True, True, False]
    assert [a["key"]["remaining"] for a in answers[:3]] == [2, 1, 0]
    assert answers[3]["error"] == {"message": "Usage limit exceeded.", "code": "USAGE_EXCEEDED"}

    crowd = _limited_key(server, remaining=20)

    async def storm() -> list[bool]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            responses = await asyncio.gather(*(
                client.post("/api/auth/api-key/verify", json={"key": crowd["key"]}) for _ in range(40)))
        return [r.json()["valid"] for r in responses]

    results = asyncio.run(storm())
    assert results.count(True) == 20 and results.count(False) == 20
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT remaining FROM api_key_usage WHERE key_id = %s", (crowd["id"],)).fetchone() == (0,)

    # A server that sets `remaining` again restarts the count from the new value (an event, in the log).
    reset = server.post("api-key/update", BEARER, json={"userId": key["owner"], "keyId": key["id"], "remaining": 1})
    assert reset.status_code == 200, reset.text
    assert server.verify(key["key"])["valid"] is True
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"


def test_an_exhausted_key_is_refilled_after_its_interval(server: Service) -> None:
    key = _limited_key(server, remaining=1, refillAmount=2, refillInterval=1000)
    assert server.verify(key["key"])["valid"] is True
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"
    refilled = wait_until(lambda: server.verify(key["key"])["valid"], timeout=5, interval=0.1,
                          what="the refill one interval later")
    assert refilled is True
    assert server.verify(key["key"])["valid"] is True  # the second use of the refill of 2
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"
    assert count_events(server.database_url, key["id"]) == 1  # counters are not events


def test_rate_limit_answers_rate_limited_with_try_again_in(server: Service) -> None:
    key = _limited_key(server, rateLimitEnabled=True, rateLimitMax=2, rateLimitTimeWindow=60_000)
    assert [server.verify(key["key"])["valid"] for _ in range(2)] == [True, True]
    limited = server.verify(key["key"])
    assert limited["valid"] is False and limited["error"]["code"] == "RATE_LIMITED"
    assert 0 < limited["error"]["details"]["tryAgainIn"] <= 60_000
    assert server.verify(key["key"])["error"]["code"] == "RATE_LIMITED"
