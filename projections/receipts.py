"""Revocation receipts: when did a revocation take effect in every cache that holds keys?

Each ``KeyCache`` reports on ``<prefix>.cache.receipts`` (positions only: no key ids, no hashes):

* at once after it applied invalidations, their positions (``applied``): each such revocation is in effect in
  that cache (the key evicted, and a verify in flight cannot put it back), no checkpoint awaited; within the
  cache's budget (8 at once, then 4 a second: in a storm, one receipt every 0.25 s names all applied since);
* every second, as a heartbeat, the log position through which it has applied every invalidation (proven by
  the freshness checkpoints, freshness.py): this keeps a cache live while nothing is revoked, and confirms
  whatever an applied receipt left out (a lost message, a cache that predates ``applied``).

This projection (in the background leader) keeps three tables (schema.sql):

* ``receipt_caches``: every cache heard of, its confirmed position and when it was last heard (a cache silent
  for ``GONE_AFTER_S`` is *gone*: listed, but it no longer blocks "everywhere");
* ``revocations`` and ``revocation_batches``: each revocation-like event (revoked, disabled, expired, rotated
  without grace), from the event stream (the batches of the active-keys subscriber's durable consumer, which acks
  none before ``record`` took it in: subscriber.py), with every cache that was live when it was projected -> the
  moment keyledger received the first receipt covering its position (naming it in ``applied``, or proving every
  position up to it), or null. Those in effect everywhere when first written (nearly all) share one row of
  ``revocation_batches`` per write (and set of caches); a slow cache's are written pending, a row each in
  ``revocations``, and updated as confirmations come. The view ``receipts`` shows both, a row per revocation.
  (Below, a revocation's "row" is its entry, in either table.)

The bookkeeping lives in memory, and each revocation is written once, as a rule: when the last live cache
confirmed it (or the last pending one was declared gone), with when it took effect everywhere, then
``<prefix>.revocation.effective`` announces it. One still pending after ``WRITE_AFTER_S`` (a hung cache) is written
by the sweeper, pending, and its later confirmations once a second. (Written when projected and again once
confirmed, a revocation cost PostgreSQL two row versions and their WAL while caches were live; a row per
(revocation, cache), inserted then updated, cost it more than the revocation itself; a row per revocation, more
than a batch's row with arrays: docs/benchmarks.md.) A batch row has no key that a second write of the same
revocation would conflict on, so the projection keeps what it settled above the cursor (a redelivered event of it
is not taken in again), and the read takes the first row that holds a position.

What is held but not written yet would be lost with this process (its events are acked), so the log is the
backstop: ``receipts_written`` keeps a position at or below which every revocation-like event has its row (or needs
none: no cache was live), and a new leadership term (or a reconnection) takes those above it that have none from
the events table, pending on the caches live then (those heard of before it), beside the pending rows. The sweeper
moves that cursor to the newest freshness checkpoint this process forwarded (``forwarded``: the active-keys
consumer's acks cover every event up to its position, so each passed ``record``), but never to or past a revocation
held unwritten: the gap problem cannot bite, as the checkpoint's position is a safe horizon and what is unwritten
holds the cursor below it. Every write commits without waiting for the disk (NO_WAIT): WAL is flushed in order, so
a cursor that survived a database crash proves the rows written before it survived too; a row lost with it is taken
from the log again, and a confirmation lost comes back with the cache's next heartbeat, dated later, never wrongly
earlier.

A revocation projected while no cache was live gets no row at all: it took effect everywhere at its commit (no
cache held the key; verify reads the database), and that is what is announced. The read side (``read``) answers
from the log for a revocation that has no row: pending on the caches live now (and heard of before it) while it
is above the cursor and some are (the milliseconds after the delete's 200, or up to ``WRITE_AFTER_S`` while a
cache is slow), else in effect everywhere at its commit, listing no cache.

Every time is the database's clock (``clock_timestamp()``), so no host's clock skews a receipt: read by a statement
at most once a second (when caches are noted) and carried forward on this process's monotonic clock (``DbClock``),
so that most batches of receipts are dated without a round trip, never earlier than they arrived. A receipt can
arrive before the revocation's event is projected (it raced through the invalidation path): the projection remembers
each cache's recent receipts (``HeardCache``) and dates such a cache's confirmation from the first one that covered
the position. The revoke path does none of this work (what it costs a machine that runs both: docs/benchmarks.md).

Storage: an entry per revocation-like event projected while caches were live (its position and when it took
effect everywhere) and per such event and cache (a timestamp), kept ``RETENTION_DAYS`` (30) days; ``receipt_caches``
rows of caches silent for that long go too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg

from .. import tasks
from ..background.bus import Bus
from ..core.events import EnvelopeHead, decode_envelope
from ..core.freshness import Receipt, decode_receipt
from ..storage.connections import long_lived
from .consumer import run_forever

log = logging.getLogger("keyledger.projections.receipts")

NAME = "receipts"
GONE_AFTER_S = 10.0
MAX_APPLIED = 1024  # applied positions taken from one (merged) receipt; the rest wait for the proven position
RETENTION_DAYS = 30
# How long ``record`` waits for a term's load (or a reconnection) before failing the batch: less than the
# subscriber consumer's ack_wait (5 s), so that NATS does not deliver the batch again while it is still held.
LOAD_WAIT_S = 4.0
REVOKING = ("ApiKeyRevoked", "ApiKeyDisabled", "ApiKeyExpired", "ApiKeyRotated")

# A revocation's row is written once it took effect everywhere, or once it waited WRITE_AFTER_S (then again as its
# confirmations come, once a second).
WRITE_AFTER_S = 1.0
# The receipts' writes need not wait for the disk (module docstring: the cursor, written after, vouches for them;
# waiting cost a revocation's "everywhere" a disk flush: p99 10.4-15.3 ms against 10). NO_WAIT, true for every
# row, sets synchronous_commit off for the statement's own implicit transaction (set_config(..., true) lasts until
# its commit, which reads it): one autocommitted statement each, where BEGIN, SET LOCAL and COMMIT were three more
# round trips per batch.
NO_WAIT = "set_config('synchronous_commit', 'off', true) = 'off'"
# Revocations' rows, new or pending, in one statement: each with its caches (id -> confirmed at, or null) and, when
# none is left to wait for, the moment it took effect everywhere (its last confirmation; now, when a cache that
# never confirmed was declared gone). A row completed before (by an earlier term: a redelivered
# event) is left alone and not returned. Each row is found by a primary-key probe (ON CONFLICT), never through
# the partial index of pending revocations (whose bitmap scans once visited every entry it ever held, dead ones
# included until a vacuum, so each save cost more than the one before), nor by joining the batch to a sequential
# scan of a table never analyzed (the rows read per revoke once grew from 84 to 568 within a bench run).
WRITE = """
INSERT INTO revocations AS r (position, key_id, type, revoked_at, caches, effective_everywhere_at)
SELECT x.position, x.key_id, x.type, x.revoked_at, x.caches,
       CASE WHEN x.done THEN coalesce(x.everywhere, clock_timestamp()) END
FROM jsonb_to_recordset(%s::jsonb) AS x(position bigint, key_id text, type text, revoked_at timestamptz,
                                        caches jsonb, done boolean, everywhere timestamptz)
WHERE {NO_WAIT}
ON CONFLICT (position) DO UPDATE
    SET caches = excluded.caches, effective_everywhere_at = excluded.effective_everywhere_at
WHERE r.effective_everywhere_at IS NULL
RETURNING r.position, r.effective_everywhere_at
""".format(NO_WAIT=NO_WAIT)
# Revocations every cache confirmed by their first write (nearly all, under load): one row for all of them that had
# the same caches live, where WRITE costs PostgreSQL a row, its index entry and its conflict check each (~700 bytes
# of WAL a revocation against ~20: docs/benchmarks.md). The times go as integers, and the arrays of integers as
# text made by msgspec (``_array``): psycopg dumps a list element by element in Python, which cost more than the
# rows saved (the caches' ids, a few, are left to psycopg: any text may be one).
BATCH = """
INSERT INTO revocation_batches (span, positions, caches, effective_us)
SELECT int8range(%s, %s, '[]'), %s::bigint[], %s::text[], %s::bigint[] WHERE {NO_WAIT}
""".format(NO_WAIT=NO_WAIT)
# Every revocation-like event at or below it has its row, or needs none (the module docstring); moved by the sweeper.
CURSOR = "SELECT position FROM receipts_written"
ADVANCE = "UPDATE receipts_written SET position = %s WHERE {NO_WAIT}".format(NO_WAIT=NO_WAIT)
# What a new term takes over: the revocations not yet in effect everywhere (a partial index holds just those) ...
PENDING = ("SELECT position, key_id, type, revoked_at, caches FROM revocations"
           " WHERE effective_everywhere_at IS NULL")
# A revocation-like event, as a condition on an events row (a rotation is one only without grace: ``_revocation``).
REVOCATION_LIKE = "type = ANY(%(types)s) AND (type <> 'ApiKeyRotated' OR data->>'graceUntil' IS NULL)"
# ... those above the cursor already in effect everywhere (a redelivered event of one is not taken in again) ...
SETTLED = """
SELECT p FROM revocation_batches, unnest(positions) AS p
WHERE span && int8range(%(after)s, NULL, '()') AND p > %(after)s
UNION ALL
SELECT position FROM revocations WHERE position > %(after)s AND effective_everywhere_at IS NOT NULL
"""
# ... and the revocation-like events above the cursor that have no row in revocations (held unwritten by the term
# before, once those SETTLED lists are left out).
# A range of the events' primary key.
REVOKING_EVENTS = f"""
SELECT position, stream_id, type, recorded_at FROM events e
WHERE position > %(after)s AND {REVOCATION_LIKE}
  AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.position = e.position)
ORDER BY position
"""
# Caches heard of within the last GONE_AFTER_S seconds, how long ago, and since when (seeds a new term's view).
LIVE_CACHES = """
SELECT cache_id, extract(epoch FROM clock_timestamp() - last_seen_at)::float8, first_seen_at FROM receipt_caches
WHERE last_seen_at > clock_timestamp() - %s * interval '1 second'
"""
# One statement for a batch of receipts (at most one per cache) with caches to note: those not noted for
# NOTE_EVERY_S (their proven position, and when last heard: the receipt's ``lastSeenAt``, and who is live for a new
# term) or never; it reads the database's clock too (``DbClock``). Liveness within a term is kept in memory, so a
# busy cache's row need not be rewritten with every burst of receipts, and a batch that notes nobody (most, under
# load) costs no statement at all: it is dated from the clock read last. NO_WAIT: see above.
NOTE_EVERY_S = 1.0
RECEIVE = """
WITH noted AS (
    INSERT INTO receipt_caches AS c (cache_id, service, position, last_seen_at, first_seen_at)
    SELECT cache, service, position, clock_timestamp(), clock_timestamp()
    FROM jsonb_to_recordset(%s::jsonb) AS r(cache text, service text, position bigint)
    WHERE {NO_WAIT}
    ON CONFLICT (cache_id) DO UPDATE SET service = excluded.service,
        position = greatest(c.position, excluded.position), last_seen_at = excluded.last_seen_at
)
SELECT clock_timestamp()
""".format(NO_WAIT=NO_WAIT)
PRUNE = """
WITH gone AS (DELETE FROM revocations WHERE revoked_at < clock_timestamp() - %(days)s * interval '1 day'),
     old AS (DELETE FROM revocation_batches WHERE written_at < clock_timestamp() - %(days)s * interval '1 day')
DELETE FROM receipt_caches WHERE last_seen_at < clock_timestamp() - %(days)s * interval '1 day'
"""
# The read side (the revocation endpoint, `keyledger receipts`): a key's latest revocation-like event, where it is
# written (its row in revocations, or the first row of revocation_batches that holds it, and its place in that row's
# arrays: the span's GiST index, then the array; first by written_at, which has no index, as ordering by id let the
# planner walk the primary key through every row), and whether it is above the cursor (not written yet: pending, if
# caches are live). Found through the key's events (their (stream_id, version) index; a key has a handful), then by
# position: an index on revocations (key_id) would cost every revocation one more index insert for this rare read.
# One older than RETENTION_DAYS without a row is left out: its row, if it had one, was pruned.
LATEST = f"""
WITH mine AS MATERIALIZED (
    SELECT position, type, recorded_at FROM events WHERE stream_id = %(key)s AND {REVOCATION_LIKE})
SELECT m.position, m.type, m.recorded_at, coalesce(r.effective_everywhere_at, keyledger_at_micros(b.last)),
       r.position IS NOT NULL, b.id, b.i, m.position > (SELECT position FROM receipts_written)
FROM mine m LEFT JOIN revocations r ON r.position = m.position
LEFT JOIN LATERAL (SELECT id, i, (SELECT max(us) FROM unnest(effective_us[i:i]) AS us) AS last
                   FROM revocation_batches, array_position(positions, m.position) AS i
                   WHERE span @> m.position AND i IS NOT NULL ORDER BY written_at, id LIMIT 1) b ON true
WHERE r.position IS NOT NULL OR b.id IS NOT NULL OR m.recorded_at > clock_timestamp() - %(days)s * interval '1 day'
ORDER BY m.position DESC LIMIT 1
"""
# Its caches: those of its row (in either table), or (no row yet) those live now that were heard of before it.
SILENT = "c.last_seen_at IS NULL OR c.last_seen_at <= clock_timestamp() - %(gone)s * interval '1 second'"
CACHES_OF = f"""
SELECT e.key, c.service, (e.value #>> '{{}}')::timestamptz, c.last_seen_at, {SILENT}
FROM revocations r CROSS JOIN jsonb_each(r.caches) e LEFT JOIN receipt_caches c ON c.cache_id = e.key
WHERE r.position = %(position)s ORDER BY e.key
"""
CACHES_OF_BATCH = f"""
SELECT x.cache_id, c.service, keyledger_at_micros(b.effective_us[%(index)s][x.n]), c.last_seen_at, {SILENT}
FROM revocation_batches b CROSS JOIN unnest(b.caches) WITH ORDINALITY AS x(cache_id, n)
LEFT JOIN receipt_caches c ON c.cache_id = x.cache_id
WHERE b.id = %(batch)s ORDER BY x.cache_id
"""
CACHES_NOW = """
SELECT cache_id, service, NULL::timestamptz, last_seen_at, false FROM receipt_caches
WHERE last_seen_at > clock_timestamp() - %s * interval '1 second' AND coalesce(first_seen_at <= %s, true)
ORDER BY cache_id
"""

_encoder = msgspec.json.Encoder()
_EPOCH, _MICROSECOND = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), dt.timedelta(microseconds=1)
_JSON_TO_ARRAY = bytes.maketrans(b"[]", b"{}")


def _array(values: list[Any]) -> str:
    """A PostgreSQL array literal of integers (nested lists: more dimensions), the JSON array's brackets turned to
    braces: msgspec writes it in one call, where psycopg dumps each element in Python."""
    return _encoder.encode(values).translate(_JSON_TO_ARRAY).decode()


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


async def read(conn: psycopg.AsyncConnection[Any], key_id: str) -> dict[str, Any] | None:
    """The receipt of a key's latest revocation-like event, or None if it has none.

    A cache's state: ``confirmed`` once a receipt covered the position; otherwise ``gone`` if the revocation
    completed without it (it was declared gone) or it is silent now, else ``pending``. A revocation without a row
    is pending on the caches live now while the projection may still hold it (above the cursor); with none live,
    or below the cursor, no cache was live when it was projected: in effect everywhere at its commit."""
    row = await (await conn.execute(LATEST, {"key": key_id, "types": list(REVOKING),
                                             "days": RETENTION_DAYS})).fetchone()
    if row is None:
        return None
    position, type_, revoked_at, everywhere, written, batch, index, unsettled = row
    if written or batch is not None:  # (index: its place in the batch row's arrays)
        caches = await (await conn.execute(CACHES_OF if written else CACHES_OF_BATCH,
                                           {"gone": GONE_AFTER_S, "position": position, "batch": batch,
                                            "index": index})).fetchall()
    else:
        caches = await (await conn.execute(CACHES_NOW, (GONE_AFTER_S, revoked_at))).fetchall() if unsettled else []
        everywhere = None if caches else revoked_at
    return {
        "keyId": key_id, "position": position, "type": type_, "revokedAt": _iso(revoked_at),
        "effectiveEverywhereAt": _iso(everywhere),
        "caches": [{"cacheId": cache_id, "service": service or "", "effectiveAt": _iso(effective),
                    "lastSeenAt": _iso(seen),
                    "state": "confirmed" if effective else ("gone" if everywhere or silent else "pending")}
                   for cache_id, service, effective, seen, silent in caches],
    }


class DbClock:
    """The database's clock as last read (RECEIVE), carried forward on this process's monotonic clock. The reading
    is pinned to the moment its statement was sent: the database read its clock then or later, so a time derived
    from it is never earlier than the database's clock at the same instant (later by at most that round trip), but
    for the two clocks' drift over NOTE_EVERY_S (none on one host; NTP's 500 ppm at most is 0.5 ms). Never older
    than that when used: a batch in which no cache is due holds only caches noted, so the clock read, within it
    (and a term starts with every cache due).

    ``time.monotonic``, not the event loop's ``time()``: under uvloop (the service's loop) that counts whole
    milliseconds, so every date was a whole number of milliseconds after the reading (effectiveAt to the ms, and
    up to a millisecond early)."""

    now = staticmethod(time.monotonic)

    def __init__(self) -> None:
        self._sent = float("-inf")  # ``now()`` when the reading's statement was sent
        self._read = dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    def set(self, sent: float, read: dt.datetime) -> None:
        self._sent, self._read = sent, read

    def at(self, now: float) -> dt.datetime:
        """The database's clock at ``now``, a reading of ``now()``."""
        return self._read + dt.timedelta(seconds=now - self._sent)


class HeardCache:
    """One live cache as this projection heard it: when last (the monotonic clock, for liveness), and when (the
    database's clock) its recent receipts proved a position or named one not held, so that a revocation projected
    after the receipt that covered it (a redelivered event, or a cache faster than this projection) is dated from
    that receipt. Usually the event comes first (``record`` runs beside the invalidation's publication): under a
    revoke load with ten caches, every one of 13,179 revocations was held before a receipt named it. So a position
    named while held confirms it and is not remembered, and ``reach`` lets a batch skip every cache that cannot
    have covered it (a lookup is a bisection and a dict get).

    A receipt proving position P confirms the pending revocations above the position it proved before, up to P,
    that wait for it (``prove`` returns that position; the projection keeps its pending positions in order). Each
    pending revocation that waits for a cache is above that cache's proven position: ``record`` dates those at or
    below it from its receipts. (A heap per cache of the positions waiting for it cost each revocation a push and a
    pop per cache, most popped long after an applied receipt had confirmed it; with it gone, the receipts cost the
    service 9.7-10.3 us a revocation where they cost 10.9-12.4: docs/benchmarks.md.)"""

    KEEP = 1024  # receipts remembered (the oldest go: a revocation that old is dated by a later receipt)

    def __init__(self, heard: float) -> None:
        self.heard = heard
        self.noted = float("-inf")  # when its row in receipt_caches was last written (the monotonic clock)
        self.reach = 0  # the highest position its receipts covered (proven, or named while not held)
        self._proven: list[int] = []  # strictly increasing proven positions ...
        self._proven_at: list[dt.datetime] = []  # ... and when each was first proven
        self._applied: OrderedDict[int, dt.datetime] = OrderedDict()  # applied position -> when first named

    def live(self, now: float) -> bool:
        """Heard within GONE_AFTER_S (else it is gone: it no longer blocks "everywhere")."""
        return now - self.heard < GONE_AFTER_S

    def named(self, position: int, at: dt.datetime) -> None:
        """A receipt named ``position`` in ``applied`` at ``at`` (kept only for a revocation not projected yet)."""
        self._applied.setdefault(position, at)
        self.reach = max(self.reach, position)
        if len(self._applied) > self.KEEP:  # the oldest goes (O(1): a plain dict's first item is not)
            self._applied.popitem(last=False)

    def prove(self, position: int, at: dt.datetime) -> int:
        """A receipt proved every position up to ``position`` at ``at``. Returns the position proven before (0 if
        none): what waits for this cache above it, up to ``position``, is confirmed now."""
        before = self._proven[-1] if self._proven else 0
        if position > before:
            self._proven.append(position)
            self._proven_at.append(at)
            self.reach = max(self.reach, position)
            if len(self._proven) > 2 * self.KEEP:
                del self._proven[:self.KEEP], self._proven_at[:self.KEEP]
        return before

    def covered_at(self, position: int) -> dt.datetime | None:
        """When a receipt first covered ``position`` (proved it or named it), or None."""
        applied = self._applied.get(position)
        if not self._proven or position > self._proven[-1]:
            return applied  # named, not proven by a checkpoint yet
        proven = self._proven_at[bisect.bisect_left(self._proven, position)]
        return proven if applied is None or proven < applied else applied


class Pending:
    """A revocation's confirmations by the caches that were live when it was projected; held in memory until
    none of them is left to wait for (each confirmed it, or was declared gone)."""

    __slots__ = ("key_id", "type", "revoked_at", "caches", "waiting", "last", "since", "written", "dirty")

    def __init__(self, key_id: str, type_: str, revoked_at: dt.datetime, caches: dict[str, dt.datetime | None],
                 *, since: float, written: bool = False) -> None:
        self.key_id = key_id
        self.type = type_
        self.revoked_at = revoked_at
        self.caches = caches  # every cache live at projection -> when a receipt covered the position, or None
        confirmed = [at for at in caches.values() if at is not None]
        # Neither confirmed nor declared gone (usually all of them: ``set`` copies the keys at C speed).
        self.waiting = {c for c, at in caches.items() if at is None} if confirmed else set(caches)
        self.last = max(confirmed, default=None)  # the latest confirmation
        self.since = since  # when it was projected (the monotonic clock)
        self.written = written  # its row exists
        self.dirty = not written  # its row, or confirmations in it, not written yet

    def confirm(self, cache_id: str, at: dt.datetime) -> bool:
        """``cache_id`` covered it at ``at``: True if it was waiting for that cache."""
        if cache_id not in self.waiting:
            return False
        self.waiting.discard(cache_id)
        self.caches[cache_id] = at
        if self.last is None or at > self.last:
            self.last = at
        self.dirty = True
        return True

    def announcement(self, position: int, everywhere: dt.datetime) -> tuple[str, int, dt.datetime, int]:
        """What ``_announce`` says of it once it took effect everywhere."""
        return self.key_id, position, everywhere, len(self.caches)

    def everywhere(self) -> dt.datetime | None:
        """The last confirmation if every cache confirmed, else None (once done: a cache was declared gone, and
        the write dates it with the database's clock)."""
        return self.last if None not in self.caches.values() else None

    def row(self, position: int) -> dict[str, Any]:
        """Its WRITE row: done once nothing is waiting."""
        return {"position": position, "key_id": self.key_id, "type": self.type, "revoked_at": self.revoked_at,
                "caches": self.caches, "done": not self.waiting, "everywhere": self.everywhere()}


class ReceiptsProjection:
    name = NAME

    def __init__(self, database_url: str, bus: Bus, *, fence: Callable[[], None] = lambda: None) -> None:
        self.database_url = database_url
        self.bus = bus
        self.fence = fence
        self.received = 0
        self.completed = 0
        # The live caches, by id, and the revocations they have yet to confirm, by position. Only this
        # projection, in the fenced leader, writes these tables, so after a term's first read they are the
        # tables' current state: asking the database on every revocation cost a round trip on the revoke
        # path's machine, and a row per (revocation, cache) cost PostgreSQL more than the revocation itself.
        self._caches: dict[str, HeardCache] = {}
        self._pending: dict[int, Pending] = {}
        self._order: list[int] = []  # the positions held, ascending (and some settled since: ``_hold``)
        self._lock = asyncio.Lock()  # one connection, shared by ``record`` and the two loops, and the memory above
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._loaded = asyncio.Event()  # the memory above is the tables' state, and ``_conn`` is open
        self._clock = DbClock()
        self._written_through = 0  # the cursor as last written (receipts_written)
        # Positions above the cursor whose revocations left memory in effect everywhere (written, or no cache was
        # live): a redelivered event of one is not taken in again (nor one at or below the cursor: all settled).
        # revocation_batches has no per-position key that a second write would conflict on. A second or so of
        # revocations: the cursor follows the forwarded checkpoints, held back only by what is held unwritten.
        self._settled: set[int] = set()
        self._forwarded = 0  # the newest freshness checkpoint's position this process forwarded

    async def run(self) -> None:
        await run_forever(f"{self.name} projection", self._run)

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         **long_lived(self.database_url, name="receipts")) as conn:
            self._conn = conn
            async with self._lock:
                await self._load(conn)
            # If one loop fails, the other stops too before the retry starts both again on a new connection
            # (a bare gather would leave it running beside its replacement). The clean-up ends on its own.
            loops = [asyncio.ensure_future(c) for c in (self._receive_forever(), self._sweep_forever())]
            self._loaded.set()
            try:
                await asyncio.gather(*loops)
            finally:
                self._loaded.clear()
                await tasks.stop(loops)

    async def _load(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A term's start (or a reconnection's): the live caches, the pending revocations, and those in the log
        above the cursor that have no row (held unwritten when the term before ended), pending on the caches
        live now."""
        now = time.monotonic()
        self._clock = DbClock()  # (read again on this connection, every cache due: it may be another server's)
        live = await (await conn.execute(LIVE_CACHES, (GONE_AFTER_S,))).fetchall()
        self._caches = {cache_id: HeardCache(now - age) for cache_id, age, _ in live}
        self._pending, self._order = {}, []
        for position, key_id, type_, revoked_at, caches in sorted(await (await conn.execute(PENDING)).fetchall()):
            confirmed = {c: None if at is None else dt.datetime.fromisoformat(at) for c, at in caches.items()}
            self._hold(position, Pending(key_id, type_, revoked_at, confirmed, since=now, written=True))
        (self._written_through,) = await (await conn.execute(CURSOR)).fetchone()
        self._forwarded = max(self._forwarded, self._written_through)
        after = {"after": self._written_through, "types": list(REVOKING)}
        self._settled = {p for (p,) in await (await conn.execute(SETTLED, after)).fetchall()}
        unwritten = await (await conn.execute(REVOKING_EVENTS, after)).fetchall()
        for position, key_id, type_, revoked_at in unwritten:  # (a cache heard of only after it is not waited for)
            if position in self._settled:
                continue
            caches = dict.fromkeys(c for c, _, first_seen in live if first_seen is None or first_seen <= revoked_at)
            self._hold(position, Pending(key_id, type_, revoked_at, caches, since=now))

    def gauges(self) -> tuple[int, int, float]:
        """For /metrics: the caches live now, the revocations still waiting for a live cache's receipt, and how
        long the oldest of those has waited (seconds since this process took it in; 0 when none waits)."""
        now = time.monotonic()
        live = sum(1 for cache in self._caches.values() if cache.live(now))
        waiting = [pending.since for pending in self._pending.values() if pending.waiting]
        return live, len(waiting), now - min(waiting) if waiting else 0.0

    def forwarded(self, position: int) -> None:
        """A freshness checkpoint was forwarded (the invalidation projection calls this): every event up to
        ``position`` passed ``record``, in this term or an earlier one."""
        self._forwarded = max(self._forwarded, position)

    def _hold(self, position: int, pending: Pending) -> None:
        """Keep ``pending`` until its caches confirm (a cache it waits for that is no longer live counts as gone:
        the next sweep completes what that frees), its position in ``_order``."""
        self._pending[position] = pending
        pending.waiting.intersection_update(self._caches)
        order = self._order
        if order and position < order[-1]:
            bisect.insort(order, position)  # (rare: positions come ascending, but for a redelivery or a term's load)
        else:
            order.append(position)
        if len(order) > 2 * len(self._pending) + 64:  # settled positions are dropped here, in O(1) amortized
            self._order = [p for p in order if p in self._pending]

    def _confirm_proven(self, cache_id: str, since: int, position: int, at: dt.datetime,
                        touched: dict[int, Pending]) -> None:
        """``cache_id`` proved every position up to ``position`` at ``at``, and ``since`` before: confirm what
        waits for it in between (mostly settled already, by its applied receipts: a dict miss each)."""
        order, pending_at = self._order, self._pending.get
        for i in range(bisect.bisect_right(order, since), bisect.bisect_right(order, position)):
            pending = pending_at(order[i])
            if pending is not None and pending.confirm(cache_id, at):
                touched[order[i]] = pending

    async def record(self, msgs: list[Any], heads: list[EnvelopeHead]) -> None:
        """Take in a delivery batch's revocations; the active-keys subscriber calls it with each batch of its
        consumer and acks the batch only after it returned (subscriber.py). Raises if this projection cannot
        take them now (not loaded): the batch is delivered again."""
        self.fence()
        revocations = [row for row in map(_revocation, msgs, heads) if row is not None]
        if revocations:
            # At a term's start (or a reconnection) the first batch can come before the pending revocations
            # were loaded; it waits for them rather than fail into a redelivery seconds later.
            if not self._loaded.is_set():  # (wait_for's task costs more than the rest of a batch)
                await asyncio.wait_for(self._loaded.wait(), LOAD_WAIT_S)
            await self._record(revocations)

    async def _record(self, revocations: list[tuple[int, str, str, dt.datetime]]) -> None:
        """Hold each new revocation for the caches live now. Those already in effect everywhere (every live
        cache's receipt outran the event) are written at once, those no cache was live for never; the others once
        confirmed (``_receive``) or by the sweeper: nothing is written for them here."""
        async with self._lock:
            now = time.monotonic()
            live = [c for c, h in self._caches.items() if h.live(now)]
            # Caches whose receipts already covered a position this high: one raced ahead of the event (a
            # redelivery, or a cache faster than this projection): date it from that receipt. Usually none:
            # no checkpoint proves an event before its batch is acked, and the receipts naming it come after.
            lowest = min(position for position, *_ in revocations)
            ahead = [c for c in live if self._caches[c].reach >= lowest]
            fresh = {}
            for position, key_id, type_, revoked_at in revocations:
                if (position in self._pending or position in fresh or position in self._settled
                        or position <= self._written_through):
                    continue  # a redelivery of one already waiting or settled (or twice in this batch)
                caches = dict.fromkeys(live)
                for c in ahead:
                    caches[c] = self._caches[c].covered_at(position)
                fresh[position] = pending = Pending(key_id, type_, revoked_at, caches, since=now)
                self._hold(position, pending)
            done = await self._save({p: pending for p, pending in fresh.items() if not pending.waiting})
        await self._announce(done)

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
        """Date a batch of receipts (one per cache), noting the caches due (RECEIVE), confirm the pending
        revocations they cover, and write those that no longer wait for anyone (WRITE). At most two statements
        (under load, mostly the write alone), whose commits do not wait for the disk (NO_WAIT): a confirmation lost
        in a database crash comes back with the cache's next heartbeat, which covers every position its checkpoints
        proved (dated later, never wrongly earlier). If the second fails, memory is ahead of the tables: the
        projection's retry reloads it from them (``_load``)."""
        self.fence()
        async with self._lock:
            assert self._conn is not None
            now = self._clock.now()  # (for liveness too: one clock, the monotonic one, in this projection)
            due = [r for r in receipts if r.cache_id not in self._caches
                   or now - self._caches[r.cache_id].noted >= NOTE_EVERY_S]
            if due:  # (else the clock was read less than NOTE_EVERY_S ago: ``DbClock``)
                rows = [{"cache": r.cache_id, "service": r.service, "position": r.position} for r in due]
                sent = self._clock.now()
                (read,) = await (await self._conn.execute(RECEIVE, (_encoder.encode(rows).decode(),))).fetchone()
                self._clock.set(sent, read)
            at = self._clock.at(now)
            touched: dict[int, Pending] = {}
            for receipt in receipts:
                cache_id = receipt.cache_id
                cache = self._caches.get(cache_id)
                if cache is None:
                    cache = self._caches[cache_id] = HeardCache(now)
                cache.heard = now
                # Each position it names confirms the revocation held for it; one not held (yet) is remembered,
                # for the event that may come after its receipt. Then those its proven position covers.
                for position in receipt.applied:
                    pending = self._pending.get(position)
                    if pending is None:
                        cache.named(position, at)
                    elif pending.confirm(cache_id, at):
                        touched[position] = pending
                since = cache.prove(receipt.position, at)
                if receipt.position > since:
                    self._confirm_proven(cache_id, since, receipt.position, at, touched)
            for receipt in due:
                self._caches[receipt.cache_id].noted = now
            done = await self._save({p: pending for p, pending in touched.items() if not pending.waiting})
        await self._announce(done)

    async def _sweep_forever(self) -> None:
        """Once a second: declare caches silent for GONE_AFTER_S gone, complete what they no longer block, write
        what waited WRITE_AFTER_S and the confirmations since, move the cursor; prune old rows hourly."""
        pruned_at = float("-inf")  # (the first sweep prunes)
        while True:
            await asyncio.sleep(1.0)
            self.fence()
            async with self._lock:
                assert self._conn is not None
                now = time.monotonic()
                gone = [c for c, h in self._caches.items() if not h.live(now)]
                for cache_id in gone:
                    del self._caches[cache_id]
                if gone:  # (rare: a cache stopped, or hung)
                    for pending in self._pending.values():
                        pending.waiting.difference_update(gone)
                done = await self._save({p: pending for p, pending in self._pending.items() if not pending.waiting
                                         or pending.dirty and now - pending.since >= WRITE_AFTER_S})
                await self._advance()
                if now - pruned_at > 3600:
                    pruned_at = now
                    await self._conn.execute(PRUNE, {"days": RETENTION_DAYS})
            await self._announce(done)

    async def _advance(self) -> None:
        """Move the cursor to the newest forwarded checkpoint, short of the first revocation held unwritten (that
        checkpoint's events all passed ``record``: each is written, or held, and what is held holds the cursor
        back). It never goes back: ``record`` takes in nothing at or below it, so whatever is held is above it.
        Written after the rows it vouches for, each commit not waiting for the disk: WAL is flushed in order."""
        assert self._conn is not None
        unwritten = [position for position, pending in self._pending.items() if not pending.written]
        cursor = min(self._forwarded, min(unwritten) - 1) if unwritten else self._forwarded
        if cursor != self._written_through:
            await self._conn.execute(ADVANCE, (cursor,))
            self._written_through = cursor
            self._settled = {position for position in self._settled if position > cursor}

    async def _save(self, pendings: dict[int, Pending]) -> list[tuple[str, int, dt.datetime, int]]:
        """Write these revocations (new, or their confirmations since), completing those nothing waits for any
        more; those leave memory, as do those an earlier term completed (a redelivery: not returned), and those no
        cache was live for (nothing written). Those in effect everywhere by their first write go in one row of
        revocation_batches per set of caches (BATCH), the others in a row each (WRITE). Returns what took effect
        everywhere; the caller holds the lock."""
        assert self._conn is not None
        done, rows, batches = [], [], {}
        for position, pending in pendings.items():
            if not pending.caches:  # no cache was live: in effect everywhere at its commit, and nothing says so
                self._settle(position)
                done.append(pending.announcement(position, pending.revoked_at))
            elif pending.written or pending.waiting or None in pending.caches.values():
                rows.append(pending.row(position))  # (null: a cache declared gone; WRITE dates it now)
            else:
                batches.setdefault(tuple(pending.caches), []).append(position)
        micros: dict[dt.datetime, int] = {}  # (a receipt dates everything it confirms alike: a few distinct times)
        for caches, positions in batches.items():
            effective = [[micros.get(at) or micros.setdefault(at, (at - _EPOCH) // _MICROSECOND)
                          for at in pendings[p].caches.values()] for p in positions]
            await self._conn.execute(BATCH, (min(positions), max(positions), _array(positions), list(caches),
                                             _array(effective)))
            for position in positions:  # (every cache confirmed each: in effect everywhere at its last confirmation)
                self._settle(position)
                done.append(pendings[position].announcement(position, pendings[position].last))
        if not rows:
            return done
        saved = dict(await (await self._conn.execute(WRITE, (_encoder.encode(rows).decode(),))).fetchall())
        for row in rows:
            position = row["position"]
            pending = pendings[position]
            pending.written, pending.dirty = True, False
            if position not in saved:
                self._settle(position)  # completed before, by an earlier term: it stays as it was
            elif saved[position] is not None:
                self._settle(position)
                done.append(pending.announcement(position, saved[position]))
        return done

    def _settle(self, position: int) -> None:
        """``position`` leaves memory in effect everywhere."""
        del self._pending[position]
        self._settled.add(position)

    async def _announce(self, done: list[tuple[str, int, dt.datetime, int]]) -> None:
        """Say on NATS which revocations just took effect everywhere (after their commit)."""
        nc, subject = self.bus.nc, self.bus.topology.effective_subject
        for key_id, position, everywhere, caches in done:
            self.completed += 1
            message = {"keyId": key_id, "position": position, "effectiveEverywhereAt": _iso(everywhere),
                       "caches": caches}
            with contextlib.suppress(Exception):
                await nc.publish(subject, _encoder.encode(message))  # type: ignore[union-attr]


def _revocation(msg: Any, head: EnvelopeHead) -> tuple[int, str, str, dt.datetime] | None:
    """(position, key id, type, recorded at) of a revocation-like event (its message and head), else None. A
    reduced envelope (too large for NATS whole: relay.py) keeps all of that; a rotation's reduced form has lost its
    grace, so it counts as one without, conservatively (every cache evicted it anyway: invalidations.py)."""
    if head.type not in REVOKING or head.occurred_at is None:
        return None
    if head.type == "ApiKeyRotated":  # only its data says whether the old secret keeps working for a while
        try:
            if getattr(decode_envelope(msg.data).event, "grace_until", None) is not None:
                return None  # not a revocation yet
        except Exception:
            return None
    return head.position, head.key_id, head.type, head.occurred_at


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
