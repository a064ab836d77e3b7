"""A verifying cache for services that accept keyledger API keys: ``KeyCache`` plus ASGI/Litestar middleware.

Why a cache at all: asking keyledger over HTTP on every request costs a round trip and makes keyledger a
single point of failure for every downstream request. Why this one is safe: keyledger's invalidation
projection publishes, within milliseconds of a revocation, disable or relevant update, a message on
``<prefix>.cache.invalidate``; the cache evicts the key the moment it arrives, and the next request
re-verifies over HTTP (where keyledger answers from the table the revoking transaction already changed).

The cache only ever trusts itself as far as it can *prove* it has heard every invalidation, and the proof
covers the whole path from keyledger's event log, not only the cache's own connection (freshness.py):

* **Proof of freshness.** Every ``sync_interval`` the cache publishes a numbered probe; keyledger's relay
  answers probes with a checkpoint that travels behind the events through the outbox, the events stream and
  the invalidation projection, and arrives here only after the invalidation of every event committed before
  the probe was sent. The send time of the newest answered probe, on this process's own monotonic clock, is
  ``proven_at``; ``trusted`` means it is at most ``staleness`` old. Whatever stalls (keyledger cut from NATS,
  a hung leader, a deleted stream, a cache on the wrong NATS or prefix), the echoes stop and trust ends within
  ``staleness``: answers stay right, only slower.
* **Bounded staleness, fail-closed.** A cached positive is served only if it was verified, or freshness was
  proven, within ``staleness`` seconds (default 1 s). Otherwise it is re-verified over HTTP.
* **Limited keys are never answered from memory.** A key with a usage limit (``remaining``) or a rate limit
  counts every use in keyledger, so its positives are never cached.
* **Catching up.** A disconnect (or a client-side slow-consumer drop) opens a *gap*, and a probe sent before it
  proves nothing afterwards. After reconnecting, the cache reads the invalidations it missed from the JetStream
  stream, from just after the last stream sequence it had seen (``cursor``, kept by a ``STREAM.INFO`` round
  trip every ``sync_interval``) up to the stream's end, before an echo can count again. If it cannot prove it
  saw them all (the stream lost messages past its limits, was purged or recreated, is missing, or the gap is
  larger than ``max_replay``) it flushes every entry instead.
* **Fail-closed on keyledger outages.** If keyledger cannot be asked, ``verify`` answers invalid
  (``KEYLEDGER_UNAVAILABLE``), never valid from an entry it cannot trust. ``fail_open=True`` changes only
  this: a cached positive that is merely *stale* (not evicted, not expired) is then served during the outage.
* **No fill after eviction.** A verification that was in flight while its key was invalidated is answered
  but not cached, so a pre-revocation answer can never be stored after the revocation's eviction.

The hot path (``verify_cached``) is a sha256, a dict lookup, a clock read and two comparisons. Entries are
keyed by the raw 32-byte digest; invalidations carry ``base64url(sha256(key))`` and are decoded once.

Messages, logs and the cache itself hold only hashes, never a plaintext key.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime as dt
import hashlib
import logging
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import httpx
import msgspec

from . import tasks
from .config import Topology, nats_servers
from .core.freshness import Prober, Receipt, encode_receipt

log = logging.getLogger("keyledger.client")

__all__ = ["Invalidation", "KeyAuthMiddleware", "KeyCache", "VerifyResult", "litestar_middleware"]

VERIFY_PATH = "/api/auth/api-key/verify"
UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'

# Receipts (positions only): at once after an invalidation while the budget lasts (RECEIPT_BURST, refilled at
# RECEIPT_RATE a second), else a heartbeat this often (liveness).
RECEIPT_EVERY_S = 1.0
RECEIPT_RATE = 4.0
RECEIPT_BURST = 8
RECEIPT_MAX_APPLIED = 1024  # positions per receipt (keyledger reads as many); older ones wait for a checkpoint

_sha256 = hashlib.sha256
_monotonic = time.monotonic


class _Budget:
    """A token bucket: ``burst`` at once, then ``rate`` a second."""

    def __init__(self, rate: float, burst: int) -> None:
        # At least 1 (a heartbeat a second must not overdraw it), and finite (NaN and infinity are no budget).
        if not (1 <= rate < math.inf and 1 <= burst < math.inf):
            raise ValueError("receipt_rate and receipt_burst must be finite numbers of at least 1")
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), _monotonic()

    def wait(self) -> float:
        """Seconds until one token is there (0: now)."""
        now = _monotonic()
        self._tokens, self._at = min(self.burst, self._tokens + (now - self._at) * self.rate), now
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def take(self) -> None:
        self.wait()
        self._tokens -= 1.0


class VerifyResult(msgspec.Struct, frozen=True):
    """keyledger's verify answer (better-auth's shape): ``valid``, ``error`` ``{message, code}``, ``key`` record."""

    valid: bool
    error: dict[str, Any] | None = None
    key: dict[str, Any] | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.get("id") if self.key else None

    @property
    def code(self) -> str | None:
        return self.error.get("code") if self.error else None


class Invalidation(msgspec.Struct, frozen=True, rename="camel"):
    """One message on ``<prefix>.cache.invalidate``. ``position`` orders them; repeats are harmless."""

    key_id: str
    key_hash: str
    reason: str
    position: int
    occurred_at: str


def _unavailable() -> VerifyResult:
    return VerifyResult(False, {"message": "keyledger is unavailable", "code": "KEYLEDGER_UNAVAILABLE"})


_MISSING_KEY = VerifyResult(False, {"message": "API key is required", "code": "KEY_NOT_FOUND"})
_answer_decoder = msgspec.json.Decoder(VerifyResult)
_invalidation_decoder = msgspec.json.Decoder(Invalidation)
_encoder = msgspec.json.Encoder()
_NEVER = float("inf")


def _digest_of_hash(key_hash: str) -> bytes:
    """``base64url(sha256)`` without padding, as in events and invalidations, back to the 32 raw bytes."""
    return base64.urlsafe_b64decode(key_hash + "=" * (-len(key_hash) % 4))


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class _Entry:
    __slots__ = ("result", "key_id", "deadline", "verified_at")

    def __init__(self, result: VerifyResult, key_id: str | None, deadline: float, verified_at: float) -> None:
        self.result = result
        self.key_id = key_id
        self.deadline = deadline  # monotonic: expiresAt, max_age or negative_ttl, whichever is first
        self.verified_at = verified_at  # monotonic time the HTTP verification was *sent*


class KeyCache:
    """Verifies API keys against keyledger, caching answers and evicting them on invalidation.

    Use it as ``async with KeyCache(...) as cache:`` or call ``await cache.start()`` / ``await cache.close()``.

    :param base_url: keyledger's HTTP base, e.g. ``http://127.0.0.1:3000``, or several (a list, or comma-separated):
        a verification that cannot reach one (or gets a 5xx) goes to the next, and the one that answered is
        asked first next time.
    :param nats_url: NATS for invalidations (one URL, a comma-separated list, or a list); ``None`` runs without
        them (every positive then lives at most ``staleness`` seconds: a plain short-TTL cache).
    :param nats_options: more ``nats.connect`` options, e.g. ``keyledger.config.nats_connect_options()`` for
        credentials and TLS from the environment.
    :param topology: subject prefix and invalidations stream (``Topology.from_env()`` reads
        ``KEYLEDGER_SUBJECT_PREFIX`` / ``KEYLEDGER_INVALIDATIONS_STREAM``).
    :param staleness: how old (seconds) a positive may be when the cache cannot prove it heard every
        invalidation (NATS down, catching up, partitioned).
    :param negative_ttl: how long an invalid answer is cached (0 disables).
    :param max_age: upper bound on any positive's life, invalidations or not (``None``: no bound). A safety
        net for what the cache cannot see, such as an invalidation projection that is not running.
    :param fail_open: serve stale (never evicted, never expired) positives while keyledger is unreachable.
    :param sync_interval: period of the freshness probes (and of the cursor's round trip); default
        ``staleness / 4``.
    :param max_replay: the largest gap replayed message by message; a larger one flushes everything.
    :param max_entries: a full cache drops expired entries, then everything (it is only a cache).
    :param on_invalidation: called (synchronously) after each invalidation was applied.
    :param cache_id: this cache's stable name in keyledger's revocation receipts (default: host, pid and a
        number); ``service``: the service it belongs to. ``receipts=False`` reports nothing.
    :param receipt_rate: receipts a second this cache sends at most (at least 1), beyond ``receipt_burst`` at once
        (defaults 4 and 8). A revocation among the first ``receipt_burst`` in a while is confirmed as soon as it is
        applied; in a storm of them, one receipt every ``1 / receipt_rate`` seconds names all applied since, so a
        fleet's receipts cost keyledger at most ``receipt_rate`` messages a second per cache, however many keys are
        revoked.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        nats_url: str | Sequence[str] | None = None,
        *,
        topology: Topology | None = None,
        staleness: float = 1.0,
        negative_ttl: float = 1.0,
        max_age: float | None = 300.0,
        fail_open: bool = False,
        http_timeout: float = 2.0,
        sync_interval: float | None = None,
        max_replay: int = 10_000,
        max_entries: int = 100_000,
        http_client: httpx.AsyncClient | None = None,
        on_invalidation: Callable[[Invalidation], None] | None = None,
        nats_options: dict[str, Any] | None = None,
        cache_id: str | None = None,
        service: str = "",
        receipts: bool = True,
        receipt_rate: float = RECEIPT_RATE,
        receipt_burst: int = RECEIPT_BURST,
    ) -> None:
        bases = [base_url] if isinstance(base_url, str) else list(base_url)
        self.base_urls = [b.strip().rstrip("/") for u in bases for b in u.split(",") if b.strip()]
        if not self.base_urls:
            raise ValueError("KeyCache needs at least one keyledger base URL")
        self.base_url = self.base_urls[0]
        if isinstance(nats_url, str):
            nats_url = nats_servers(nats_url) if nats_url else None
        self.nats_url = list(nats_url) if nats_url else None
        self.nats_options = nats_options or {}
        # Revocation receipts: who this cache is, for keyledger's "revoked everywhere" answer.
        self.cache_id = cache_id or f"{socket.gethostname()}-{os.getpid()}-{id(self) % 10_000:04d}"
        self.service = service
        self.receipts = receipts
        self._receipt_sent_at = float("-inf")  # monotonic time of the last receipt
        # Positions of invalidations applied since the last receipt (the newest; older ones wait for a checkpoint).
        self._unreported: collections.deque[int] = collections.deque(maxlen=RECEIPT_MAX_APPLIED)
        self._receipt_task: asyncio.Task[None] | None = None
        self._receipt_budget = _Budget(receipt_rate, receipt_burst)
        self.receipts_sent = 0
        self.topology = topology or Topology()
        self.staleness = staleness
        self.negative_ttl = negative_ttl
        self.max_age = max_age
        self.fail_open = fail_open
        self.http_timeout = http_timeout
        self.sync_interval = sync_interval if sync_interval is not None else max(staleness / 4, 0.01)
        self.max_replay = max_replay
        self.max_entries = max_entries
        self.on_invalidation = on_invalidation

        self._entries: dict[bytes, _Entry] = {}
        # A key can have several cached secrets (a rotated one inside its grace period, and the new one).
        self._by_id: dict[str, set[bytes]] = {}
        self._inflight: dict[bytes, asyncio.Task[VerifyResult]] = {}
        # Eviction log for the "no fill after eviction" rule: (generation, digest, key id, was it a flush).
        self._generation = 0
        self._evictions: collections.deque[tuple[int, bytes | None, str | None, bool]] = collections.deque(maxlen=1024)

        self._http = http_client
        self._own_http = http_client is None
        self._current = 0  # index of the keyledger base URL that answered last
        self._nc: Any = None
        self._js: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._prober = Prober()  # the freshness proof: probes out, checkpoint echoes in (freshness.py)
        self._gap = True  # nothing proven yet: the first catch-up resolves it
        self._epoch = 0  # bumped on every disconnect, so a round trip that spans one proves nothing
        self._cursor: int | None = None  # last invalidations-stream sequence proven received

        # Observability (plain counters; ``collector()`` exports them).
        self.hits = 0  # answers served from memory
        self.http_verifications = 0  # misses: answers asked of keyledger
        self.invalidations_applied = 0
        self.evictions = 0  # entries removed by invalidations and flushes
        self.flushes = 0
        self.replayed = 0
        self.last_invalidation: Invalidation | None = None

    # ------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------------
    async def start(self) -> "KeyCache":
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.http_timeout,
                limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=60),
            )
        if self.nats_url and self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="keyledger-cache-nats")
        return self

    async def close(self) -> None:
        if self._task is not None:
            await tasks.stop([self._task])
            self._task = None
        if self._receipt_task is not None:
            await tasks.stop([self._receipt_task])
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.close(), 2)
            except Exception:
                pass
            self._nc = None
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> "KeyCache":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def trusted(self) -> bool:
        """True while the cache holds a freshness proof at most ``staleness`` old: every event committed in
        keyledger's log before ``now - staleness`` has been invalidated here."""
        return _monotonic() - self._prober.proven_at <= self.staleness

    @property
    def proof_age(self) -> float:
        """Seconds since the newest proven instant (``inf``: never proven)."""
        return self._prober.age()

    @property
    def caught_up(self) -> bool:
        """True while connected with no gap: every invalidation up to the last proof has been received."""
        return self.connected and not self._gap and self.trusted

    @property
    def active_base_url(self) -> str:
        """The keyledger base URL that answered last (asked first next time)."""
        return self.base_urls[self._current]

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def __len__(self) -> int:
        return len(self._entries)

    def collector(self, prefix: str = "keyledger_cache") -> Any:
        """A Prometheus collector of this cache's figures: ``registry.register(cache.collector())``.

        Needs ``prometheus-client``; nothing is imported unless this is called."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cache = self

        class _Collector:
            def collect(self) -> Any:
                yield GaugeMetricFamily(f"{prefix}_trusted", "1 while the cache holds a fresh freshness proof",
                                        value=float(cache.trusted))
                yield GaugeMetricFamily(f"{prefix}_checkpoint_age_seconds",
                                        "Age of the freshness proof (+Inf: none)", value=cache.proof_age)
                yield GaugeMetricFamily(f"{prefix}_entries", "Cached answers", value=len(cache))
                for name, value, doc in (
                    ("hits", cache.hits, "Answers served from memory"),
                    ("misses", cache.http_verifications, "Answers asked of keyledger over HTTP"),
                    ("evictions", cache.evictions, "Entries removed by invalidations and flushes"),
                    ("invalidations", cache.invalidations_applied, "Invalidations applied"),
                    ("flushes", cache.flushes, "Whole-cache flushes"),
                    ("receipts", cache.receipts_sent, "Revocation receipts sent, heartbeats included"),
                ):
                    yield CounterMetricFamily(f"{prefix}_{name}", doc, value=value)

        return _Collector()

    # ------------------------------------------------------------------------------------------------------
    # Verification
    # ------------------------------------------------------------------------------------------------------
    def verify_cached(self, key: str) -> VerifyResult | None:
        """The cached answer for ``key`` if it may be served right now, else ``None``. Never does I/O."""
        entry = self._entries.get(_sha256(key.encode()).digest())
        if entry is None:
            return None
        now = _monotonic()
        if now >= entry.deadline:
            return None
        staleness = self.staleness
        if now - self._prober.proven_at > staleness and now - entry.verified_at > staleness:
            return None  # cannot prove no invalidation was missed: re-verify
        self.hits += 1
        return entry.result

    async def verify(self, key: str) -> VerifyResult:
        """Verify ``key``: from the cache when that is provably fresh, else over HTTP (then cached)."""
        result = self.verify_cached(key)
        if result is not None:
            return result
        if not key:
            return _MISSING_KEY
        digest = _sha256(key.encode()).digest()
        task = self._inflight.get(digest)
        if task is None:  # one HTTP verification per key at a time; later callers share it
            task = asyncio.ensure_future(self._verify_remote(key, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda _t, d=digest: self._inflight.pop(d, None))
        return await asyncio.shield(task)

    async def _verify_remote(self, key: str, digest: bytes) -> VerifyResult:
        if self._http is None:
            await self.start()
        assert self._http is not None
        generation = self._generation
        sent = _monotonic()
        self.http_verifications += 1
        body = _encoder.encode({"key": key})
        response = None
        for attempt in range(len(self.base_urls)):  # fail over: the one that answered last first, then the rest
            index = (self._current + attempt) % len(self.base_urls)
            try:
                response = await self._http.post(self.base_urls[index] + VERIFY_PATH, content=body,
                                                 headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                log.warning("keyledger verify at %s failed: %s", self.base_urls[index], type(exc).__name__)
                continue
            if response.status_code < 500:
                self._current = index
                break
        if response is None:
            return self._unavailable(digest)
        if response.status_code != 200:
            if 400 <= response.status_code < 500 and response.status_code != 429:
                return VerifyResult(False, {"message": "Invalid API key.", "code": "INVALID_API_KEY"})
            return self._unavailable(digest)
        try:
            result = _answer_decoder.decode(response.content)
        except msgspec.DecodeError:
            return self._unavailable(digest)
        if not self._evicted_since(generation, digest, result.key_id):
            self._store(digest, result, sent)
        return result

    def _unavailable(self, digest: bytes) -> VerifyResult:
        if self.fail_open:
            entry = self._entries.get(digest)
            if entry is not None and entry.result.valid and _monotonic() < entry.deadline:
                return entry.result
        return _unavailable()

    def _evicted_since(self, generation: int, digest: bytes, key_id: str | None) -> bool:
        if generation == self._generation:
            return False
        if self._generation - generation > len(self._evictions):
            return True  # the log no longer reaches back that far: assume the worst
        for gen, evicted, evicted_id, flushed in reversed(self._evictions):
            if gen <= generation:
                break
            if flushed or evicted == digest or (key_id is not None and evicted_id == key_id):
                return True
        return False

    def _store(self, digest: bytes, result: VerifyResult, sent: float) -> None:
        if result.valid:
            key = result.key or {}
            if key.get("remaining") is not None or key.get("rateLimitEnabled"):
                return  # keyledger counts every use of a limited key: never answer one from memory
            deadline = sent + self.max_age if self.max_age is not None else _NEVER
            # The key's expiry, and for a superseded secret its rotation grace deadline, end the entry too.
            for ends in (_epoch(key.get("expiresAt")), _epoch(key.get("graceUntil"))):
                if ends is not None:
                    deadline = min(deadline, sent + (ends - time.time()))
            key_id = key.get("id")
        else:
            deadline = sent + self.negative_ttl
            key_id = None
        if deadline <= _monotonic():
            return
        if len(self._entries) >= self.max_entries:
            self._make_room()
        self._entries[digest] = _Entry(result, key_id, deadline, sent)
        if key_id:
            self._by_id.setdefault(key_id, set()).add(digest)

    def _make_room(self) -> None:
        now = _monotonic()
        self._entries = {d: e for d, e in self._entries.items() if e.deadline > now}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._by_id = {}
        for d, e in self._entries.items():
            if e.key_id:
                self._by_id.setdefault(e.key_id, set()).add(d)

    # ------------------------------------------------------------------------------------------------------
    # Eviction
    # ------------------------------------------------------------------------------------------------------
    def invalidate(self, *, key_hash: str | None = None, key_id: str | None = None) -> None:
        """Evict one key, by hash and/or id (what an invalidation message does)."""
        digest = _digest_of_hash(key_hash) if key_hash else None
        if digest is not None and self._entries.pop(digest, None) is not None:
            self.evictions += 1
        if key_id is not None:
            for by_id in self._by_id.pop(key_id, ()):
                if self._entries.pop(by_id, None) is not None:
                    self.evictions += 1
        self._generation += 1
        self._evictions.append((self._generation, digest, key_id, False))

    def flush(self, why: str = "") -> None:
        """Evict everything."""
        had = len(self._entries)
        self.evictions += had
        self._entries.clear()
        self._by_id.clear()
        self._generation += 1
        self._evictions.append((self._generation, None, None, True))
        self.flushes += 1
        if why and had:
            log.warning("key cache flushed (%d entries): %s", had, why)

    def _apply(self, payload: bytes) -> None:
        try:
            inv = _invalidation_decoder.decode(payload)
            self.invalidate(key_hash=inv.key_hash, key_id=inv.key_id)
        except Exception as exc:  # unreadable: we cannot tell which key, so no key may be trusted
            self.flush(f"unreadable invalidation ({type(exc).__name__})")
            return
        self.invalidations_applied += 1
        self.last_invalidation = inv
        if self.receipts:
            self._unreported.append(inv.position)
        if self.on_invalidation is not None:
            try:
                self.on_invalidation(inv)
            except Exception:
                log.exception("on_invalidation callback failed")

    async def _on_message(self, msg: Any) -> None:
        self._apply(msg.data)
        if self._unreported and self._receipt_task is None and self._nc is not None:
            # One receipt per burst: sent on the next loop turn, once the rest of what arrived is applied too.
            self._receipt_task = asyncio.get_running_loop().create_task(self._report_applied())

    async def _report_applied(self) -> None:
        """Receipt for the invalidations just applied: keyledger can date their revocations at once, without
        waiting for the checkpoint that will cover them. Once the budget is spent, it waits for the next receipt
        the budget allows, naming what was applied meanwhile too."""
        try:
            await asyncio.sleep(self._receipt_budget.wait())  # (0: the next loop turn)
            applied = list(self._unreported)
            self._unreported.clear()
            await self._send_receipt(applied)
        finally:
            self._receipt_task = None

    async def _send_receipt(self, applied: list[int] | None = None) -> None:
        self._receipt_sent_at = _monotonic()
        self._receipt_budget.take()  # (a heartbeat too: it comes a second after the last receipt, budget refilled)
        self.receipts_sent += 1
        receipt = Receipt(cache_id=self.cache_id, service=self.service, position=self._prober.seen_position or 0,
                          applied=applied or [])
        try:
            await self._nc.publish(self.topology.receipts_subject, encode_receipt(receipt))  # type: ignore[union-attr]
        except Exception:  # a lost receipt is replaced by the next one
            pass

    # ------------------------------------------------------------------------------------------------------
    # NATS: connection, proof round trips, catching up
    # ------------------------------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        import nats

        delay = 0.05
        while self._nc is None:
            try:
                self._nc = await nats.connect(
                    servers=self.nats_url,
                    name="keyledger-cache",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error,
                    **self.nats_options,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("NATS not available (%s); verifying over HTTP meanwhile", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._js = self._nc.jetstream(timeout=max(min(self.staleness, 2.0), 0.2))
        await self._nc.subscribe(self.topology.invalidation_subject, cb=self._on_message)
        await self._nc.subscribe(self.topology.checkpoint_subject, cb=self._on_checkpoint)
        while True:
            try:
                if self._nc.is_closed:
                    return
                if self._nc.is_connected:
                    await self._nc.publish(self.topology.probe_subject, self._prober.next_probe())
                    if self._gap:
                        await self._catch_up()
                    else:
                        await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cache sync: %s: %s", type(exc).__name__, exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.sync_interval)
            except asyncio.TimeoutError:
                pass

    async def _on_checkpoint(self, msg: Any) -> None:
        # An echo counts only with no gap left to close (the probe's own session is checked by the prober).
        self._prober.on_checkpoint(msg.data, accept=not self._gap)
        # A heartbeat receipt every RECEIPT_EVERY_S, with the position proven so far: it keeps this cache "live"
        # in keyledger's receipts even while no key is revoked (checkpoints come every 250 ms regardless), and
        # confirms what an applied-invalidation receipt left out. Revocations are confirmed at once by those.
        if (self.receipts and self._prober.seen_position is not None and self._nc is not None
                and _monotonic() - self._receipt_sent_at >= RECEIPT_EVERY_S):
            await self._send_receipt()

    async def _on_disconnect(self) -> None:
        self._epoch += 1
        self._prober.new_session()
        self._gap = True
        log.warning("key cache: NATS disconnected; positives older than %ss are re-verified", self.staleness)

    async def _on_reconnect(self) -> None:
        log.info("key cache: NATS reconnected; catching up on invalidations")
        self._wake.set()

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):  # the client dropped messages: some may be invalidations
            self._epoch += 1
            self._prober.new_session()
            self._gap = True
            self._wake.set()
        log.debug("key cache NATS error: %s", exc)

    async def _stream_state(self) -> tuple[int, int] | None:
        """(first_seq, last_seq) of the invalidations stream, or None if it does not exist."""
        from nats.js.errors import NotFoundError

        try:
            info = await self._js.stream_info(self.topology.invalidations_stream)
        except NotFoundError:
            return None
        return info.state.first_seq, info.state.last_seq

    async def _sync(self) -> None:
        """Move the cursor to the stream's end: NATS keeps a connection's messages in order, so when the answer
        arrives every invalidation stored before it was asked has been received live."""
        epoch = self._epoch
        state = await self._stream_state()
        if epoch != self._epoch or self._gap:
            return
        self._cursor = None if state is None else state[1]

    async def _catch_up(self) -> None:
        """Close a gap: replay what the stream holds after the cursor, or flush if that cannot be proven."""
        epoch = self._epoch
        for _ in range(3):  # repeat until the stream's end stops moving (closes a publish-vs-SUB race)
            state = await self._stream_state()
            cursor = self._cursor
            if state is None:
                self.flush("invalidations stream missing")
                self._cursor = None
                break
            first, last = state
            if last == cursor:
                break
            if cursor is None or last < cursor or first > cursor + 1 or last - cursor > self.max_replay:
                self.flush(f"cannot replay invalidations {cursor} -> {last} (stream holds {first}..{last})")
                self._cursor = last
                continue
            if not await self._replay(cursor + 1, last):
                self.flush("invalidations missing from the stream")
            self._cursor = last
        if epoch != self._epoch:
            return  # disconnected again meanwhile: still a gap
        self._gap = False
        log.info("key cache: caught up at stream sequence %s", self._cursor)

    async def _replay(self, first: int, last: int) -> bool:
        from nats.js.errors import NotFoundError

        for start in range(first, last + 1, 64):
            seqs = range(start, min(start + 64, last + 1))
            msgs = await asyncio.gather(
                *(self._js.get_msg(self.topology.invalidations_stream, s) for s in seqs), return_exceptions=True
            )
            for msg in msgs:
                if isinstance(msg, NotFoundError):
                    return False
                if isinstance(msg, BaseException):
                    raise msg
                self._apply(msg.data)
                self.replayed += 1
        return True


# ----------------------------------------------------------------------------------------------------------
# Middleware
# ----------------------------------------------------------------------------------------------------------
_UNAUTHORIZED_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED_BODY)).encode())]


def key_from_scope(scope: dict[str, Any]) -> str | None:
    """``Authorization: Bearer <key>``, else the ``api_key`` query parameter."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    query = scope.get("query_string", b"")
    if b"api_key=" in query:
        values = urllib.parse.parse_qs(query.decode("latin-1")).get("api_key")
        if values and values[0]:
            return values[0]
    return None


class KeyAuthMiddleware:
    """Plain ASGI middleware: 401 ``{"error": "Unauthorized"}`` unless the request carries a valid key.

    On success the verified key record is ``scope["state"]["api_key"]`` (Litestar: ``request.state.api_key``).
    ``exclude`` lists path prefixes that need no key (health checks). Lifespan events pass through.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], cache: KeyCache, *, exclude: Collection[str] = ()) -> None:
        self.app = app
        self.cache = cache
        self.exclude = tuple(exclude)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or (self.exclude and scope["path"].startswith(self.exclude)):
            await self.app(scope, receive, send)
            return
        key = key_from_scope(scope)
        result = None
        if key:
            result = self.cache.verify_cached(key) or await self.cache.verify(key)
        if result is None or not result.valid:
            await self._deny(scope, send)
            return
        scope.setdefault("state", {})["api_key"] = result.key
        await self.app(scope, receive, send)

    @staticmethod
    async def _deny(scope: dict[str, Any], send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        await send({"type": "http.response.start", "status": 401, "headers": _UNAUTHORIZED_HEADERS})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})


def litestar_middleware(cache: KeyCache, *, exclude: Collection[str] = ()) -> Any:
    """``Litestar(middleware=[litestar_middleware(cache)])``: the same middleware, as Litestar declares it."""
    from litestar.middleware import DefineMiddleware

    return DefineMiddleware(KeyAuthMiddleware, cache=cache, exclude=exclude)
