"""Revocation receipts: when did a revocation take effect in every cache that holds keys?

Each ``KeyCache`` reports on ``<prefix>.cache.receipts`` (positions only: no key ids, no hashes):

* at once after it applied invalidations, their positions (``applied``): each such revocation is in effect in
  that cache (the key evicted, and a verify in flight cannot put it back), no checkpoint awaited;
* every second, as a heartbeat, the log position through which it has applied every invalidation (proven by
  the freshness checkpoints, freshness.py): this keeps a cache live while nothing is revoked, and confirms
  whatever an applied receipt left out (a lost message, a cache that predates ``applied``).

This projection (in the background leader) keeps three tables (schema.sql):

* ``receipt_caches``: every cache heard of, its confirmed position and when it was last heard (a cache silent
  for ``GONE_AFTER_S`` is *gone*: listed, but it no longer blocks "everywhere");
* ``revocations``: each revocation-like event (revoked, disabled, expired, rotated without grace), from the
  event stream (its own durable consumer, consumer.py);
* ``revocation_receipts``: per revocation, one row per cache that was live when the revocation was projected,
  with ``effective_at`` = the moment keyledger received the first receipt covering the position (naming it in
  ``applied``, or proving every position up to it).

Every time is the database's clock (``clock_timestamp()``), so no host's clock skews a receipt. When the last
live cache confirms (or the last pending one is declared gone), ``effective_everywhere_at`` is set and
``<prefix>.revocation.effective`` announces it. A receipt can arrive before the revocation's event is projected
(it raced through the invalidation path): the projection remembers each cache's recent receipts and dates
such a cache's confirmation from the first one that covered the position. The revoke path pays nothing.

Storage: one ``revocations`` row per revocation-like event and one receipt row per live cache for each, kept
``RETENTION_DAYS`` (30) days; ``receipt_caches`` rows of caches silent for that long go too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
from nats.js.api import AckPolicy

from ..background.bus import Bus
from ..core.events import decode_envelope
from ..core.freshness import Receipt, decode_receipt
from ..storage.connections import pg_keepalives
from .consumer import consume, run_forever

log = logging.getLogger("keyledger.projections.receipts")

NAME = "receipts"
GONE_AFTER_S = 10.0
MAX_APPLIED = 1024  # applied positions taken from one (merged) receipt; the rest wait for the proven position
RETENTION_DAYS = 30
REVOKING = ("ApiKeyRevoked", "ApiKeyDisabled", "ApiKeyExpired", "ApiKeyRotated")

# A delivery batch's revocations in one statement; RETURNING leaves out those recorded before (redeliveries).
RECORD = """
INSERT INTO revocations (position, key_id, type, revoked_at)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[])
ON CONFLICT DO NOTHING RETURNING position
"""
# With no live cache a revocation is in effect everywhere as it is recorded: one statement, nothing to wait for.
RECORD_SETTLED = """
INSERT INTO revocations (position, key_id, type, revoked_at, effective_everywhere_at)
SELECT *, clock_timestamp() FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[])
ON CONFLICT DO NOTHING RETURNING key_id, position, effective_everywhere_at, 0
"""
# Caches heard of within the last GONE_AFTER_S seconds, and how long ago (seeds a new term's view of them).
LIVE_CACHES = """
SELECT cache_id, extract(epoch FROM clock_timestamp() - last_seen_at)::float8 FROM receipt_caches
WHERE last_seen_at > clock_timestamp() - %s * interval '1 second'
"""
ADD_RECEIPTS = """
INSERT INTO revocation_receipts (position, cache_id, effective_at)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[])
ON CONFLICT DO NOTHING
"""
# One statement for a batch of receipts (at most one per cache): note each cache, confirm its pending receipts up
# to its proven position and at its applied positions, say when; and the highest position confirmed.
RECEIVE = """
WITH r AS (
    SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(cache text, service text, position bigint, applied bigint[])
), seen AS (
    INSERT INTO receipt_caches AS c (cache_id, service, position, last_seen_at)
    SELECT cache, service, position, clock_timestamp() FROM r
    ON CONFLICT (cache_id) DO UPDATE SET service = excluded.service,
        position = greatest(c.position, excluded.position), last_seen_at = excluded.last_seen_at
    RETURNING cache_id, last_seen_at
), confirmed AS (
    UPDATE revocation_receipts rr SET effective_at = seen.last_seen_at
    FROM r JOIN seen ON seen.cache_id = r.cache
    WHERE rr.cache_id = r.cache AND rr.effective_at IS NULL
      AND (rr.position <= r.position OR rr.position = ANY(r.applied))
    RETURNING rr.position
)
SELECT seen.cache_id, seen.last_seen_at, (SELECT max(position) FROM confirmed) FROM seen
"""
# Complete every pending revocation (up to a position, or all) that no live cache still blocks. The moment is the
# last confirmation when every cache confirmed, else now (a pending cache was just declared gone).
COMPLETE = """
UPDATE revocations r
SET effective_everywhere_at = CASE WHEN x.pending = 0 THEN coalesce(x.last, clock_timestamp())
                                   ELSE clock_timestamp() END
FROM (SELECT rv.position,
             count(rr.cache_id) FILTER (WHERE rr.effective_at IS NULL) AS pending,
             count(rr.cache_id) FILTER (WHERE rr.effective_at IS NULL
                                        AND c.last_seen_at > clock_timestamp() - %(gone)s * interval '1 second')
                 AS blocking,
             max(rr.effective_at) AS last,
             count(rr.cache_id) AS caches
      FROM revocations rv
      LEFT JOIN revocation_receipts rr ON rr.position = rv.position
      LEFT JOIN receipt_caches c ON c.cache_id = rr.cache_id
      WHERE rv.effective_everywhere_at IS NULL AND (%(upto)s::bigint IS NULL OR rv.position <= %(upto)s)
      GROUP BY rv.position) x
WHERE r.position = x.position AND x.blocking = 0
RETURNING r.key_id, r.position, r.effective_everywhere_at, x.caches
"""
PRUNE = """
WITH gone AS (DELETE FROM revocations WHERE revoked_at < clock_timestamp() - %(days)s * interval '1 day')
DELETE FROM receipt_caches WHERE last_seen_at < clock_timestamp() - %(days)s * interval '1 day'
"""
# The read side (the revocation endpoint, `keyledger receipts`): a key's latest revocation-like event.
LATEST = """
SELECT position, type, revoked_at, effective_everywhere_at FROM revocations
WHERE key_id = %s ORDER BY position DESC LIMIT 1
"""
CACHES_OF = """
SELECT rr.cache_id, c.service, rr.effective_at, c.last_seen_at,
       c.last_seen_at <= clock_timestamp() - %s * interval '1 second'
FROM revocation_receipts rr LEFT JOIN receipt_caches c USING (cache_id)
WHERE rr.position = %s ORDER BY rr.cache_id
"""

_encoder = msgspec.json.Encoder()


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


async def read(conn: psycopg.AsyncConnection[Any], key_id: str) -> dict[str, Any] | None:
    """The receipt of a key's latest revocation-like event, or None if it has none."""
    row = await (await conn.execute(LATEST, (key_id,))).fetchone()
    if row is None:
        return None
    position, type_, revoked_at, everywhere = row
    caches = await (await conn.execute(CACHES_OF, (GONE_AFTER_S, position))).fetchall()
    return {
        "keyId": key_id, "position": position, "type": type_, "revokedAt": _iso(revoked_at),
        "effectiveEverywhereAt": _iso(everywhere),
        "caches": [{"cacheId": cache_id, "service": service or "", "effectiveAt": _iso(effective),
                    "lastSeenAt": _iso(seen),
                    "state": "confirmed" if effective else ("gone" if silent else "pending")}
                   for cache_id, service, effective, seen, silent in caches],
    }


class HeardCache:
    """One live cache as this projection heard it: when last (the event-loop clock, for liveness), and when (the
    database's clock) its recent receipts proved a position or named one in ``applied``, so that a revocation
    projected after the receipt that covered it (the usual order: an applied receipt outruns this projection's
    own copy of the event) is dated from that receipt. A lookup is a bisection and a dict get, not a scan: it
    runs for every (revocation, live cache) pair."""

    KEEP = 1024  # receipts remembered (the oldest go: a revocation that old is dated by a later receipt)

    def __init__(self, heard: float) -> None:
        self.heard = heard
        self._proven: list[int] = []  # strictly increasing proven positions ...
        self._proven_at: list[dt.datetime] = []  # ... and when each was first proven
        self._applied: dict[int, dt.datetime] = {}  # applied position -> when first named (insertion order)

    def add(self, position: int, applied: list[int], at: dt.datetime) -> None:
        if not self._proven or position > self._proven[-1]:
            self._proven.append(position)
            self._proven_at.append(at)
            if len(self._proven) > 2 * self.KEEP:
                del self._proven[:self.KEEP], self._proven_at[:self.KEEP]
        for p in applied:
            self._applied.setdefault(p, at)
        while len(self._applied) > self.KEEP:  # the oldest first: a dict keeps insertion order
            del self._applied[next(iter(self._applied))]

    def covered_at(self, position: int) -> dt.datetime | None:
        """When a receipt first covered ``position`` (proved it or named it), or None."""
        i = bisect.bisect_left(self._proven, position)
        times = (self._proven_at[i] if i < len(self._proven) else None, self._applied.get(position))
        return min((t for t in times if t is not None), default=None)


class ReceiptsProjection:
    name = NAME

    def __init__(self, database_url: str, bus: Bus, *, fence: Callable[[], None] = lambda: None,
                 epoch: int | None = None) -> None:
        self.database_url = database_url
        self.bus = bus
        self.fence = fence
        self.epoch = epoch
        self.received = 0
        self.completed = 0
        # The live caches, by id. Only this projection, in the fenced leader, writes receipt_caches, so after a
        # term's first read of the table this is its current state: asking the database for the live caches on
        # every revocation cost a round trip on the revoke path's machine.
        self._caches: dict[str, HeardCache] = {}
        self._lock = asyncio.Lock()  # one connection, shared by the three loops below
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def run(self) -> None:
        await run_forever(f"{self.name} projection", self._run)

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         **pg_keepalives(self.database_url)) as conn:
            self._conn = conn
            now = asyncio.get_running_loop().time()
            self._caches = {cache_id: HeardCache(now - age) for cache_id, age in
                            await (await conn.execute(LIVE_CACHES, (GONE_AFTER_S,))).fetchall()}
            await asyncio.gather(
                consume(self.bus, NAME, self._handle_events, ack_policy=AckPolicy.ALL, ack_wait=5, epoch=self.epoch),
                self._receive_forever(), self._sweep_forever())

    async def _handle_events(self, msgs: list[Any]) -> None:
        """Record a delivery batch's revocations in one transaction, then ack the batch.

        One commit per batch, not three per revocation: under a burst of revokes this projection's commits
        were a visible share of PostgreSQL's work on the revoke path's machine."""
        self.fence()
        rows = [row for row in map(_revocation, msgs) if row is not None]
        if rows:
            await self._record(rows)
        if msgs:
            await msgs[-1].ack()  # AckAll: the batch, once recorded

    def _live(self) -> list[str]:
        """The caches heard of within GONE_AFTER_S (forgetting the others: cache ids come and go)."""
        now = asyncio.get_running_loop().time()
        self._caches = {cache_id: c for cache_id, c in self._caches.items() if now - c.heard < GONE_AFTER_S}
        return list(self._caches)

    async def _record(self, rows: list[tuple[int, str, str, dt.datetime]]) -> None:
        columns = [list(column) for column in zip(*rows)]
        async with self._lock:
            assert self._conn is not None
            live = self._live()
            if not live:  # nobody to wait for (what a cache gone since still blocks, the sweeper completes)
                done = await (await self._conn.execute(RECORD_SETTLED, columns)).fetchall()
            else:
                done = await self._record_pending(columns, live)
        await self._announce(done)

    async def _record_pending(self, columns: list[list[Any]], live: list[str]) -> list[tuple[Any, ...]]:
        """Record revocations with one pending receipt per live cache, and complete what is confirmed already;
        the caller holds the lock."""
        assert self._conn is not None
        async with self._conn.transaction():
            recorded = [r[0] for r in await (await self._conn.execute(RECORD, columns)).fetchall()]
            if not recorded:
                return []  # all recorded before (a redelivery)
            pairs = [(p, c) for p in recorded for c in live]
            # A cache whose receipt raced ahead of the event confirmed it already: date it from that receipt.
            effective = [self._caches[c].covered_at(p) for p, c in pairs]
            await self._conn.execute(ADD_RECEIPTS, ([p for p, _ in pairs], [c for _, c in pairs], effective))
            return await self._completed_in(max(recorded))

    async def _receive_forever(self) -> None:
        await self.bus.ready()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

        async def arrived(msg: Any) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(msg.data)

        sub = await self.bus.nc.subscribe(self.bus.topology.receipts_subject, cb=arrived)  # type: ignore[union-attr]
        try:
            while True:
                # Take all that arrived, one receipt per cache: its newest position (a cache's proven position
                # only moves forward) and every applied position; the batch costs one commit.
                merged: dict[str, Receipt] = {}
                for payload in [await queue.get(), *_drain(queue)]:
                    try:
                        receipt = decode_receipt(payload)
                    except msgspec.DecodeError:
                        continue
                    self.received += 1
                    _merge(merged, receipt)
                if merged:
                    await self._receive(list(merged.values()))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _receive(self, receipts: list[Receipt]) -> None:
        """Record a batch of receipts (one per cache) in one statement, then complete what they confirmed.

        Its commit need not wait for the disk (``synchronous_commit = off``): a confirmation lost in a database
        crash comes back with the cache's next heartbeat, which covers every position its checkpoints proved
        (dated later, never wrongly earlier)."""
        self.fence()
        rows = {r.cache_id: {"cache": r.cache_id, "service": r.service, "position": r.position, "applied": r.applied}
                for r in receipts}
        done: list[tuple[Any, ...]] = []
        async with self._lock:
            assert self._conn is not None
            async with self._conn.transaction():
                await self._conn.execute("SET LOCAL synchronous_commit = off")
                payload = _encoder.encode(list(rows.values())).decode()
                seen = await (await self._conn.execute(RECEIVE, (payload,))).fetchall()
                now = asyncio.get_running_loop().time()
                for cache_id, at, _ in seen:
                    cache = self._caches.get(cache_id)
                    if cache is None:
                        cache = self._caches[cache_id] = HeardCache(now)
                    cache.heard = now
                    cache.add(rows[cache_id]["position"], rows[cache_id]["applied"], at)
                confirmed_upto = seen[0][2] if seen else None
                if confirmed_upto is not None:
                    done = await self._completed_in(confirmed_upto)
        await self._announce(done)

    async def _sweep_forever(self) -> None:
        """Once a second: complete what caches that went silent no longer block; prune old rows hourly."""
        pruned_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self.fence()
            await self._complete(None)
            if loop.time() - pruned_at > 3600:
                pruned_at = loop.time()
                async with self._lock:
                    assert self._conn is not None
                    await self._conn.execute(PRUNE, {"days": RETENTION_DAYS})

    async def _complete(self, upto: int | None) -> None:
        async with self._lock:
            done = await self._completed_in(upto)
        await self._announce(done)

    async def _completed_in(self, upto: int | None) -> list[tuple[Any, ...]]:
        """Complete what no live cache blocks (up to ``upto``, or all); the caller holds the lock."""
        assert self._conn is not None
        return await (await self._conn.execute(COMPLETE, {"gone": GONE_AFTER_S, "upto": upto})).fetchall()

    async def _announce(self, done: list[tuple[Any, ...]]) -> None:
        """Say on NATS which revocations just took effect everywhere (after their commit)."""
        for key_id, position, everywhere, caches in done:
            self.completed += 1
            message = {"keyId": key_id, "position": position, "effectiveEverywhereAt": _iso(everywhere),
                       "caches": caches}
            with contextlib.suppress(Exception):
                await self.bus.nc.publish(self.bus.topology.effective_subject, _encoder.encode(message))  # type: ignore[union-attr]


def _revocation(msg: Any) -> tuple[int, str, str, dt.datetime] | None:
    """(position, key id, type, recorded at) of a revocation-like event, else None."""
    try:
        recorded = decode_envelope(msg.data)
    except Exception:
        return None  # a reduced or unknown envelope: not a revocation we can date (the log still has it)
    if recorded.type not in REVOKING:
        return None
    if recorded.type == "ApiKeyRotated" and getattr(recorded.event, "grace_until", None) is not None:
        return None  # the old secret keeps working for a while: not a revocation yet
    return recorded.position, recorded.stream_id, recorded.type, recorded.recorded_at


def _merge(merged: dict[str, Receipt], receipt: Receipt) -> None:
    """Fold ``receipt`` into ``merged`` (by cache id as stored, 200 characters): the newest proven position and
    every applied position (at most MAX_APPLIED)."""
    cache_id = receipt.cache_id[:200]
    earlier = merged.get(cache_id)
    position, applied = receipt.position, receipt.applied
    if earlier is not None:
        position, applied = max(earlier.position, position), [*earlier.applied, *applied]
    merged[cache_id] = msgspec.structs.replace(receipt, cache_id=cache_id, service=receipt.service[:200],
                                               position=position, applied=applied[:MAX_APPLIED])


def _drain(queue: asyncio.Queue[bytes]) -> list[bytes]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
