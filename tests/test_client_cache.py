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

from harness import Service, free_port, unique_topology, wait_for
from keyledger.bus import Bus
from keyledger.client import KeyCache, VerifyResult
from keyledger.embedded import EmbeddedNats
from keyledger.projections.invalidations import InvalidationProjection
from keyledger.records import hash_key

STALENESS = 0.5
SLACK = 0.4  # scheduling allowance on top of the staleness bound (sync period + loop latency)




class TcpRelay:
    """Forwards a local port to ``target_port``; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

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

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except Exception:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


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
            await wait_for(lambda: cache.caught_up, 5, "cache synced")
            for k in (k_revoked, k_kept, k_other):
                assert (await cache.verify(k)).valid
            assert all(cache.verify_cached(k) for k in (k_revoked, k_kept, k_other))

            await relay.cut()
            cut_at = time.monotonic()
            await wait_for(lambda: not cache.connected, 2, "cache noticed the cut")
            # Two revocations while the cache cannot hear: both invalidations reach the stream.
            await _revoke(p, id_revoked)
            await _revoke(p, id_other)
            await wait_for(lambda: {id_revoked, id_other} <= {s["keyId"] for s in seen}, 3, "invalidations published")

            # Bounded staleness: the revoked key stops being served from the cache within the bound...
            await wait_for(lambda: cache.verify_cached(k_revoked) is None and cache.verify_cached(k_kept) is None,
                           STALENESS + SLACK, "stale entries untrusted")
            assert time.monotonic() - cut_at <= STALENESS + SLACK
            assert not cache.trusted
            # ...and is re-verified over HTTP, where it is revoked.
            result = await cache.verify(k_revoked)
            assert not result.valid and result.code == "INVALID_API_KEY"
            # An unrevoked key is re-verified too, and its fresh answer is served for at most the bound.
            calls = cache.http_verifications
            assert (await cache.verify(k_kept)).valid and cache.http_verifications == calls + 1
            assert cache.verify_cached(k_kept) is not None

            # Reconnect: the cache replays what it missed before it trusts itself again.
            flushes = cache.flushes
            await relay.start()
            await wait_for(lambda: cache.caught_up, 5, "cache caught up")
            assert cache.replayed >= 2 and cache.flushes == flushes
            # k_other was never re-verified during the cut: only the replay can have evicted it.
            assert cache.verify_cached(k_other) is None
            assert not (await cache.verify(k_other)).valid
            # k_kept survived (replay, not flush) and is served from the cache again, indefinitely.
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
            await wait_for(lambda: cache.caught_up, 5, "cache synced")
            assert (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid
            await relay.cut()
            await wait_for(lambda: not cache.connected, 2, "cache noticed the cut")
            await _revoke(p, id_revoked)
            await wait_for(lambda: id_revoked in {s["keyId"] for s in seen}, 3, "invalidation published")
            await watcher.jetstream().purge_stream(p.service.topology.invalidations_stream)
            flushes = cache.flushes
            await relay.start()
            await wait_for(lambda: cache.caught_up, 5, "cache resynced")
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
            await wait_for(lambda: cache.caught_up, 5, "cache synced")
            assert (await cache.verify(k_revoked)).valid and (await cache.verify(k_kept)).valid

            p.nats.stop()
            stopped_at = time.monotonic()
            await _revoke(p, id_revoked)  # keyledger keeps revoking without NATS (the event waits in its outbox)
            await wait_for(lambda: cache.verify_cached(k_revoked) is None, STALENESS + SLACK, "stale entry untrusted")
            assert time.monotonic() - stopped_at <= STALENESS + SLACK
            assert not (await cache.verify(k_revoked)).valid
            assert (await cache.verify(k_kept)).valid  # re-verified over HTTP: keyledger itself is fine

            p.nats.restart()
            await wait_for(lambda: cache.caught_up, 10, "cache reconnected and caught up")
            # The revocation's invalidation arrives once the outbox relay has published the event.
            await wait_for(lambda: cache.last_invalidation is not None
                           and cache.last_invalidation.key_id == id_revoked, 10, "invalidation after restart")
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
            await wait_for(lambda: closed.verify_cached(key) is None, 1, "entry untrusted")
            result = await closed.verify(key)
            assert not result.valid and result.code == "KEYLEDGER_UNAVAILABLE"
            await wait_for(lambda: opened.verify_cached(key) is None, 1, "entry untrusted")
            assert (await opened.verify(key)).valid  # fail_open: the stale (never evicted) positive
            assert not (await opened.verify(unknown)).valid  # but never an unknown key
            opened.invalidate(key_hash=hash_key(key))
            assert not (await opened.verify(key)).valid  # nor an evicted one
        finally:
            await closed.close()
            await opened.close()

    asyncio.run(scenario())


def test_negative_answers_are_cached_briefly_and_expiry_is_honoured(private: Private) -> None:
    p = private
    key, key_id = p.key()

    async def scenario() -> None:
        async with KeyCache(p.service.url, None, staleness=30, negative_ttl=0.3) as cache:
            bogus = "B" * 64
            assert not (await cache.verify(bogus)).valid
            calls = cache.http_verifications
            assert not (await cache.verify(bogus)).valid and cache.http_verifications == calls
            await wait_for(lambda: cache.verify_cached(bogus) is None, 1, "negative expired")

            # A positive is never served past the key's expiresAt (keyledger's minimum expiresIn is a day,
            # so the record is stored with an expiresAt just ahead, as the HTTP answer would carry it).
            result = await cache.verify(key)
            soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3)
            expiring = VerifyResult(True, None, {**result.key, "expiresAt": soon.isoformat().replace("+00:00", "Z")})
            digest = __import__("hashlib").sha256(key.encode()).digest()
            cache._store(digest, expiring, time.monotonic())
            assert cache.verify_cached(key) is expiring
            await wait_for(lambda: cache.verify_cached(key) is None, 1, "expired positive dropped")
            past = VerifyResult(True, None, {**result.key, "expiresAt": "2000-01-01T00:00:00.000Z"})
            cache._store(digest, past, time.monotonic())
            assert cache.verify_cached(key) is None

            # A verification in flight while its key is evicted is answered but not cached.
            generation = cache._generation
            cache.invalidate(key_id=key_id)
            assert cache._evicted_since(generation, digest, key_id)
            assert not cache._evicted_since(generation, b"other", "other-id")

    asyncio.run(scenario())


def test_cached_verify_hot_path_throughput(private: Private) -> None:
    p = private
    key, _ = p.key()

    async def scenario() -> tuple[float, float]:
        async with KeyCache(p.service.url, None, staleness=3600) as cache:
            assert (await cache.verify(key)).valid
            verify_cached = cache.verify_cached
            n = 200_000
            start = time.perf_counter()
            for _ in range(n):
                verify_cached(key)
            sync_rate = n / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(n):
                await cache.verify(key)
            async_rate = n / (time.perf_counter() - start)
            return sync_rate, async_rate

    sync_rate, async_rate = asyncio.run(scenario())
    print(f"cached verify: verify_cached {sync_rate:,.0f}/s, await verify {async_rate:,.0f}/s")
    assert sync_rate > 100_000  # a floor for slow CI machines; see the report for the measured figure
