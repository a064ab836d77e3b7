"""``keyledger.client.KeyCache``: bounded staleness, catching up after a cut, fail-closed, and the hot path.

Real servers only: a private nats-server (so it can be stopped), a private ``keyledger serve`` on it, and a
small TCP relay of our own between the cache and NATS (or keyledger), so one link can be cut while
everything else keeps running: the only way to produce "an invalidation was published while this cache
could not hear it".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from harness import Service, create_key_in_the_past, free_port, unique_topology, wait_for
from keyledger.background.bus import Bus, ensure_streams
from keyledger.client import KeyCache
from keyledger.embedded import EmbeddedNats
from keyledger.projections.invalidations import InvalidationProjection
from keyledger.core.records import hash_key

STALENESS = 1.0  # the default; the bounds below are exact, so no scheduling slack is added to it
WAIT = 30.0  # deadline of every wait for a condition: generous, it only matters when something is broken


async def last_served(cache: KeyCache, key: str, timeout: float = WAIT) -> float | None:
    """Poll ``verify_cached(key)`` at every turn of the event loop until it returns None; return the monotonic
    time read just *before* the last call that served the entry (None if it never did). The cache decides with
    ``time.monotonic()`` too, so "served at t" means its own clock read at least t: comparing that with a
    deadline needs no allowance for scheduling."""
    last = None
    deadline = time.monotonic() + timeout
    while True:
        before = time.monotonic()
        if cache.verify_cached(key) is None:
            return last
        last = before
        assert time.monotonic() < deadline, "the entry never stopped being served"
        await asyncio.sleep(0.001)




class TcpRelay:
    """Forwards a local port to ``target_port``; ``cut()`` drops every connection and refuses new ones.

    ``hold()`` keeps every answer (upstream to client) back until ``release()``; ``held`` counts the bytes
    waiting, so a test can see that the upstream has answered while the client has not received it yet."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._released = asyncio.Event()
        self._released.set()
        self.held = 0

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def start(self) -> "TcpRelay":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await src.read(65536):
                    if answers and not self._released.is_set():
                        self.held += len(data)
                        await self._released.wait()
                        self.held -= len(data)
                    dst.write(data)
                    await dst.drain()
            except Exception:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


class Private:
    def __init__(self, nats_server: EmbeddedNats, service: Service) -> None:
        self.nats = nats_server
        self.service = service
        self.headers = service.session()

    def key(self) -> tuple[str, str]:
        created = self.service.create_key(self.headers)
        return created["key"], created["id"]


@pytest.fixture(scope="module")
def private(db_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    server = EmbeddedNats.start(Path(tmp_path_factory.mktemp("nats")) / "store")
    svc = Service(database_url=db_factory.create("cache"), nats_url=server.url,
                  topology=unique_topology("cache")).start()
    try:
        yield Private(server, svc)
    finally:
        svc.stop()
        server.stop()


async def _projection(p: Private) -> tuple[Bus, asyncio.Task[None]]:
    bus = Bus(p.nats.url, p.service.topology)
    bus.start()
    return bus, asyncio.create_task(InvalidationProjection(bus).run())


async def _stop(bus: Bus, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.close()


async def _collect(box: list[dict[str, Any]], msg: Any) -> None:
    box.append(json.loads(msg.data))


async def _revoke(p: Private, key_id: str) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{p.service.url}/api/auth/api-key/delete", headers=p.headers, json={"keyId": key_id})
        assert r.status_code == 200, r.text


def test_cut_link_bounded_staleness_then_replay_of_missed_invalidations(private: Private) -> None:
    p = private
    (k_revoked, id_revoked), (k_kept, _), (k_other, id_other) = p.key(), p.key(), p.key()

    async def scenario() -> None:
        bus, task = await _projection(p)
        relay = await TcpRelay(p.nats.port).start()
        seen: list[dict[str, Any]] = []
        watcher = await nats.connect(p.nats.url)
        await watcher.subscribe(p.service.topology.invalidation_subject, cb=functools.partial(_collect, seen))
        cache = KeyCache(p.service.url, f"nats://127.0.0.1:{relay.port}", topology=p.service.topology,
                         staleness=STALENESS)
        try:
            await cache.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            for k in (k_revoked, k_kept, k_other):
                assert (await cache.verify(k)).valid
            assert all(cache.verify_cached(k) for k in (k_revoked, k_kept, k_other))

            await relay.cut()
            cut_at = time.monotonic()  # no echo of a probe can arrive after this: every proof predates it
            watching = [asyncio.create_task(last_served(cache, k)) for k in (k_revoked, k_kept)]
            await wait_for(lambda: not cache.connected, WAIT, "cache noticed the cut")
            # Two revocations while the cache cannot hear: both invalidations reach the stream.
            await _revoke(p, id_revoked)
            await _revoke(p, id_other)
            await wait_for(lambda: {id_revoked, id_other} <= {s["keyId"] for s in seen}, WAIT,
                           "invalidations published")

            # Bounded staleness: the entries verified before the cut (the revoked key's included) are served at
            # most `staleness` after the last proof, which predates the cut, however long anything else took.
            for served in await asyncio.gather(*watching):
                assert served is not None and served - cut_at < STALENESS, served - cut_at if served else None
            assert not cache.trusted
            # ...and the revoked key is re-verified over HTTP, where it is revoked.
            result = await cache.verify(k_revoked)
            assert not result.valid and result.code == "INVALID_API_KEY"
            # An unrevoked key is re-verified too, and its fresh answer is served for `staleness` after that.
            # (The entry counts from when its request was sent: after `asked`, before `answered`.)
            calls = cache.http_verifications
            asked = time.monotonic()
            assert (await cache.verify(k_kept)).valid and cache.http_verifications == calls + 1
            answered = time.monotonic()
            fresh = cache.verify_cached(k_kept)
            assert fresh is not None or time.monotonic() - asked > STALENESS
            served = await last_served(cache, k_kept)
            assert served is None or served - answered <= STALENESS

            # Reconnect: the cache replays what it missed before it trusts itself again.
            flushes = cache.flushes
            await relay.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache caught up")
            assert cache.replayed >= 2 and cache.flushes == flushes
            # k_other was never re-verified during the cut: only the replay can have evicted it.
            assert cache.verify_cached(k_other) is None
            assert not (await cache.verify(k_other)).valid
            # k_kept survived (replay, not flush): once trusted again, it is served from the cache again.
            assert cache.verify_cached(k_kept) is not None and cache.verify_cached(k_kept).valid
        finally:
            await cache.close()
            await watcher.close()
            await relay.cut()
            await _stop(bus, task)

    asyncio.run(scenario())


def test_cannot_prove_what_was_missed_so_flushes(private: Private) -> None:
    """The stream lost messages the cache never saw (here: purged): flush everything, trust nothing old."""
    p = private
    (k_revoked, id_revoked), (k_kept, _) = p.key(), p.key()

    async def scenario() -> None:
        bus, task = await _projection(p)
        relay = await TcpRelay(p.nats.port).start()
        seen: list[dict[str, Any]] = []
        watcher = await nats.connect(p.nats.url)
        await watcher.subscribe(p.service.topology.invalidation_subject, cb=functools.partial(_collect, seen))
        cache = KeyCache(p.service.url, f"nats://127.0.0.1:{relay.port}", topology=p.service.topology,
                         staleness=STALENESS)
        try:
            await cache.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            assert (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid
            await relay.cut()
            await wait_for(lambda: not cache.connected, WAIT, "cache noticed the cut")
            await _revoke(p, id_revoked)
            await wait_for(lambda: id_revoked in {s["keyId"] for s in seen}, WAIT, "invalidation published")
            await watcher.jetstream().purge_stream(p.service.topology.invalidations_stream)
            flushes = cache.flushes
            await relay.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache resynced")
            assert cache.flushes == flushes + 1
            assert cache.verify_cached(k_revoked) is None and cache.verify_cached(k_kept) is None
            assert not (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid
        finally:
            await cache.close()
            await watcher.close()
            await relay.cut()
            await _stop(bus, task)

    asyncio.run(scenario())


def test_nats_server_stopped_during_a_revocation(private: Private) -> None:
    """The whole NATS goes away (the relay cannot even publish the event); the cache stays within its bound,
    and once NATS is back the event, its invalidation and the cache all converge."""
    p = private
    (k_revoked, id_revoked), (k_kept, _) = p.key(), p.key()

    async def scenario() -> None:
        bus, task = await _projection(p)
        cache = KeyCache(p.service.url, p.nats.url, topology=p.service.topology, staleness=STALENESS)
        try:
            await cache.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            assert (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid

            p.nats.stop()
            stopped_at = time.monotonic()  # the server is gone: no echo after this, every proof predates it
            watching = asyncio.create_task(last_served(cache, k_revoked))
            await _revoke(p, id_revoked)  # keyledger keeps revoking without NATS (the event waits in its outbox)
            served = await watching
            assert served is not None and served - stopped_at < STALENESS, served - stopped_at if served else None
            assert not (await cache.verify(k_revoked)).valid
            assert (await cache.verify(k_kept)).valid  # re-verified over HTTP: keyledger itself is fine

            p.nats.restart()
            await wait_for(lambda: cache.caught_up, WAIT, "cache reconnected and caught up")
            # The revocation's invalidation arrives once the outbox relay has published the event.
            await wait_for(lambda: cache.last_invalidation is not None
                           and cache.last_invalidation.key_id == id_revoked, WAIT, "invalidation after restart")
            assert cache.last_invalidation.key_hash == hash_key(k_revoked)
            assert cache.verify_cached(k_revoked) is None
            assert not (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid
        finally:
            if not p.nats.running:
                p.nats.restart()
            await cache.close()
            await _stop(bus, task)

    asyncio.run(scenario())


def test_keyledger_unreachable_fails_closed_unless_configured_open(private: Private) -> None:
    p = private
    key, _ = p.key()
    unknown = "Q" * 64

    async def scenario() -> None:
        relay = await TcpRelay(p.service.port).start()
        closed = KeyCache(f"http://127.0.0.1:{relay.port}", None, staleness=0.2)
        opened = KeyCache(f"http://127.0.0.1:{relay.port}", None, staleness=0.2, fail_open=True)
        try:
            for cache in (closed, opened):
                await cache.start()
                assert (await cache.verify(key)).valid
            await relay.cut()
            # Without an invalidation feed an entry is trusted only `staleness` after its verification.
            await wait_for(lambda: closed.verify_cached(key) is None, WAIT, "entry untrusted")
            result = await closed.verify(key)
            assert not result.valid and result.code == "KEYLEDGER_UNAVAILABLE"
            await wait_for(lambda: opened.verify_cached(key) is None, WAIT, "entry untrusted")
            assert (await opened.verify(key)).valid  # fail_open: the stale (never evicted) positive
            assert not (await opened.verify(unknown)).valid  # but never an unknown key
            opened.invalidate(key_hash=hash_key(key))
            assert not (await opened.verify(key)).valid  # nor an evicted one
        finally:
            await closed.close()
            await opened.close()

    asyncio.run(scenario())


def test_negative_answers_are_cached_briefly(private: Private) -> None:
    p = private

    async def scenario() -> None:
        async with KeyCache(p.service.url, None, staleness=30, negative_ttl=0.3) as cache:
            bogus = "B" * 64
            asked = time.monotonic()
            assert not (await cache.verify(bogus)).valid
            answered = time.monotonic()  # the entry's life started between `asked` and this
            calls = cache.http_verifications
            again = await cache.verify(bogus)
            assert not again.valid and again.code == "INVALID_API_KEY"
            assert cache.http_verifications == calls or time.monotonic() - asked > 0.3  # served from memory
            served = await last_served(cache, bogus)
            assert served is None or served - answered < 0.3  # for negative_ttl at most
            assert not (await cache.verify(bogus)).valid and cache.http_verifications == calls + 1  # asked again

    asyncio.run(scenario())


def test_a_cached_positive_is_never_served_past_the_keys_expiry(private: Private) -> None:
    """A key whose ``expiresAt`` is a few seconds ahead (made through the real write path: expiresIn's minimum
    is a day), cached while valid with staleness and max_age far longer: the entry ends at ``expiresAt``."""
    p = private
    owner = p.service.session()["x-test-user-id"]
    lead_s = 6.0
    _, key = asyncio.run(create_key_in_the_past(p.service.database_url, owner, days_ago=1 - lead_s / 86_400,
                                                expires_in=86_400))

    async def scenario() -> None:
        async with KeyCache(p.service.url, None, staleness=3600, max_age=3600) as cache:
            result = await cache.verify(key)
            if not result.valid:  # only if this machine took longer than lead_s to get here
                assert result.code == "KEY_EXPIRED"
                pytest.skip("the key expired before it could be cached")
            # (expiresAt is printed to the millisecond, cut: the real deadline is within 1 ms after it)
            deadline = dt.datetime.fromisoformat(result.key["expiresAt"].replace("Z", "+00:00")).timestamp()
            while True:
                before = time.time()
                if cache.verify_cached(key) is None:
                    break
                assert before < deadline + 0.001, f"served {before - deadline:.3f}s after expiresAt"
                assert time.time() < deadline + WAIT
                await asyncio.sleep(0.005)
            assert cache.hits > 0  # it was cached and served while valid
            # The cache let go at the printed expiresAt, up to 1 ms before the real one (microseconds): asked
            # within that millisecond, keyledger rightly still says valid (CI saw it once). Ask once it is past.
            await asyncio.sleep(max(0.0, deadline + 0.002 - time.time()))
            answer = await cache.verify(key)  # asked again: keyledger says it expired
            assert not answer.valid and answer.code == "KEY_EXPIRED"

    asyncio.run(scenario())


def test_a_verification_in_flight_while_its_key_is_evicted_is_answered_but_not_cached(private: Private) -> None:
    """The answer to a verification sent before an invalidation may be the pre-revocation one: it is returned to
    its caller but never stored, so it cannot outlive the eviction. The proxy holds keyledger's answer back
    until the invalidation has been applied."""
    p = private
    key, key_id = p.key()

    async def scenario() -> None:
        gate = await TcpRelay(p.service.port).start()
        cache = KeyCache(f"http://127.0.0.1:{gate.port}", None, staleness=3600)
        try:
            await cache.start()
            gate.hold()
            verifying = asyncio.create_task(cache.verify(key))
            await wait_for(lambda: gate.held > 0, WAIT, "keyledger's answer, held back by the proxy")
            cache.invalidate(key_id=key_id)  # what an invalidation message does, while the answer is in flight
            gate.release()
            answer = await asyncio.wait_for(verifying, WAIT)
            assert answer.valid and answer.key_id == key_id  # answered...
            assert cache.verify_cached(key) is None  # ...but not cached
            calls = cache.http_verifications
            assert (await cache.verify(key)).valid and cache.http_verifications == calls + 1
            # A verification that no eviction overtook is cached as usual.
            assert cache.verify_cached(key) is not None
        finally:
            await cache.close()
            await gate.cut()

    asyncio.run(scenario())


def test_max_age_bounds_an_entry_even_while_the_cache_is_trusted(private: Private) -> None:
    p = private
    key, _ = p.key()
    max_age = 1.5

    async def scenario() -> None:
        async with KeyCache(p.service.url, p.nats.url, topology=p.service.topology, staleness=30,
                            max_age=max_age) as cache:
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            assert (await cache.verify(key)).valid
            answered = time.monotonic()  # the entry's life started before this (when its request was sent)
            served = await last_served(cache, key)
            assert served is not None and served - answered < max_age
            assert cache.trusted  # the proof is fresh: only max_age can have ended the entry
            calls = cache.http_verifications
            assert (await cache.verify(key)).valid and cache.http_verifications == calls + 1

    asyncio.run(scenario())


def test_a_recreated_invalidations_stream_flushes_the_cache(private: Private) -> None:
    """While the cache was cut off, the invalidations stream was deleted and created again: its sequence numbers
    start over, so the cache cannot tell what it missed and flushes everything."""
    p = private
    (k1, _), (k2, _) = p.key(), p.key()

    async def scenario() -> None:
        relay = await TcpRelay(p.nats.port).start()
        admin = await nats.connect(p.nats.url)
        cache = KeyCache(p.service.url, f"nats://127.0.0.1:{relay.port}", topology=p.service.topology,
                         staleness=STALENESS)
        try:
            await cache.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            assert (await cache.verify(k1)).valid and (await cache.verify(k2)).valid
            await relay.cut()
            await wait_for(lambda: not cache.connected, WAIT, "cache noticed the cut")
            js = admin.jetstream(timeout=5)
            await js.delete_stream(p.service.topology.invalidations_stream)
            await ensure_streams(js, p.service.topology)
            flushes, replayed = cache.flushes, cache.replayed
            await relay.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache resynced")
            assert cache.flushes == flushes + 1 and cache.replayed == replayed
            assert cache.verify_cached(k1) is None and cache.verify_cached(k2) is None
            calls = cache.http_verifications
            assert (await cache.verify(k1)).valid and cache.http_verifications == calls + 1
        finally:
            await cache.close()
            await relay.cut()
            await admin.close()

    asyncio.run(scenario())


def test_a_gap_larger_than_max_replay_flushes_instead_of_replaying(private: Private) -> None:
    p = private
    (k_kept, _), (k_a, id_a), (k_b, id_b) = p.key(), p.key(), p.key()

    async def scenario() -> None:
        relay = await TcpRelay(p.nats.port).start()
        seen: list[dict[str, Any]] = []
        watcher = await nats.connect(p.nats.url)
        await watcher.subscribe(p.service.topology.invalidation_subject, cb=functools.partial(_collect, seen))
        cache = KeyCache(p.service.url, f"nats://127.0.0.1:{relay.port}", topology=p.service.topology,
                         staleness=STALENESS, max_replay=1)
        try:
            await cache.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache synced")
            for k in (k_kept, k_a, k_b):
                assert (await cache.verify(k)).valid
            await relay.cut()
            await wait_for(lambda: not cache.connected, WAIT, "cache noticed the cut")
            await _revoke(p, id_a)
            await _revoke(p, id_b)  # two invalidations missed: more than max_replay
            await wait_for(lambda: {id_a, id_b} <= {s["keyId"] for s in seen}, WAIT, "invalidations published")
            flushes, replayed = cache.flushes, cache.replayed
            await relay.start()
            await wait_for(lambda: cache.caught_up, WAIT, "cache resynced")
            assert cache.flushes == flushes + 1 and cache.replayed == replayed  # flushed, nothing replayed
            assert all(cache.verify_cached(k) is None for k in (k_kept, k_a, k_b))  # the kept one too
            assert not (await cache.verify(k_a)).valid and not (await cache.verify(k_b)).valid
            assert (await cache.verify(k_kept)).valid
        finally:
            await cache.close()
            await watcher.close()
            await relay.cut()

    asyncio.run(scenario())


def test_cached_verify_hot_path_is_served_from_memory(private: Private) -> None:
    """Once cached (and provably fresh), ``verify_cached`` and ``await verify`` answer from memory: no HTTP
    request, every call a hit. The rate is printed; the floor asserted is 50 times below docs/benchmarks.md's target
    (500,000/s), only to catch an accidental round trip per call, never a slow or busy machine."""
    p = private
    key, _ = p.key()

    async def scenario() -> tuple[float, float]:
        async with KeyCache(p.service.url, None, staleness=3600) as cache:
            assert (await cache.verify(key)).valid
            calls, hits = cache.http_verifications, cache.hits
            verify_cached = cache.verify_cached
            n = 50_000
            start = time.perf_counter()
            for _ in range(n):
                verify_cached(key)
            sync_rate = n / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(n):
                await cache.verify(key)
            async_rate = n / (time.perf_counter() - start)
            assert cache.http_verifications == calls and cache.hits == hits + 2 * n
            return sync_rate, async_rate

    sync_rate, async_rate = asyncio.run(scenario())
    print(f"cached verify: verify_cached {sync_rate:,.0f}/s, await verify {async_rate:,.0f}/s")
    assert sync_rate > 10_000 and async_rate > 10_000


@pytest.mark.parametrize("budget", [{"receipt_rate": 0.5}, {"receipt_rate": 0}, {"receipt_rate": -4},
                                    {"receipt_rate": float("nan")}, {"receipt_rate": float("inf")},
                                    {"receipt_burst": 0}, {"receipt_burst": float("nan")},
                                    {"receipt_burst": float("inf")}])
def test_a_receipt_budget_that_is_no_budget_is_refused(budget: dict[str, float]) -> None:
    """Below 1 a second the heartbeat alone would overdraw the budget (applied receipts would starve); NaN and
    infinity would make its arithmetic meaningless. Refused when the cache is made, before anything runs."""
    with pytest.raises(ValueError, match="receipt_rate and receipt_burst"):
        KeyCache("http://127.0.0.1:1", **budget)  # type: ignore[arg-type]
    KeyCache("http://127.0.0.1:1", receipt_rate=1, receipt_burst=1)  # the least budget there is
