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
from keyledger.background import sweeper
from servers import DatabaseFactory

TOKEN = "s3rv1ce-token-for-tests-only-0123456789"


@pytest.fixture(scope="module")
def server(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("lifecycle")
    svc = Service(database_url=db_factory.create("lifecycle"), nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_SERVICE_TOKEN": TOKEN, "KEYLEDGER_ENABLE_METADATA": "1"}).start()
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

    async def scenario() -> tuple[list[str], list[int]]:
        keys = [(await _create_expired(url, "owner"))[0] for _ in range(30)]
        connections = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(2)]
        try:
            counts = await asyncio.gather(*(sweeper.sweep_once(c) for c in connections))
            again = await sweeper.sweep_once(connections[0])
        finally:
            for c in connections:
                await c.close()
        assert again == 0
        return keys, counts

    keys, counts = asyncio.run(scenario())
    assert sum(counts) == 30  # the two sweepers' reports add up to one expiry per key...
    with psycopg.connect(url, autocommit=True) as conn:
        per_key = dict(conn.execute("SELECT stream_id, count(*) FROM events WHERE type = 'ApiKeyExpired' "
                                    "GROUP BY stream_id").fetchall())
        assert per_key == {key_id: 1 for key_id in keys}  # ...and the log agrees: each key exactly once
        assert conn.execute("SELECT count(*) FROM active_api_keys WHERE NOT expired").fetchone() == (0,)


def test_the_running_service_records_expiry_and_caches_hear_of_it(server: Service) -> None:
    owner = server.session()["x-test-user-id"]
    key_id, key = asyncio.run(_create_expired(server.database_url, owner))
    assert server.verify(key)["error"]["code"] == "KEY_EXPIRED"  # verify needs no event
    wait_until(lambda: count_events(server.database_url, key_id, "ApiKeyExpired") == 1, timeout=30,
               what="the service's sweeper to record the expiry")

    def published() -> bool:
        events = read_stream_messages(server.nats_url, server.topology.events_stream)
        invalidations = read_stream_messages(server.nats_url, server.topology.invalidations_stream)
        return (any(m.subject.endswith(f".expired.{key_id}") for m in events)
                and any(json.loads(m.data)["keyId"] == key_id and json.loads(m.data)["reason"] == "expired"
                        for m in invalidations))

    wait_until(published, timeout=30, what="ApiKeyExpired on NATS and its invalidation")
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


def _age_usage(server: Service, key_id: str, **ago: float) -> None:
    """Move a key's usage clock back, as if that much time had passed: ``last_refill_at`` and/or
    ``last_request`` (api_key_usage, the counters' row) set to now minus the given seconds. Verify compares them
    with its own clock, so a refill or a new rate-limit window is due without waiting for it, and nothing in
    the test depends on how fast the machine is."""
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        for column, seconds in ago.items():
            updated = conn.execute(f"UPDATE api_key_usage SET {column} = now() - make_interval(secs => %s) "
                                   "WHERE key_id = %s", (seconds, key_id)).rowcount
            assert updated == 1


def test_an_exhausted_key_is_refilled_after_its_interval(server: Service) -> None:
    # An hour's interval: no refill can fall due while the test runs, however slow the machine.
    key = _limited_key(server, remaining=1, refillAmount=2, refillInterval=3_600_000)
    assert server.verify(key["key"])["valid"] is True
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"
    _age_usage(server, key["id"], last_refill_at=3_590)  # ten seconds short of the interval
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"
    _age_usage(server, key["id"], last_refill_at=3_601)  # the interval has passed
    refilled = server.verify(key["key"])
    assert refilled["valid"] is True and refilled["key"]["remaining"] == 1  # refilled to 2, this use took one
    assert server.verify(key["key"])["valid"] is True  # the second use of the refill of 2
    assert server.verify(key["key"])["error"]["code"] == "USAGE_EXCEEDED"  # the next refill is an hour away
    assert count_events(server.database_url, key["id"]) == 1  # counters are not events


def test_rate_limit_answers_rate_limited_with_try_again_in(server: Service) -> None:
    key = _limited_key(server, rateLimitEnabled=True, rateLimitMax=2, rateLimitTimeWindow=60_000)
    assert [server.verify(key["key"])["valid"] for _ in range(2)] == [True, True]
    limited = server.verify(key["key"])
    assert limited["valid"] is False and limited["error"]["code"] == "RATE_LIMITED"
    assert 0 < limited["error"]["details"]["tryAgainIn"] <= 60_000
    assert server.verify(key["key"])["error"]["code"] == "RATE_LIMITED"


def test_the_rate_limit_window_is_counted_from_the_last_request(server: Service) -> None:
    """``rateLimitMax`` requests per ``rateLimitTimeWindow`` ms, the window counted from the last counted
    request: inside it the next one is RATE_LIMITED with ``tryAgainIn`` = what is left of it; once a whole
    window has passed since the last request, the count starts again. The clock is moved by ageing the key's
    counter row, so nothing depends on the machine's speed."""
    key = _limited_key(server, rateLimitEnabled=True, rateLimitMax=2, rateLimitTimeWindow=60_000)
    answers = [server.verify(key["key"]) for _ in range(2)]
    assert [a["key"]["requestCount"] for a in answers] == [1, 2]
    assert server.verify(key["key"])["error"]["code"] == "RATE_LIMITED"

    _age_usage(server, key["id"], last_request=50)  # 10 s of the window left
    limited = server.verify(key["key"])
    assert limited["error"]["code"] == "RATE_LIMITED"
    assert 0 < limited["error"]["details"]["tryAgainIn"] <= 10_000
    # A refused request does not count, nor move the window: still about 10 s to wait.
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        count, since = conn.execute("SELECT request_count, extract(epoch FROM now() - last_request) "
                                    "FROM api_key_usage WHERE key_id = %s", (key["id"],)).fetchone()
    assert count == 2 and since >= 50

    _age_usage(server, key["id"], last_request=61)  # a whole window since the last request
    again = server.verify(key["key"])
    assert again["valid"] is True and again["key"]["requestCount"] == 1  # a new window
    assert server.verify(key["key"])["valid"] is True
    assert server.verify(key["key"])["error"]["code"] == "RATE_LIMITED"


def test_server_callers_get_read_history_and_rotate_for_the_user_they_name(server: Service) -> None:
    user = server.session()
    user_id = user["x-test-user-id"]
    key = server.create_key(user, name="owned")
    stranger = server.session()["x-test-user-id"]

    got = server.get("api-key/get", BEARER, params={"id": key["id"], "userId": user_id})
    assert got.status_code == 200 and got.json()["id"] == key["id"] and "key" not in got.json()
    rotated = server.post("api-key/rotate", BEARER, json={"keyId": key["id"], "userId": user_id})
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["key"]
    assert rotated.json()["referenceId"] == user_id and server.verify(new_secret)["valid"] is True
    history = server.get("api-key/history", BEARER, params={"id": key["id"], "userId": user_id})
    assert history.status_code == 200, history.text
    events = history.json()["events"]
    assert [e["type"] for e in events] == ["ApiKeyCreated", "ApiKeyRotated"]
    assert events[0]["actor"]["via"] == "session"
    assert events[1]["actor"] == {**events[1]["actor"], "userId": user_id, "via": "server", "sessionId": None}

    # Acting for someone else, the key does not exist; without userId the request is malformed; a wrong token
    # is 401. None of it writes anything.
    not_found = {"message": "API Key not found", "code": "KEY_NOT_FOUND"}
    for response in (server.get("api-key/get", BEARER, params={"id": key["id"], "userId": stranger}),
                     server.get("api-key/history", BEARER, params={"id": key["id"], "userId": stranger}),
                     server.post("api-key/rotate", BEARER, json={"keyId": key["id"], "userId": stranger})):
        assert response.status_code == 404 and response.json() == not_found, response.text
    for response in (server.get("api-key/get", BEARER, params={"id": key["id"]}),
                     server.get("api-key/history", BEARER, params={"id": key["id"]}),
                     server.post("api-key/rotate", BEARER, json={"keyId": key["id"]})):
        assert response.status_code == 400 and response.json()["code"] == "VALIDATION_ERROR", response.text
    wrong = {"authorization": "Bearer not-the-token"}
    for response in (server.get("api-key/get", wrong, params={"id": key["id"], "userId": user_id}),
                     server.get("api-key/history", wrong, params={"id": key["id"], "userId": user_id}),
                     server.post("api-key/rotate", wrong, json={"keyId": key["id"], "userId": user_id})):
        assert response.status_code == 401, response.text
    assert count_events(server.database_url, key["id"]) == 2
    assert server.verify(new_secret)["valid"] is True


def test_metadata_is_accepted_when_enabled(server: Service) -> None:
    """``KEYLEDGER_ENABLE_METADATA=1`` (this module's service): metadata is stored on create, changed by
    update (an ApiKeyUpdated with only that field), returned by get and verify; it must be an object."""
    user = server.session()
    created = server.post("api-key/create", user, json={"name": "meta", "metadata": {"plan": "pro", "seats": 3}})
    assert created.status_code == 200, created.text
    key = created.json()
    assert key["metadata"] == {"plan": "pro", "seats": 3}
    assert server.verify(key["key"])["key"]["metadata"] == {"plan": "pro", "seats": 3}

    updated = server.post("api-key/update", user, json={"keyId": key["id"], "metadata": {"plan": "team"}})
    assert updated.status_code == 200 and updated.json()["metadata"] == {"plan": "team"}, updated.text
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        kind, data = conn.execute("SELECT type, data FROM events WHERE stream_id = %s AND version = 2",
                                  (key["id"],)).fetchone()
    assert kind == "ApiKeyUpdated" and set(data) == {"keyHash", "metadata"} and data["metadata"] == {"plan": "team"}
    assert server.get("api-key/get", user, params={"id": key["id"]}).json()["metadata"] == {"plan": "team"}
    assert server.verify(key["key"])["key"]["metadata"] == {"plan": "team"}

    for bad in ("text", [1, 2], 5):
        refused = server.post("api-key/update", user, json={"keyId": key["id"], "metadata": bad})
        assert refused.status_code == 400 and refused.json()["code"] == "INVALID_METADATA_TYPE", bad
    assert count_events(server.database_url, key["id"]) == 2
