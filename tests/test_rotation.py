"""Issue 5, rotation: ``POST /api/auth/api-key/rotate`` with grace periods, at the source and in client caches.

Real PostgreSQL, NATS and a real ``keyledger serve``; the grace periods that must end during a test are a few
seconds, so the tests can see a superseded secret work and then stop, and the sweeper (started by the service)
record its retirement; every wait for that is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import (Service, count_events, create_key_in_the_past, delete_streams, read_stream_messages,
                     unique_topology, wait_for, wait_until)
from keyledger.core import records
from keyledger.storage import store
from keyledger.background import sweeper
from keyledger.client import KeyCache
from keyledger.core.domain import GracePeriodOutOfRange, RotateKey
from servers import DatabaseFactory


TOKEN = "rotation-service-token-for-tests-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(db_factory: DatabaseFactory, nats_url: str) -> Iterator[Service]:
    topology = unique_topology("rotation")
    svc = Service(database_url=db_factory.create("rotation"), nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_SERVICE_TOKEN": TOKEN}).start()
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


def _rotate(server: Service, headers: dict[str, str], key_id: Any, **body: Any) -> Any:
    return server.post("api-key/rotate", headers, json={"keyId": key_id, **body})


def _invalidations(server: Service, key_id: str) -> list[dict[str, Any]]:
    messages = read_stream_messages(server.nats_url, server.topology.invalidations_stream)
    return [m for m in (json.loads(msg.data) for msg in messages) if m["keyId"] == key_id]


def test_rotate_issues_a_new_secret_and_without_grace_the_old_one_stops_at_once(server: Service) -> None:
    user = server.session()
    created = server.create_key(user, name="ci", prefix="kl_")
    old = created["key"]
    assert server.verify(old)["valid"] is True

    response = _rotate(server, user, created["id"])
    assert response.status_code == 200, response.text
    rotated = response.json()
    new = rotated["key"]
    # Answers like create: the record, the same id, a new secret with the key's prefix; nothing else moved.
    assert rotated["id"] == created["id"] and new != old and new.startswith("kl_") and len(new) == 3 + 64
    assert rotated["start"] == new[:6] and rotated["name"] == "ci" and rotated["expiresAt"] == created["expiresAt"]

    assert server.verify(new)["valid"] is True  # as soon as rotate answered
    assert server.verify(old)["error"]["code"] == "INVALID_API_KEY"
    got = server.get("api-key/get", user, params={"id": created["id"]}).json()
    assert got["start"] == new[:6] and "key" not in got

    with psycopg.connect(server.database_url, autocommit=True) as conn:
        kind, data = conn.execute("SELECT type, data FROM events WHERE stream_id = %s AND version = 2",
                                  (created["id"],)).fetchone()
    assert kind == "ApiKeyRotated" and data["graceUntil"] is None
    assert data["keyHash"] == records.hash_key(new) and data["previousKeyHash"] == records.hash_key(old)
    assert old not in json.dumps(data) and new not in json.dumps(data)  # hashes only, never a secret

    def published() -> bool:
        events = read_stream_messages(server.nats_url, server.topology.events_stream)
        return (any(m.subject.endswith(f".rotated.{created['id']}") for m in events)
                and any(i["reason"] == "rotated" and i["keyHash"] == records.hash_key(old)
                        for i in _invalidations(server, created["id"])))

    wait_until(published, timeout=30, what="ApiKeyRotated on NATS and the old secret's invalidation")


def test_the_old_secret_works_during_its_grace_period_then_stops_and_is_retired_once(server: Service) -> None:
    user = server.session()
    created = server.create_key(user)
    old = created["key"]
    rotated = _rotate(server, user, created["id"], gracePeriodSeconds=3).json()
    new = rotated["key"]

    answer = server.verify(old)
    assert answer["valid"] is True and answer["key"]["id"] == created["id"]
    assert answer["key"]["graceUntil"] is not None  # the deadline a cache caps its entry with
    assert server.verify(new)["valid"] is True and "graceUntil" not in server.verify(new)["key"]

    grace_until = dt.datetime.fromisoformat(answer["key"]["graceUntil"].replace("Z", "+00:00")).timestamp()
    while True:  # valid up to its deadline (graceUntil, to the millisecond)...
        checked = time.time()
        if not server.verify(old)["valid"]:
            break
        assert checked < grace_until, "the old secret outlived its grace period"
        assert time.time() < grace_until + 30
        time.sleep(0.02)
    assert time.time() >= grace_until  # ...and refused only once it has passed
    assert server.verify(old)["error"]["code"] == "INVALID_API_KEY"
    assert server.verify(new)["valid"] is True
    wait_until(lambda: count_events(server.database_url, created["id"], "ApiKeySecretRetired") == 1, timeout=30,
               what="the sweeper to record the retirement")
    wait_until(lambda: sum(i["reason"] == "rotated" for i in _invalidations(server, created["id"])) >= 2,
               timeout=30, what="the retirement's invalidation")
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM superseded_key_secrets WHERE key_id = %s",
                            (created["id"],)).fetchone() == (0,)
    assert count_events(server.database_url, created["id"], "ApiKeySecretRetired") == 1


def test_each_superseded_secret_keeps_its_own_deadline_and_revoking_stops_them_all(server: Service) -> None:
    user = server.session()
    created = server.create_key(user)
    first = created["key"]
    second = _rotate(server, user, created["id"], gracePeriodSeconds=600).json()["key"]
    third = _rotate(server, user, created["id"], gracePeriodSeconds=0).json()["key"]
    # first: superseded with 10 minutes of grace; second: superseded at once; third: current.
    assert server.verify(first)["valid"] is True
    assert server.verify(second)["error"]["code"] == "INVALID_API_KEY"
    assert server.verify(third)["valid"] is True

    assert server.delete(user, created["id"]).status_code == 200
    for secret in (first, second, third):
        assert server.verify(secret)["error"]["code"] == "INVALID_API_KEY"
    assert _rotate(server, user, created["id"]).status_code == 404  # a revoked key is gone


def test_rotating_keeps_the_expiry_the_owner_and_the_limits(server: Service) -> None:
    user = server.session()
    limits = {"remaining": 10, "refillAmount": 10, "refillInterval": 3_600_000, "rateLimitEnabled": True,
              "rateLimitMax": 100, "rateLimitTimeWindow": 60_000, "permissions": {"sites": ["read"]}}
    response = server.post("api-key/create", BEARER, json={"userId": user["x-test-user-id"], "name": "limited",
                                                           "prefix": "lim_", "expiresIn": 3 * 86_400, **limits})
    assert response.status_code == 200, response.text
    created = response.json()
    assert server.verify(created["key"])["key"]["remaining"] == 9

    rotated = _rotate(server, user, created["id"], gracePeriodSeconds=60).json()
    kept = ("id", "referenceId", "configId", "prefix", "name", "expiresAt", "enabled", "refillAmount",
            "refillInterval", "rateLimitEnabled", "rateLimitMax", "rateLimitTimeWindow", "permissions")
    assert {f: rotated[f] for f in kept} == {f: created[f] for f in kept}
    assert rotated["referenceId"] == user["x-test-user-id"] and rotated["key"].startswith("lim_")
    got = server.get("api-key/get", user, params={"id": created["id"]}).json()
    assert {f: got[f] for f in kept} == {f: created[f] for f in kept}

    # The same count and the same window, whichever secret is used: the new one, or the old one in its grace.
    new = server.verify(rotated["key"])["key"]
    old = server.verify(created["key"])["key"]
    assert (new["remaining"], new["requestCount"]) == (8, 2) and (old["remaining"], old["requestCount"]) == (7, 3)
    # The superseded secret's grace never outlives the key: verify still enforces the key's own expiry.
    assert old["expiresAt"] == created["expiresAt"] and old["graceUntil"] < created["expiresAt"]
    assert server.verify(rotated["key"])["key"]["permissions"] == {"sites": ["read"]}


def test_two_superseded_secrets_each_work_until_their_own_deadline(server: Service) -> None:
    user = server.session()
    created = server.create_key(user)
    first = created["key"]
    second = _rotate(server, user, created["id"], gracePeriodSeconds=3600).json()["key"]
    third = _rotate(server, user, created["id"], gracePeriodSeconds=3).json()["key"]
    # Both superseded secrets work, each with its own deadline; the current one has none.
    a, b, c = server.verify(first), server.verify(second), server.verify(third)
    assert a["valid"] and b["valid"] and c["valid"] and "graceUntil" not in c["key"]
    assert a["key"]["id"] == b["key"]["id"] == c["key"]["id"] == created["id"]
    assert a["key"]["start"] == b["key"]["start"] == c["key"]["start"] == third[:6]
    first_until, second_until = (dt.datetime.fromisoformat(x["key"]["graceUntil"].replace("Z", "+00:00"))
                                 for x in (a, b))
    assert first_until - second_until > dt.timedelta(minutes=59)

    # The second's (short) grace ends; the first keeps working until its own.
    wait_until(lambda: not server.verify(second)["valid"], timeout=30, what="the second secret's grace to end")
    assert dt.datetime.now(dt.timezone.utc) >= second_until
    assert server.verify(second)["error"]["code"] == "INVALID_API_KEY"
    assert server.verify(first)["valid"] is True and server.verify(third)["valid"] is True
    wait_until(lambda: count_events(server.database_url, created["id"], "ApiKeySecretRetired") == 1, timeout=30,
               what="the sweeper to retire the second secret")
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        retired = conn.execute("SELECT data FROM events WHERE stream_id = %s AND type = 'ApiKeySecretRetired'",
                               (created["id"],)).fetchone()[0]
        left = conn.execute("SELECT key_hash FROM superseded_key_secrets WHERE key_id = %s",
                            (created["id"],)).fetchall()
    assert retired["keyHash"] == records.hash_key(second) and left == [(records.hash_key(first),)]
    assert server.verify(first)["valid"] is True


def test_rotate_refuses_bad_input_and_keys_it_may_not_touch_writing_nothing(server: Service) -> None:
    owner, stranger = server.session(), server.session()
    created = server.create_key(owner)
    key_id = created["id"]
    for bad in ("60", -1, 604_801, 1.5, True, [], {}):
        response = _rotate(server, owner, key_id, gracePeriodSeconds=bad)
        assert response.status_code == 400 and response.json()["code"] == "VALIDATION_ERROR", (bad, response.text)
        if bad in (-1, 604_801, 1.5):  # a number out of range: one wording, the domain's own
            assert response.json()["message"] == GracePeriodOutOfRange.message
    assert _rotate(server, owner, key_id, gracePeriodSeconds=604_800).status_code == 200  # 7 days is allowed
    versions = count_events(server.database_url, key_id)

    assert _rotate(server, stranger, key_id).json()["code"] == "KEY_NOT_FOUND"
    assert _rotate(server, {}, key_id).status_code == 401
    for bad_id in (None, 42, "", "a.b.>", "x\u0000y"):
        response = _rotate(server, owner, bad_id)
        assert 400 <= response.status_code < 500 and "code" in response.json(), bad_id
    assert server.post("api-key/update", owner, json={"keyId": key_id, "enabled": False}).status_code == 200
    disabled = _rotate(server, owner, key_id)
    assert disabled.status_code == 400 and disabled.json()["code"] == "KEY_DISABLED"
    assert count_events(server.database_url, key_id) == versions + 1  # only the disable


def test_an_expired_key_cannot_be_rotated(server: Service) -> None:
    owner = server.session()
    key_id, _ = asyncio.run(create_key_in_the_past(server.database_url, owner["x-test-user-id"], days_ago=2,
                                            expires_in=86_400))
    response = _rotate(server, owner, key_id)
    assert response.status_code == 400 and response.json()["code"] == "KEY_EXPIRED"


def test_two_sweepers_at_once_retire_each_superseded_secret_once(db_factory: DatabaseFactory) -> None:
    url = db_factory.create("retire")  # no service: only our two sweepers write

    async def scenario() -> list[int]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for _ in range(20):  # each key rotated an hour ago with a 60 s grace: due for retirement
                key_id, _ = await create_key_in_the_past(url, "owner", days_ago=1)
                new = records.new_key(None)
                an_hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
                await store.execute(conn, RotateKey(actor_id="owner", now=an_hour_ago, key_id=key_id,
                                                    key_hash=records.hash_key(new), start=new[:6], grace_seconds=60),
                                    key_id, {"userId": "owner"})
        connections = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(2)]
        try:
            counts = await asyncio.gather(*(sweeper.sweep_once(c) for c in connections))
            assert await sweeper.sweep_once(connections[0]) == 0
        finally:
            for c in connections:
                await c.close()
        return counts

    assert sum(asyncio.run(scenario())) == 20
    with psycopg.connect(url, autocommit=True) as conn:
        per_key = conn.execute("SELECT stream_id, count(*) FROM events WHERE type = 'ApiKeySecretRetired' "
                               "GROUP BY stream_id").fetchall()
        assert len(per_key) == 20 and {n for _, n in per_key} == {1}
        assert conn.execute("SELECT count(*) FROM superseded_key_secrets").fetchone() == (0,)


def test_a_client_cache_drops_the_old_secret_when_its_grace_ends(server: Service) -> None:
    user = server.session()

    async def scenario() -> None:
        async with KeyCache(server.url, server.nats_url, topology=server.topology, staleness=30,
                            max_age=300) as cache:
            await wait_for(lambda: cache.trusted, 30, "the cache to prove it is caught up")
            # Without grace: the cached old secret is evicted by the rotation's invalidation.
            created = server.create_key(user)
            assert (await cache.verify(created["key"])).valid
            calls = cache.http_verifications
            assert (await cache.verify(created["key"])).valid and cache.http_verifications == calls  # cached
            await asyncio.to_thread(_rotate, server, user, created["id"])
            await wait_for(lambda: cache.verify_cached(created["key"]) is None, 30, "the rotation's eviction")
            assert (await cache.verify(created["key"])).code == "INVALID_API_KEY"

            # With a grace period: cached and valid during it, invalid once it ended (the entry's life is capped
            # at graceUntil, and the sweeper's retirement evicts it everywhere).
            created = server.create_key(user)
            assert (await cache.verify(created["key"])).valid and cache.verify_cached(created["key"]) is not None
            rotated = (await asyncio.to_thread(_rotate, server, user, created["id"], gracePeriodSeconds=4)).json()
            # The rotation's invalidation evicts the cached old secret (the cache must learn its graceUntil).
            await wait_for(lambda: cache.verify_cached(created["key"]) is None, 30, "the rotation's eviction")
            old = await cache.verify(created["key"])
            assert old.valid and old.key["graceUntil"] is not None
            assert (await cache.verify(rotated["key"])).valid
            # (graceUntil is to the millisecond, cut: the real deadline is within 1 ms after it)
            grace_until = dt.datetime.fromisoformat(old.key["graceUntil"].replace("Z", "+00:00")).timestamp()
            while True:  # the cached entry is served until its deadline, never after
                before = time.time()
                if cache.verify_cached(created["key"]) is None:
                    break
                assert before < grace_until + 0.001, f"served {before - grace_until:.3f}s after graceUntil"
                assert time.time() < grace_until + 30
                await asyncio.sleep(0.005)
            await wait_for(lambda: time.time() > grace_until + 0.001, 30, "the grace deadline to pass")
            assert (await cache.verify(created["key"])).code == "INVALID_API_KEY"
            assert (await cache.verify(rotated["key"])).valid

    asyncio.run(scenario())
