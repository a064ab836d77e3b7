"""The invalidation projection: which events invalidate, and that none is missed, duplicated wrongly or leaks a key.

Real NATS throughout. The projection runs in-process (an asyncio task) against the same NATS as the service;
once ``keyledger serve`` runs it too, both share the one durable consumer, which is what several service
instances do in production.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import nats
import pytest

from harness import Service, create_key_in_the_past, free_port, stream_messages, unique_topology, wait_for
from keyledger.background.bus import Bus, ensure_streams
from keyledger.config import Topology
from keyledger.core.events import (
    ApiKeyCreated,
    ApiKeyDisabled,
    ApiKeyEnabled,
    ApiKeyRevoked,
    ApiKeyUpdated,
    EVENT_TYPES,
    RecordedEvent,
    encode_envelope,
    encode_reduced_envelope,
    kind,
)
from keyledger.projections.invalidations import NEVER_INVALIDATE, InvalidationProjection, invalidation_for
from keyledger.core.records import hash_key, new_key, new_key_id

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)


def recorded(event: Any, *, key_id: str = "k" * 32, version: int = 1, position: int = 1) -> RecordedEvent:
    return RecordedEvent(id=str(uuid.uuid4()), stream_id=key_id, version=version, position=position,
                         recorded_at=T0, metadata={"userId": "u1"}, event=event)




# --------------------------------------------------------------------------------------------------------
# invalidation_for: pure
# --------------------------------------------------------------------------------------------------------
def test_which_events_invalidate_and_with_what_reason() -> None:
    h = hash_key("x" * 64)
    cases = [
        (ApiKeyRevoked(key_hash=h), "revoked"),
        (ApiKeyDisabled(key_hash=h), "disabled"),
        (ApiKeyEnabled(key_hash=h), "updated"),  # a cached "disabled" answer becomes wrong
        (ApiKeyUpdated(key_hash=h, expires_at=T0), "updated"),
        (ApiKeyUpdated(key_hash=h, expires_at=None), "updated"),  # expiry removed is a change too
        (ApiKeyUpdated(key_hash=h, metadata={"plan": "pro"}), "updated"),
        (ApiKeyUpdated(key_hash=h, name="renamed", metadata=None), "updated"),
        (ApiKeyUpdated(key_hash=h, name="renamed"), None),  # a rename changes no verification
        (ApiKeyCreated(key_hash=h, reference_id="u1"), None),  # nothing can be cached for an unknown key
    ]
    for event, reason in cases:
        inv = invalidation_for(recorded(event, position=42))
        if reason is None:
            assert inv is None, event
            continue
        assert inv == {"keyId": "k" * 32, "keyHash": h, "reason": reason, "position": 42,
                       "occurredAt": "2025-01-02T03:04:05.678901Z"}, event


def test_the_types_skipped_by_their_head_are_exactly_those_that_never_invalidate() -> None:
    """``follow`` skips events by their head's type without decoding them (NEVER_INVALIDATE): every known type
    but the update (which depends on its fields) is either skipped and never invalidates, or decoded and always
    does. A type added to the log without a thought here fails (no sample, or on the wrong side)."""
    h = hash_key("x" * 64)
    fills = {"key_hash": h, "reference_id": "u1", "previous_key_hash": hash_key("y" * 64)}
    for name, cls in EVENT_TYPES.items():
        if name == "ApiKeyUpdated":
            assert name not in NEVER_INVALIDATE
            continue
        event = cls(**{f.name: fills[f.name] for f in msgspec.structs.fields(cls) if f.required})
        assert (invalidation_for(recorded(event, position=7)) is None) == (name in NEVER_INVALIDATE), name


def test_a_reduced_envelope_is_known_by_its_own_field_without_the_relays_header(caplog: Any) -> None:
    """An event too large for NATS travels reduced (relay.py), its data only the key hashes; the projection knows it
    by the envelope's own ``reduced`` field, as the subscriber's filter does, so a message without the relay's
    ``Keyledger-Reduced`` header still invalidates conservatively ("updated"), never decoded as whole, logging
    nothing. (Taken for whole, a reduced revocation would decode, its data being its key hash alone.)"""
    rec = recorded(ApiKeyRevoked(key_hash=hash_key("r" * 64)), position=9)
    projection = InvalidationProjection(bus=None)  # type: ignore[arg-type]  (_invalidation does no I/O)
    with caplog.at_level(logging.ERROR, logger="keyledger"):
        inv, event_id = projection._invalidation(SimpleNamespace(data=encode_reduced_envelope(rec), headers=None,
                                                                 subject="x"), None)
        whole, _ = projection._invalidation(SimpleNamespace(data=encode_envelope(rec), headers=None, subject="x"),
                                            None)
    assert (inv["reason"], inv["position"], inv["keyHash"], event_id) == ("updated", 9, hash_key("r" * 64), rec.id)
    assert whole["reason"] == "revoked"
    assert not caplog.records


def test_invalidation_is_a_pure_function_of_the_event_and_matches_the_envelope_time() -> None:
    """What the invalidation says is derived from the event alone, field by field from its envelope: the same
    event recorded again (another event id, actor, request) gives the same message, and nothing of the actor
    leaks into it; a different position or key gives a different one."""
    key_hash = hash_key("y" * 64)
    event = recorded(ApiKeyRevoked(key_hash=key_hash), key_id="r" * 32, position=7)
    envelope = json.loads(encode_envelope(event))
    expected = {"keyId": envelope["keyId"], "keyHash": envelope["data"]["keyHash"], "reason": "revoked",
                "position": envelope["position"], "occurredAt": envelope["occurredAt"]}
    assert invalidation_for(event) == expected
    assert expected == {"keyId": "r" * 32, "keyHash": key_hash, "reason": "revoked", "position": 7,
                        "occurredAt": "2025-01-02T03:04:05.678901Z"}

    # The same event under another id, actor and time of publication: the same invalidation.
    again = RecordedEvent(id=str(uuid.uuid4()), stream_id=event.stream_id, version=event.version,
                          position=event.position, recorded_at=event.recorded_at,
                          metadata={"userId": "someone else", "ipAddress": "10.0.0.9", "requestId": "r-2"},
                          event=ApiKeyRevoked(key_hash=key_hash))
    assert invalidation_for(again) == expected
    assert "someone else" not in json.dumps(invalidation_for(again))
    # Another position or another key: another invalidation.
    assert invalidation_for(recorded(ApiKeyRevoked(key_hash=key_hash), key_id="r" * 32, position=8)) != expected
    assert invalidation_for(recorded(ApiKeyRevoked(key_hash=key_hash), key_id="s" * 32, position=7)) != expected
    # The time is the event's own, in the envelope's format, whatever the instant's microseconds.
    for micro in (0, 1, 999_999):
        at = T0.replace(microsecond=micro)
        timed = RecordedEvent(id=event.id, stream_id=event.stream_id, version=1, position=7, recorded_at=at,
                              metadata={}, event=ApiKeyRevoked(key_hash=key_hash))
        assert invalidation_for(timed)["occurredAt"] == json.loads(encode_envelope(timed))["occurredAt"]


# --------------------------------------------------------------------------------------------------------
# The projection against a private events stream on real NATS
# --------------------------------------------------------------------------------------------------------
async def _publish_events(js: Any, topology: Topology, events: list[RecordedEvent], *, msg_ids: list[str] | None = None) -> None:
    for i, e in enumerate(events):
        await js.publish(topology.event_subject(kind(e.type), e.stream_id), encode_envelope(e),
                         headers={"Nats-Msg-Id": msg_ids[i] if msg_ids else e.id}, stream=topology.events_stream)


async def _invalidations(nats_url: str, topology: Topology) -> list[Any]:
    return await stream_messages(nats_url, topology.invalidations_stream)


async def _cleanup(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    for name in (topology.events_stream, topology.invalidations_stream):
        try:
            await js.delete_stream(name)
        except Exception:
            pass
    await nc.close()


def test_projection_restart_duplicates_and_disorder_never_miss_or_corrupt(nats_url: str) -> None:
    async def scenario() -> None:
        topology = unique_topology("invproj")
        nc = await nats.connect(nats_url)
        js = nc.jetstream(timeout=5)
        await ensure_streams(js, topology)
        bus = Bus(nats_url, topology)
        bus.start()
        try:
            keys = {new_key_id(): new_key(None) for _ in range(3)}
            (a, ka), (b, kb), (c, kc) = keys.items()
            ha, hb, hc = hash_key(ka), hash_key(kb), hash_key(kc)
            # Out of order on purpose: b's revocation before its creation; a's events interleaved with c's.
            first = [
                recorded(ApiKeyRevoked(key_hash=hb), key_id=b, version=2, position=5),
                recorded(ApiKeyCreated(key_hash=ha, reference_id="u"), key_id=a, version=1, position=1),
                recorded(ApiKeyCreated(key_hash=hb, reference_id="u"), key_id=b, version=1, position=2),
                recorded(ApiKeyDisabled(key_hash=ha), key_id=a, version=2, position=3),
                recorded(ApiKeyUpdated(key_hash=ha, name="only a rename"), key_id=a, version=3, position=4),
                recorded(ApiKeyCreated(key_hash=hc, reference_id="u"), key_id=c, version=1, position=6),
            ]
            await _publish_events(js, topology, first)
            # The same event delivered again under another Nats-Msg-Id (a relay retry after the window).
            await _publish_events(js, topology, [first[3]], msg_ids=["retry-" + first[3].id])

            projection = InvalidationProjection(bus)
            task = asyncio.create_task(projection.run())
            await wait_for(lambda: projection.published + projection.ignored >= 7, 30, "first batch handled")
            # A crash between the invalidation's PubAck and the event's ack: the next instance publishes the
            # same invalidation again. Simulate exactly that: cancel, then replay the event under a new id.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

            second = [
                recorded(ApiKeyUpdated(key_hash=hc, metadata={"tier": 2}), key_id=c, version=2, position=8),
                recorded(ApiKeyEnabled(key_hash=ha), key_id=a, version=4, position=7),
                recorded(ApiKeyRevoked(key_hash=hc), key_id=c, version=3, position=9),
            ]
            await _publish_events(js, topology, second)  # published while no projection runs
            await _publish_events(js, topology, [first[0]], msg_ids=["again-" + first[0].id])

            restarted = InvalidationProjection(bus)
            task = asyncio.create_task(restarted.run())
            await wait_for(lambda: restarted.published + restarted.ignored >= 4, 30, "second batch handled")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

            msgs = await _invalidations(nats_url, topology)
            got = [json.loads(m.data) for m in msgs]
            expected_events = [first[0], first[3], second[0], second[1], second[2]]
            # Exactly one stored invalidation per invalidating event: the repeats were dropped by Nats-Msg-Id.
            assert sorted(g["position"] for g in got) == [3, 5, 7, 8, 9], got
            for e in expected_events:
                [g] = [g for g in got if g["position"] == e.position]
                assert g == invalidation_for(e)
                [m] = [m for m in msgs if json.loads(m.data)["position"] == e.position]
                assert m.headers["Nats-Msg-Id"] == f"{e.id}:inv"
                assert m.subject == topology.invalidation_subject
            assert {g["reason"] for g in got} == {"revoked", "disabled", "updated"}
            # The projection's consumer is fully acked: a third instance has nothing left to do.
            info = await js.consumer_info(topology.events_stream, topology.consumer("invalidations"))
            assert info.num_pending == 0 and info.num_ack_pending == 0
            # Never a plaintext key.
            blob = b"".join(m.data for m in msgs)
            for plaintext in keys.values():
                assert plaintext.encode() not in blob
        finally:
            await bus.close()
            await _cleanup(nc, topology)

    asyncio.run(scenario())


def test_a_lone_event_is_invalidated_within_milliseconds(nats_url: str) -> None:
    """A single revocation is handled the moment it arrives: it does not wait for a batch to fill."""

    async def scenario() -> None:
        topology = unique_topology("invlat")
        nc = await nats.connect(nats_url)
        js = nc.jetstream(timeout=5)
        await ensure_streams(js, topology)
        bus = Bus(nats_url, topology)
        bus.start()
        task = asyncio.create_task(InvalidationProjection(bus).run())
        seen: dict[int, float] = {}
        sub = await nc.subscribe(topology.invalidation_subject, cb=functools.partial(_note, seen))
        try:
            await _settle(js, topology)
            latencies = []
            for position in range(1, 21):
                e = recorded(ApiKeyRevoked(key_hash=hash_key(new_key(None))), key_id=new_key_id(), position=position)
                sent = time.monotonic()
                await _publish_events(js, topology, [e])
                # Alone in the stream: a projection that waited for a batch to fill would never send it.
                await wait_for(lambda: position in seen, 30, f"invalidation {position}")
                latencies.append(seen[position] - sent)
            latencies.sort()
            print(f"event publish -> invalidation received: median {latencies[10]*1000:.2f} ms, "
                  f"max {latencies[-1]*1000:.2f} ms")
            # Typically ~1 ms (docs/benchmarks.md: p99 <= 5 ms on a quiet machine). The bound is 100 times that, so a busy
            # machine passes; it still fails a projection that waits on a timer for more messages (nats-py's
            # fetch waits up to 5 s by default).
            assert latencies[10] < 0.5, latencies
        finally:
            await sub.unsubscribe()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await bus.close()
            await _cleanup(nc, topology)

    asyncio.run(scenario())


async def _note(seen: dict[int, float], msg: Any) -> None:
    seen[json.loads(msg.data)["position"]] = time.monotonic()


async def _settle(js: Any, topology: Topology) -> None:
    """Wait until the projection's durable consumer exists (it then receives new events at once)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.consumer_info(topology.events_stream, topology.consumer("invalidations"))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------------------
# End to end: keyledger serve -> relay -> projection -> KeyCache in a downstream app
# --------------------------------------------------------------------------------------------------------
def _load_example() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("downstream_example", ROOT / "examples" / "downstream.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # Litestar resolves handler annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class Downstream:
    """The example app, served by uvicorn inside the test's event loop, with the cache reachable."""

    def __init__(self, service: Service, **cache_options: Any) -> None:
        import uvicorn

        from keyledger.client import KeyCache

        self.applied: list[Any] = []
        self.applied_at: dict[str, float] = {}
        self.cache = KeyCache(service.url, service.nats_url, topology=service.topology,
                              on_invalidation=self._applied, **cache_options)
        self.port = free_port()
        app = _load_example().create_app(self.cache)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.url = f"http://127.0.0.1:{self.port}"

    def _applied(self, inv: Any) -> None:
        self.applied.append(inv)
        self.applied_at.setdefault(inv.key_id, time.monotonic())

    async def __aenter__(self) -> "Downstream":
        self.task = asyncio.create_task(self.server.serve())
        await wait_for(lambda: self.server.started or self.task.done(), 30, "downstream started")
        assert self.server.started
        await wait_for(lambda: self.cache.caught_up, 30, "cache synced with NATS")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)  # a loaded machine can take long to shut down NATS and HTTP


def _check_no_plaintext(messages: list[bytes], *plaintexts: str) -> None:
    assert messages
    for payload in messages:
        for p in plaintexts:
            assert p.encode() not in payload
        assert set(json.loads(payload)) == {"keyId", "keyHash", "reason", "position", "occurredAt"}


@pytest.mark.parametrize("action", ["revoke", "disable"])
def test_downstream_answers_401_once_the_invalidation_arrives(service: Service, action: str) -> None:
    """The guarantee relied on: once the cache has *applied* the invalidation, no request is served from the
    stale entry. The test waits (bounded) for that condition, not for time, then expects 401 on the next
    request; it also reports how long after the dashboard's 200 the eviction happened."""

    async def scenario() -> None:
        headers = service.session()
        created = service.create_key(headers, name="downstream")
        key, key_id = created["key"], created["id"]
        observed: list[bytes] = []
        nc = await nats.connect(service.nats_url)
        await nc.subscribe(service.topology.invalidation_subject, cb=functools.partial(_append, observed))
        try:
            async with Downstream(service) as ds, httpx.AsyncClient() as http:
                bearer = {"authorization": f"Bearer {key}"}
                r = await http.get(f"{ds.url}/api/data", headers=bearer)
                assert r.status_code == 200 and r.json() == {"ok": True, "keyId": key_id}
                calls = ds.cache.http_verifications
                r = await http.get(f"{ds.url}/api/data", params={"api_key": key})
                assert r.status_code == 200 and r.json()["keyId"] == key_id
                assert ds.cache.http_verifications == calls  # served from the cache

                if action == "revoke":
                    r = await http.post(f"{service.url}/api/auth/api-key/delete", headers=headers,
                                        json={"keyId": key_id})
                else:
                    r = await http.post(f"{service.url}/api/auth/api-key/update", headers=headers,
                                        json={"keyId": key_id, "enabled": False})
                assert r.status_code == 200, r.text
                answered = time.monotonic()
                await wait_for(lambda: key_id in ds.applied_at, 15, "invalidation applied by the cache")
                await wait_for(lambda: any(key_id.encode() in m for m in observed), 15, "invalidation on NATS")
                print(f"{action}: 200 -> cache eviction {(ds.applied_at[key_id] - answered) * 1000:.2f} ms")

                r = await http.get(f"{ds.url}/api/data", headers=bearer)
                assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
                r = await http.get(f"{ds.url}/api/data", params={"api_key": key})
                assert r.status_code == 401

                [inv] = [json.loads(m) for m in observed if key_id.encode() in m]
                assert inv["reason"] == ("revoked" if action == "revoke" else "disabled")
                assert inv["keyHash"] == hash_key(key)

                if action == "disable":
                    # Re-enabling evicts the cached *negative* answer too: 200 at once, not after its TTL.
                    before = len(ds.applied)
                    r = await http.post(f"{service.url}/api/auth/api-key/update", headers=headers,
                                        json={"keyId": key_id, "enabled": True})
                    assert r.status_code == 200
                    await wait_for(lambda: len(ds.applied) > before, 15, "enable invalidation applied")
                    r = await http.get(f"{ds.url}/api/data", headers=bearer)
                    assert r.status_code == 200
            _check_no_plaintext(observed, key)
        finally:
            await nc.close()

    asyncio.run(scenario())


async def _append(box: list[bytes], msg: Any) -> None:
    box.append(msg.data)


def test_missing_or_unknown_keys_are_refused_with_rybbits_401(service: Service) -> None:
    async def scenario() -> None:
        async with Downstream(service) as ds, httpx.AsyncClient() as http:
            for kwargs in ({}, {"headers": {"authorization": "Bearer " + "z" * 64}},
                           {"params": {"api_key": "nope"}}, {"headers": {"authorization": "Basic abc"}}):
                r = await http.get(f"{ds.url}/api/data", **kwargs)
                assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, kwargs
                assert r.headers["content-type"] == "application/json"
            assert (await http.get(f"{ds.url}/health")).status_code == 200  # excluded path

    asyncio.run(scenario())


def test_example_downstream_runs_from_its_command_line(service: Service) -> None:
    """``python examples/downstream.py ...`` as documented; revoking makes it answer 401."""
    headers = service.session()
    created = service.create_key(headers)
    key, key_id = created["key"], created["id"]
    port = free_port()
    env = {**os.environ, "KEYLEDGER_SUBJECT_PREFIX": service.topology.prefix,
           "KEYLEDGER_INVALIDATIONS_STREAM": service.topology.invalidations_stream}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "downstream.py"), "--keyledger-url", service.url,
         "--nats-url", service.nats_url, "--port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )

    async def scenario() -> None:
        observed: list[bytes] = []
        nc = await nats.connect(service.nats_url)
        await nc.subscribe(service.topology.invalidation_subject, cb=functools.partial(_append, observed))
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as http:
                async def healthy() -> bool:
                    try:
                        r = await http.get(f"{url}/health")
                        return r.status_code == 200 and r.json()["cacheCaughtUp"]
                    except httpx.HTTPError:
                        return False

                deadline = time.monotonic() + 60
                while not await healthy():
                    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                    assert time.monotonic() < deadline, "example did not start"
                    await asyncio.sleep(0.05)
                r = await http.get(f"{url}/api/data", params={"api_key": key})
                assert r.status_code == 200 and r.json() == {"ok": True, "keyId": key_id}
                r = await http.post(f"{service.url}/api/auth/api-key/delete", headers=headers, json={"keyId": key_id})
                assert r.status_code == 200
                await wait_for(lambda: any(key_id.encode() in m for m in observed), 15, "invalidation on NATS")
                # The example's cache got the same message at the same moment on its own connection; allow it
                # a bounded moment to process it (another process: nothing in-process to wait on).
                deadline = time.monotonic() + 15
                while (r := await http.get(f"{url}/api/data", params={"api_key": key})).status_code != 401:
                    assert r.status_code == 200 and time.monotonic() < deadline, r.text
                    await asyncio.sleep(0.01)
                assert r.json() == {"error": "Unauthorized"}
        finally:
            await nc.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_middleware_answers_401_for_an_expired_key(service: Service) -> None:
    """An expired key is 401 ``{"error": "Unauthorized"}`` like any invalid one, and a key cached while valid is
    never served past its ``expiresAt``: every 200 was answered before the deadline, and 401 comes after it.
    (Keys are made with deadlines in the past or seconds ahead through the real write path: expiresIn's minimum
    is a day.)"""
    owner = service.session()["x-test-user-id"]
    _, expired = asyncio.run(create_key_in_the_past(service.database_url, owner, days_ago=2, expires_in=86_400))
    lead_s = 8.0
    _, expiring = asyncio.run(create_key_in_the_past(service.database_url, owner,
                                                     days_ago=1 - lead_s / 86_400, expires_in=86_400))
    expires_at = service.verify(expiring)["key"]["expiresAt"]
    deadline = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()

    async def scenario() -> None:
        async with Downstream(service) as ds, httpx.AsyncClient() as http:
            r = await http.get(f"{ds.url}/api/data", headers={"authorization": f"Bearer {expired}"})
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}

            bearer = {"authorization": f"Bearer {expiring}"}
            served_before: list[float] = []
            while True:
                started = time.time()
                r = await http.get(f"{ds.url}/api/data", headers=bearer)
                finished = time.time()
                if r.status_code == 200:
                    served_before.append(started)
                    # (expiresAt is printed to the millisecond, cut: the real deadline is within 1 ms after it)
                    assert started < deadline + 0.001, f"served {started - deadline:.3f}s after expiresAt"
                else:
                    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, r.text
                    # Only a request that began at or after the deadline may be refused for it... or one that
                    # the server checked after it.
                    assert finished >= deadline, "refused before expiresAt"
                    break
                assert time.time() < deadline + 30, "still 200 long after expiresAt"
                await asyncio.sleep(0.02)
            assert served_before, "the key was never seen valid (the machine took over 8 s for one request?)"
            assert ds.cache.hits > 0  # it was served from the cache, not only asked over HTTP each time
            for _ in range(3):
                assert (await http.get(f"{ds.url}/api/data", headers=bearer)).status_code == 401

    asyncio.run(scenario())
