"""Issue 5, the verify path: one statement per verify, live counters in get/list, lastRequest for keys without
limits (batched), and superseded secrets (rotation's grace period) verifying as the same key.

Real PostgreSQL, NATS and ``keyledger serve``. Superseded secrets are seeded straight into their projection table
(``superseded_key_secrets``), so these tests do not depend on how a rotation writes them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from harness import Service, count_events, delete_streams, unique_topology, wait_until
from keyledger.core import records
from servers import DatabaseFactory

TOKEN = "usage-service-token-for-tests-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}
FLUSH_S = 0.2


@pytest.fixture(scope="module")
def server(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("usage")
    svc = Service(database_url=db_factory.create("usage"), nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_SERVICE_TOKEN": TOKEN,
                             "KEYLEDGER_LAST_REQUEST_FLUSH_S": str(FLUSH_S)}).start()
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


def _key(server: Service, **fields: Any) -> dict[str, Any]:
    """A key created by a server caller (so it may carry limits and permissions), with its owner's cookie."""
    owner = server.session()
    response = server.post("api-key/create", BEARER, json={"userId": owner["x-test-user-id"], **fields})
    assert response.status_code == 200, response.text
    return {**response.json(), "owner": owner}


def _get(server: Service, key: dict[str, Any]) -> dict[str, Any]:
    response = server.get("api-key/get", key["owner"], params={"id": key["id"]})
    assert response.status_code == 200, response.text
    return response.json()


def _listed(server: Service, key: dict[str, Any]) -> dict[str, Any]:
    response = server.get("api-key/list", key["owner"])
    assert response.status_code == 200, response.text
    return next(k for k in response.json()["apiKeys"] if k["id"] == key["id"])


def _verify(server: Service, secret: str, **body: Any) -> dict[str, Any]:
    response = server.post("api-key/verify", json={"key": secret, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _usage_row(url: str, key_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT remaining, request_count, last_request FROM api_key_usage WHERE key_id = %s",
                            (key_id,)).fetchone()


def _supersede(url: str, key_id: str, valid_for: dt.timedelta) -> str:
    """A made-up previous secret of ``key_id``, as the projection records one after a rotation with grace."""
    secret = records.new_key(None)
    valid_until = dt.datetime.now(dt.timezone.utc) + valid_for
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO superseded_key_secrets (key_hash, key_id, start, valid_until) VALUES (%s, %s, %s, %s)",
                     (records.hash_key(secret), key_id, secret[:6], valid_until))
    return secret


# ----------------------------------------------------------------------------------------------------------
# Usage limits: one statement, counted atomically
# ----------------------------------------------------------------------------------------------------------
def test_fifty_concurrent_verifies_of_a_key_with_twenty_uses_give_exactly_twenty(server: Service) -> None:
    key = _key(server, remaining=20)

    async def crowd() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as client:
            responses = await asyncio.gather(*(
                client.post("/api/auth/api-key/verify", json={"key": key["key"]}) for _ in range(50)))
        return [r.json() for r in responses]

    answers = asyncio.run(crowd())
    valid = [a for a in answers if a["valid"]]
    assert len(valid) == 20
    assert {a["error"]["code"] for a in answers if not a["valid"]} == {"USAGE_EXCEEDED"}
    # Each allowed use saw a different count: no two verifies counted from the same value.
    assert sorted(a["key"]["remaining"] for a in valid) == list(range(20))
    assert _usage_row(server.database_url, key["id"])[0] == 0
    assert _get(server, key)["remaining"] == 0 and _listed(server, key)["remaining"] == 0
    assert count_events(server.database_url, key["id"]) == 1  # counters are not events


def test_get_and_list_show_the_live_counters(server: Service) -> None:
    key = _key(server, remaining=5, rateLimitEnabled=True, rateLimitMax=100, rateLimitTimeWindow=60_000)
    fresh = _get(server, key)
    assert fresh["remaining"] == 5 and fresh["requestCount"] == 0 and fresh["lastRequest"] is None
    answers = [_verify(server, key["key"]) for _ in range(2)]
    assert [a["key"]["remaining"] for a in answers] == [4, 3]
    assert [a["key"]["requestCount"] for a in answers] == [1, 2]

    for shown in (_get(server, key), _listed(server, key)):
        assert shown["remaining"] == 3 and shown["requestCount"] == 2
        assert shown["lastRequest"] == answers[-1]["key"]["lastRequest"] is not None
        assert set(shown) == set(fresh)  # the better-auth record shape, nothing added

    # A server that sets `remaining` again restarts the count: get shows the new configured value at once.
    reset = server.post("api-key/update", BEARER, json={"userId": key["owner"]["x-test-user-id"],
                                                        "keyId": key["id"], "remaining": 10})
    assert reset.status_code == 200, reset.text
    assert _get(server, key)["remaining"] == 10 and _listed(server, key)["remaining"] == 10
    assert _verify(server, key["key"])["key"]["remaining"] == 9
    assert _get(server, key)["remaining"] == 9


def test_a_refill_shows_in_last_refill_at(server: Service) -> None:
    # An hour's interval, and the counter row aged past it: the refill is due without waiting for it, and no
    # second refill can fall due while the test runs, however slow the machine.
    key = _key(server, remaining=1, refillAmount=3, refillInterval=3_600_000)
    assert _verify(server, key["key"])["valid"] is True
    exhausted = _verify(server, key["key"])
    assert exhausted["error"]["code"] == "USAGE_EXCEEDED"
    assert _get(server, key)["lastRefillAt"] is None  # never refilled yet
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_key_usage SET last_refill_at = now() - interval '61 minutes' WHERE key_id = %s",
                     (key["id"],))
    refilled = _verify(server, key["key"])
    assert refilled["valid"] is True
    assert refilled["key"]["remaining"] == 2 and refilled["key"]["lastRefillAt"] is not None
    refill_at = dt.datetime.fromisoformat(refilled["key"]["lastRefillAt"].replace("Z", "+00:00"))
    assert abs(refill_at - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)  # now, not the aged value
    assert _get(server, key)["lastRefillAt"] == refilled["key"]["lastRefillAt"]
    assert _listed(server, key)["lastRefillAt"] == refilled["key"]["lastRefillAt"]


# ----------------------------------------------------------------------------------------------------------
# lastRequest for keys without limits: batched
# ----------------------------------------------------------------------------------------------------------
def test_an_unlimited_key_gets_its_last_request_after_the_flush_interval(server: Service) -> None:
    key = _key(server)
    first = _verify(server, key["key"])
    assert first["valid"] is True and first["key"]["remaining"] is None
    seen = first["key"]["lastRequest"]
    assert seen is not None  # better-auth answers with the use it just recorded
    shown = wait_until(lambda: _get(server, key)["lastRequest"], timeout=30, interval=0.05,
                       what="the lastRequest flush")
    assert shown == seen and _listed(server, key)["lastRequest"] == seen
    assert _get(server, key)["requestCount"] == 0  # only limited keys count requests

    # lastRequest has millisecond resolution: let the clock pass the first one before the second verify.
    wait_until(lambda: records.iso(dt.datetime.now(dt.timezone.utc)) > seen, timeout=5, interval=0.001,
               what="the next millisecond")
    later = _verify(server, key["key"])["key"]["lastRequest"]
    assert later > seen
    wait_until(lambda: _get(server, key)["lastRequest"] == later, timeout=30, interval=0.05,
               what="the newer lastRequest")
    assert count_events(server.database_url, key["id"]) == 1


def test_plain_verify_writes_nothing_and_the_last_flush_happens_at_shutdown(
        db_factory: DatabaseFactory, nats_url: str) -> None:
    url = db_factory.create("lastreq")
    topology = unique_topology("lastreq")
    svc = Service(database_url=url, nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_LAST_REQUEST_FLUSH_S": "3600"}).start()
    try:
        owner = svc.session()
        keys = [svc.create_key(owner) for _ in range(3)]
        answers = [svc.verify(k["key"]) for k in keys for _ in range(2)]
        assert all(a["valid"] for a in answers)
        with psycopg.connect(url, autocommit=True) as conn:  # an hour to the next flush: nothing written yet
            assert conn.execute("SELECT count(*) FROM api_key_usage").fetchone() == (0,)
        revoked = keys.pop()
        assert svc.delete(owner, revoked["id"]).status_code == 200
    finally:
        svc.stop()  # SIGTERM: the service writes what it still holds before it exits
        asyncio.run(delete_streams(nats_url, topology))
    with psycopg.connect(url, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT key_id, last_request FROM api_key_usage").fetchall())
    # The revoked key gets no row; the others have the time of their last verify (the second answer's).
    assert set(rows) == {k["id"] for k in keys}
    assert {records.iso(rows[k["id"]]) for k in keys} == {answers[2 * i + 1]["key"]["lastRequest"]
                                                          for i in range(len(keys))}


# ----------------------------------------------------------------------------------------------------------
# Superseded secrets (rotation's grace period): the same key, the same checks, the same counters
# ----------------------------------------------------------------------------------------------------------
def test_a_superseded_secret_verifies_as_the_same_key_while_its_grace_lasts(server: Service) -> None:
    key = _key(server, remaining=3, permissions={"sites": ["read"]})
    old = _supersede(server.database_url, key["id"], dt.timedelta(hours=1))
    gone = _supersede(server.database_url, key["id"], dt.timedelta(seconds=-1))

    current = _verify(server, key["key"])
    via_old = _verify(server, old)
    assert current["valid"] is True and via_old["valid"] is True
    assert "graceUntil" not in current["key"]
    grace = dt.datetime.fromisoformat(via_old["key"].pop("graceUntil").replace("Z", "+00:00"))
    assert dt.timedelta(minutes=59) < grace - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=1)
    # The same record (the key's current start, not the old secret's), counted against the same limit.
    assert via_old["key"]["remaining"] == 1 and current["key"]["remaining"] == 2
    for field in ("id", "start", "referenceId", "permissions", "expiresAt", "name"):
        assert via_old["key"][field] == current["key"][field], field

    assert _verify(server, gone)["error"]["code"] == "INVALID_API_KEY"  # its grace is over
    assert _verify(server, old, permissions={"sites": ["write"]})["error"]["code"] == "KEY_NOT_FOUND"
    assert _verify(server, old, permissions={"sites": ["read"]})["valid"] is True  # the third and last use
    assert _verify(server, old)["error"]["code"] == "USAGE_EXCEEDED"
    assert _verify(server, key["key"])["error"]["code"] == "USAGE_EXCEEDED"

    owner_id = key["owner"]["x-test-user-id"]
    disabled = server.post("api-key/update", BEARER, json={"userId": owner_id, "keyId": key["id"], "enabled": False})
    assert disabled.status_code == 200, disabled.text
    assert _verify(server, old)["error"]["code"] == "KEY_DISABLED"
    assert server.post("api-key/delete", BEARER, json={"userId": owner_id, "keyId": key["id"]}).status_code == 200
    assert _verify(server, old)["error"]["code"] == "INVALID_API_KEY"


def test_a_superseded_secret_of_an_expired_key_is_expired(server: Service) -> None:
    key = _key(server)
    old = _supersede(server.database_url, key["id"], dt.timedelta(hours=1))
    with psycopg.connect(server.database_url, autocommit=True) as conn:  # the projection, as if time passed
        conn.execute("UPDATE active_api_keys SET expires_at = now() - interval '1 second' WHERE id = %s",
                     (key["id"],))
    assert _verify(server, old)["error"]["code"] == "KEY_EXPIRED"
    assert _verify(server, key["key"])["error"]["code"] == "KEY_EXPIRED"


def test_a_rate_limited_superseded_secret_shares_the_keys_window(server: Service) -> None:
    key = _key(server, rateLimitEnabled=True, rateLimitMax=2, rateLimitTimeWindow=60_000)
    old = _supersede(server.database_url, key["id"], dt.timedelta(hours=1))
    assert _verify(server, key["key"])["valid"] is True
    assert _verify(server, old)["valid"] is True
    limited = _verify(server, key["key"])
    assert limited["error"]["code"] == "RATE_LIMITED" and 0 < limited["error"]["details"]["tryAgainIn"] <= 60_000
    assert _verify(server, old)["error"]["code"] == "RATE_LIMITED"
    assert _get(server, key)["requestCount"] == 2


def test_requested_permissions_are_checked_before_any_use_is_counted(server: Service) -> None:
    key = _key(server, remaining=1, permissions={"files": ["read"]})
    assert _verify(server, key["key"], permissions={"files": ["write"]})["error"]["code"] == "KEY_NOT_FOUND"
    # An empty action list is refused (better-auth's authorize), and refusals count no use either.
    assert _verify(server, key["key"], permissions={"other": []})["error"]["code"] == "KEY_NOT_FOUND"
    assert _verify(server, key["key"], permissions={"files": ["read"]})["valid"] is True
    assert _verify(server, key["key"], permissions={"files": ["read"]})["error"]["code"] == "USAGE_EXCEEDED"


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_a_bad_flush_interval_is_a_startup_error(db_factory: DatabaseFactory, nats_url: str, value: str) -> None:
    svc = Service(database_url=db_factory.create("usage_cfg"), nats_url=nats_url, topology=unique_topology("cfg"),
                  extra_env={"KEYLEDGER_LAST_REQUEST_FLUSH_S": value})
    with pytest.raises(RuntimeError, match="exited with 2") as failed:
        svc.start(timeout=60)
    assert "KEYLEDGER_LAST_REQUEST_FLUSH_S" in str(failed.value)
