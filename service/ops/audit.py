"""Audit: the tamper-evident hash chain over the log, its sealer and verifier, exports and as-of queries.

The chain
---------
Every event is covered by a SHA-256 hash chained to the previous event in POSITION order::

    hash(e) = lower_hex(sha256(prev_hash || canonical(e)))      prev_hash of the first event = "0" * 64

``prev_hash`` is the previous hash as 64 ASCII characters; ``canonical(e)`` is the UTF-8 JSON text below, with
exactly this field order and no whitespace outside ``actor``/``data``::

    {"id":"<uuid>","type":<json string>,"keyId":<json string>,"version":<int>,"position":<int>,
     "occurredAt":"<recorded_at in UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ, always 6 digits>",
     "actor":<metadata>,"data":<data>}

where ``actor`` and ``data`` are the stored jsonb values *as PostgreSQL prints them* (``jsonb::text``: keys
ordered by length then bytes, ``", "`` and ``": "`` separators, numbers as stored). Those bytes are exactly
what ``audit export`` prints before its last two fields, so an auditor needs neither keyledger nor
PostgreSQL to check an export: for each line, the hash input is ``prevHash`` followed by the line's bytes up
to (excluding) ``,"prevHash":`` and then ``}``; ``prevHash`` must equal the previous line's ``hash``
(``verify_export`` below is that check, in 20 lines).

The canonical text is built by PostgreSQL itself (``CANONICAL``), and the same expression feeds the sealer,
the verifier and the export: one definition, so they cannot drift apart. It also makes ``audit verify`` fast:
every link is checked independently (``hash = sha256(prev_hash || canonical)`` and ``prev_hash`` = previous
``hash``), so ``verify`` cuts the positions into ranges and checks them on two connections at once, in one
exported snapshot; ``export`` builds its lines in chunks of positions the same way. (Measured on the bench
machine: the canonical text costs PostgreSQL ~3.5 us per event, two thirds of it printing the two jsonb columns;
that, not the hashing, is what the two connections share. See bench/audit_bench.py.)

The sealer
----------
One sealer (the background leader's, service/background/leadership.py) chains events *after* they committed, so the write
path is untouched. The gap problem (a lower position can commit after a higher one was seen) is solved by the
safe horizon of ``horizon.py``: the sealer chains the visible rows up to that horizon, in position order, and
positions that never commit are simply absent: the chain links consecutive *existing* events. A second sealer
(a deposed leader, ``audit verify --seal``) cannot fork the chain: the chain's primary key makes the slower
one's batch fail, and the service's sealer also checks its leadership epoch inside each batch's transaction.

The window: an event is unsealed from its commit until the next sealer pass (``AuditSealer.interval``,
0.5 s by default, longer while a transaction that was running at horizon time stays open). ``audit verify``
reports those events as unsealed, not as errors, and ``audit export`` prints them with null hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ..storage.connections import long_lived
from ..storage.horizon import final_horizon
from ..storage.parallel import parallel

log = logging.getLogger("keyledger.audit")

GENESIS = "0" * 64

# canonical(e), built by PostgreSQL (see the module docstring). `e` is the events row. One concat() call: it
# prints each argument with its type's output function (uuid_out, jsonb_out...: the same text as ::text) and
# allocates the result once; a chain of `||` copied the growing string ~15 times and cost twice as much.
CANONICAL_FIELDS = (
    """'{"id":"', e.id, '","type":', to_json(e.type), ',"keyId":', to_json(e.stream_id),"""
    """ ',"version":', e.version, ',"position":', e.position,"""
    """ ',"occurredAt":"', to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),"""
    """ '","actor":', e.metadata, ',"data":', e.data"""
)
CANONICAL = f"concat({CANONICAL_FIELDS}, '}}')"


def _hash_after(prev_hash: str) -> str:
    """The hash of an events row ``e`` chained to the SQL expression ``prev_hash``: the chain's formula, once."""
    return f"encode(sha256(convert_to(concat({prev_hash}, {CANONICAL_FIELDS}, '}}'), 'UTF8')), 'hex')"


# The hash of an events row `e` given its chain row `c`, recomputed by PostgreSQL.
RECOMPUTED_HASH = _hash_after("c.prev_hash")

HEAD = "SELECT position, hash FROM event_chain ORDER BY position DESC LIMIT 1"
# One batch of links, made by PostgreSQL: from the head, walk the events in position order up to the horizon (an
# index probe each), hash each one onto the hash before it, insert the links, and return how many there were and
# the new head. No event's text travels to the service and back: hashing them there cost the process that serves
# HTTP ~35 us of Python per event (fetching each text, hashlib, COPY), 3% of its CPU under revoke load.
SEAL_BATCH = f"""
WITH RECURSIVE link (n, position, prev_hash, hash) AS (
    (SELECT 1, e.position, %(prev)s::text, {_hash_after("%(prev)s::text")}
     FROM events e WHERE e.position > %(after)s AND e.position <= %(upto)s ORDER BY e.position LIMIT 1)
    UNION ALL
    SELECT l.n + 1, e.position, l.hash, {_hash_after("l.hash")}
    FROM link l CROSS JOIN LATERAL (
        SELECT * FROM events e WHERE e.position > l.position AND e.position <= %(upto)s ORDER BY e.position LIMIT 1
    ) e
    WHERE l.n < %(batch)s
), sealed AS (
    INSERT INTO event_chain (position, prev_hash, hash) SELECT position, prev_hash, hash FROM link
    RETURNING position, hash
)
SELECT count(*), max(position), (array_agg(hash ORDER BY position DESC))[1] FROM sealed
"""
SEALER_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('keyledger.audit-sealer', 0))"
SEALER_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('keyledger.audit-sealer', 0))"

# verify: one pass over a range of positions of both tables, naming the smallest position where each check
# fails (NULL: intact). Both sides are read in position order (primary keys) and merged with a FULL JOIN, so an
# event without chain row and a chain row without event show up as half-empty rows; `expected` is the previous
# chain row's hash (the last one below the range for the first row, 64 zeros at the very start). Ranges are
# independent, so they run on several connections at once, inside one exported snapshot.
VERIFY_RANGE = f"""
SELECT
    min(c.position) FILTER (WHERE e.position IS NOT NULL AND c.position IS NOT NULL
                              AND c.hash IS DISTINCT FROM {RECOMPUTED_HASH}) AS bad_hash,
    min(c.position) FILTER (WHERE c.prev_hash IS DISTINCT FROM c.expected) AS bad_link,
    min(c.position) FILTER (WHERE e.position IS NULL) AS orphan,
    min(e.position) FILTER (WHERE c.position IS NULL) AS unchained,
    count(*) FILTER (WHERE e.position IS NOT NULL AND c.position IS NOT NULL) AS checked
FROM (
    SELECT position, prev_hash, hash,
           lag(hash, 1, coalesce((SELECT hash FROM event_chain WHERE position < %(lo)s
                                  ORDER BY position DESC LIMIT 1), '{GENESIS}')) OVER (ORDER BY position) AS expected
    FROM event_chain WHERE position >= %(lo)s AND position <= %(hi)s
) c
FULL JOIN (SELECT * FROM events WHERE position >= %(lo)s AND position <= %(hi)s) e ON e.position = c.position
"""
COUNT_UNSEALED = "SELECT count(*) FROM events e WHERE e.position > %s"
CHAIN_AT = "SELECT hash FROM event_chain WHERE position = %s"
FIRST_POSITION = "SELECT least((SELECT min(position) FROM events), (SELECT min(position) FROM event_chain))"

# A consistent read over several connections: the first one exports its snapshot, the others adopt it.
SNAPSHOT_BEGIN = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
EXPORT_SNAPSHOT = "SELECT pg_export_snapshot()"
IMPORT_SNAPSHOT = "SET TRANSACTION SNAPSHOT {}"
# Per reading connection: memory for export's per-chunk sort; no parallel workers or JIT (each statement covers
# a slice, and the slices already keep every core busy; JIT compiling ~100 statements cost more than it saved).
READ_SETTINGS = ("SET LOCAL work_mem = '64MB'", "SET LOCAL max_parallel_workers_per_gather = 0", "SET LOCAL jit = off")
DEFAULT_JOBS = 2  # reading connections for verify and export (the bench machine has 2 cores)


# ----------------------------------------------------------------------------------------------------------
# Horizon and sealing
# ----------------------------------------------------------------------------------------------------------
# The background leader's fence (schema.sql, keyledger_fence; leadership.py holds the lease).
FENCE = "SELECT keyledger_fence(%s)"


def head(conn: psycopg.Connection[Any]) -> tuple[int, str] | None:
    row = conn.execute(HEAD).fetchone()
    return (int(row[0]), row[1]) if row else None


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def seal(conn: psycopg.Connection[Any], *, batch: int = 20_000, max_wait: float = 5.0,
         epoch: int | None = None) -> int:
    """Chain every event that is final; returns how many were sealed. Caller is the one sealer.

    Each batch is one transaction and one statement (``SEAL_BATCH``: PostgreSQL hashes the events in order and
    inserts the links). A crash between batches leaves a shorter, still valid chain; the next pass continues
    from its head.
    """
    horizon = final_horizon(conn, max_wait=max_wait)
    if horizon is None:
        return 0
    sealed = 0
    current = head(conn)
    position, prev = current if current else (0, GENESIS)
    while position < horizon:
        with conn.transaction():
            if epoch is not None:  # the background leader's: commit only inside its own term
                conn.execute(FENCE, (epoch,))  # aborts it (KL410) unless epoch is the current, unexpired term
            n, last, digest = conn.execute(SEAL_BATCH, {"prev": prev, "after": position, "upto": horizon,
                                                        "batch": batch}).fetchone()
        if not n:
            break
        position, prev = last, digest
        sealed += n
    return sealed


def try_lead(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.execute(SEALER_LOCK).fetchone()[0])


class HeadMessage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What ``<prefix>.audit.head`` carries: an anchor for ``audit verify --head POSITION:HASH``."""

    position: int
    hash: str
    published_at: dt.datetime

    @property
    def anchor(self) -> str:
        return f"{self.position}:{self.hash}"


def head_subject(prefix: str) -> str:
    return f"{prefix}.audit.head"


class AuditSealer:
    """The runtime task: seal every ``interval`` seconds, publish the head after sealing and every
    ``head_every`` seconds (core NATS: an anchor is a broadcast; anyone who wants history records it).

    Sealing runs in a worker thread on its own synchronous connection (psycopg's blocking API keeps the
    horizon wait simple and off the event loop); publishing happens on the loop, through the service's Bus.
    It runs in the background leader only: ``fence()`` before each pass, and ``keyledger_fence(epoch)`` inside
    each batch's transaction, so a deposed leader's sealer cannot commit a batch.
    """

    def __init__(self, database_url: str, bus: Any | None = None, *, interval: float = 0.5,
                 head_every: float = 10.0, fence: Callable[[], None] = lambda: None,
                 epoch: Callable[[], int | None] = lambda: None) -> None:
        self.database_url = database_url
        self.bus = bus
        self.interval = interval
        self.head_every = head_every
        self.fence = fence
        self.epoch = epoch
        self.sealed = 0
        self.published = 0
        self._conn: psycopg.Connection[Any] | None = None

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("audit sealer: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.to_thread(self._close)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                await asyncio.to_thread(self._close)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _seal(self) -> tuple[int, tuple[int, str] | None]:
        if self._conn is None:
            self._conn = psycopg.connect(self.database_url, autocommit=True,
                                         **long_lived(self.database_url, name="audit sealer"))
        n = seal(self._conn, max_wait=max(self.interval * 4, 1.0), epoch=self.epoch())
        return n, head(self._conn)

    async def _run(self) -> None:
        last_publish = 0.0
        while True:
            self.fence()
            n, current = await asyncio.to_thread(self._seal)
            self.sealed += n
            if current and (n or time.monotonic() - last_publish >= self.head_every):
                if await self._publish(current):
                    last_publish = time.monotonic()
            await asyncio.sleep(self.interval)

    async def _publish(self, current: tuple[int, str]) -> bool:
        if self.bus is None or not self.bus.connected:
            return False
        message = HeadMessage(position=current[0], hash=current[1], published_at=dt.datetime.now(dt.timezone.utc))
        try:
            await self.bus.nc.publish(head_subject(self.bus.topology.prefix), msgspec.json.encode(message))
        except Exception as exc:  # an anchor missed is published again at the next tick
            log.debug("audit head publish failed: %s", exc)
            return False
        self.published += 1
        return True


# ----------------------------------------------------------------------------------------------------------
# Verify
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int  # chained events whose hash was recomputed
    head: tuple[int, str] | None
    unsealed: int  # events after the head, not chained yet (the sealer's window), not an error
    problem: str | None = None
    position: int | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.ok:
            return f"audit verify: FAILED at position {self.position}: {self.problem}"
        where = f"head {self.head[0]}:{self.head[1]}" if self.head else "empty chain"
        rate = f", {self.checked / self.seconds:,.0f} events/s" if self.seconds > 0 and self.checked else ""
        return (f"audit verify: OK, {self.checked:,} events chained, {where}, {self.unsealed:,} not sealed yet "
                f"({self.seconds:.2f}s{rate})")


def parse_anchor(text: str) -> tuple[int, str]:
    position, sep, digest = text.partition(":")
    if not sep or not position.isdigit() or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError(f"expected POSITION:HASH (64 lower-case hex digits), got {text!r}")
    return int(position), digest


# ----------------------------------------------------------------------------------------------------------
# Reading on several connections from one snapshot (verify, export)
# ----------------------------------------------------------------------------------------------------------
def _sibling(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """Another connection to the same server and database, with the same credentials."""
    params = {o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}
    return psycopg.connect(make_conninfo("", **params), autocommit=True)


@contextlib.contextmanager
def snapshot_readers(conn: psycopg.Connection[Any], jobs: int = DEFAULT_JOBS
                     ) -> Iterator[list[psycopg.Connection[Any]]]:
    """``conn`` opens a REPEATABLE READ transaction; yields ``jobs`` connections that read in the very same
    snapshot (``pg_export_snapshot``), so slices read at once form one consistent read. ``conn`` itself stays
    usable for small queries in that snapshot. Needs ``conn`` in autocommit mode for jobs > 1."""
    if not conn.autocommit:
        jobs = 1
    with conn.transaction():
        if conn.autocommit:
            conn.execute(SNAPSHOT_BEGIN)
        for setting in READ_SETTINGS:
            conn.execute(setting)
        if jobs <= 1:
            yield [conn]
            return
        snapshot = conn.execute(EXPORT_SNAPSHOT).fetchone()[0]
        readers: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(jobs):
                reader = _sibling(conn)
                readers.append(reader)
                reader.execute("BEGIN")
                reader.execute(SNAPSHOT_BEGIN)
                reader.execute(sql.SQL(IMPORT_SNAPSHOT).format(sql.Literal(snapshot)))
                for setting in READ_SETTINGS:
                    reader.execute(setting)
            yield readers
        finally:
            for reader in readers:
                reader.close()


def _ranges(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """Inclusive position ranges of ``size`` positions covering [lo, hi]."""
    return [(start, min(start + size - 1, hi)) for start in range(lo, hi + 1, size)]


def verify(conn: psycopg.Connection[Any], anchor: tuple[int, str] | None = None, *,
           jobs: int = DEFAULT_JOBS) -> Verdict:
    """Recompute every chained hash from the events rows and check every link, table against table.

    Catches, with the first bad position: an events row altered (hash mismatch), rows swapped (mismatch at
    the lower one), a chain row altered or a link broken, an event deleted (chain entry without event), an
    event inserted below the head out of band (event without chain entry), and, with ``anchor``, a chain
    recomputed or truncated by someone with write access (the chain at POSITION must still hash to HASH).

    The positions up to the head are cut into ranges checked by ``VERIFY_RANGE`` on ``jobs`` connections at
    once, all in one snapshot (``snapshot_readers``): the hashing is PostgreSQL's (``sha256()``), the cost is
    printing each event's canonical text (~3.5 us), which is what the connections share.
    """
    started = time.perf_counter()
    problems: list[tuple[int, str]] = []
    checked = 0
    with snapshot_readers(conn, jobs) as readers:
        current = head(conn)
        if current is not None:
            first = conn.execute(FIRST_POSITION).fetchone()[0]
            size = max(50_000, (current[0] - first) // (len(readers) * 4) + 1)
            results = parallel(readers, [
                lambda c, lo=lo, hi=hi: c.execute(VERIFY_RANGE, {"lo": lo, "hi": hi}).fetchone()
                for lo, hi in _ranges(first, current[0], size)])
            for bad_hash, bad_link, orphan, unchained, count in results:
                checked += count
                if bad_hash is not None:
                    problems.append((bad_hash, "hash mismatch (event or chain row altered, or rows reordered)"))
                if bad_link is not None:
                    problems.append((bad_link, "broken link (prev_hash is not the previous event's hash)"))
                if orphan is not None:
                    problems.append((orphan, "chain entry without event (event deleted)"))
                if unchained is not None:
                    problems.append((unchained,
                                     "event without chain entry below the sealed head (inserted out of band)"))
        if anchor is not None:
            row = conn.execute(CHAIN_AT, (anchor[0],)).fetchone()
            if row is None:
                problems.append((anchor[0], "anchor position is not in the chain (log truncated or rewritten)"))
            elif row[0] != anchor[1]:
                problems.append((anchor[0], "chain differs from the anchor (log rewritten and chain recomputed)"))
        unsealed = conn.execute(COUNT_UNSEALED, (current[0] if current else 0,)).fetchone()[0]
    seconds = time.perf_counter() - started
    if problems:
        position, problem = min(problems)
        return Verdict(False, checked, current, unsealed, problem, position, seconds)
    return Verdict(True, checked, current, unsealed, seconds=seconds)


_SUFFIX_MARK = b',"prevHash":'


def verify_export(lines: Iterable[bytes], anchor: tuple[int, str] | None = None) -> tuple[int, str | None]:
    """Check an ``audit export`` from position 0 without the database: the auditor's recipe, as code.

    Returns (lines checked, None) or (the bad line's position, what is wrong). Stops at the first unsealed
    line (null hashes): the chain ends there.
    """
    prev = GENESIS
    count = 0
    seen_anchor = anchor is None
    for line in lines:
        line = line.rstrip(b"\n")
        cut = line.rfind(_SUFFIX_MARK)
        tail = msgspec.json.decode(b"{" + line[cut + 1:])
        position = msgspec.json.decode(line).get("position")
        if tail["hash"] is None:
            break
        if tail["prevHash"] != prev:
            return position, "prevHash is not the previous line's hash"
        digest = hashlib.sha256(prev.encode("ascii") + line[:cut] + b"}").hexdigest()
        if digest != tail["hash"]:
            return position, "hash does not match the line"
        if anchor is not None and position == anchor[0]:
            if digest != anchor[1]:
                return position, "hash differs from the anchor"
            seen_anchor = True
        prev = digest
        count += 1
    if not seen_anchor:
        return anchor[0], "anchor position not in the export"  # type: ignore[index]
    return count, None


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------
# One export line: canonical(e) without its closing brace, then prevHash and hash (null while unsealed), then
# "}" and a newline; a chunk is the lines of a position range, concatenated in position order, as bytes (binary
# results: exact bytes, no COPY escaping to undo). {where} holds the filters, composed as SQL literals. The
# chain side is bounded by the range explicitly: PostgreSQL does not carry e.position's bounds across an outer
# join, and without them every chunk hashed the whole chain table.
EXPORT_LINE = (f"concat({CANONICAL_FIELDS}, ',\"prevHash\":', coalesce('\"' || c.prev_hash || '\"', 'null'), "
               f"',\"hash\":', coalesce('\"' || c.hash || '\"', 'null'), E'}}\\n')")
EXPORT_CHUNK = f"""
SELECT convert_to(string_agg({EXPORT_LINE}, '' ORDER BY e.position), 'UTF8')
FROM events e
LEFT JOIN (SELECT * FROM event_chain WHERE position >= %(lo)s AND position <= %(hi)s) c ON c.position = e.position
WHERE e.position >= %(lo)s AND e.position <= %(hi)s AND {{where}}
"""
EXPORT_BOUNDS = "SELECT min(e.position), max(e.position) FROM events e WHERE {where}"
EXPORT_CHUNK_POSITIONS = 8192  # ~4 MB of text per chunk: bounded memory on both sides


def _export_filter(since: dt.datetime | None, until: dt.datetime | None, key_id: str | None) -> str:
    where: list[sql.Composable] = [sql.SQL("true")]
    if since is not None:
        where.append(sql.SQL("e.recorded_at >= {}").format(sql.Literal(since)))
    if until is not None:
        where.append(sql.SQL("e.recorded_at < {}").format(sql.Literal(until)))
    if key_id is not None:
        where.append(sql.SQL("e.stream_id = {}").format(sql.Literal(key_id)))
    # Spliced into statements that also take %(lo)s/%(hi)s parameters: a literal's own % must be doubled.
    return sql.SQL(" AND ").join(where).as_string(None).replace("%", "%%")


def export_chunks(conn: psycopg.Connection[Any], since: dt.datetime | None = None,
                  until: dt.datetime | None = None, key_id: str | None = None, *,
                  jobs: int = DEFAULT_JOBS) -> Iterator[bytes]:
    """Yield the export as chunks of whole lines, in position order, in bounded memory.

    The position range is cut into chunks of ``EXPORT_CHUNK_POSITIONS``; ``jobs`` connections in one
    snapshot build chunk i, i+jobs, ... each, and each hands over at most two finished chunks ahead of the
    consumer, so memory stays a few chunks whatever the size of the log. ``--key`` is one chunk (an index scan).
    """
    where = _export_filter(since, until, key_id)
    with snapshot_readers(conn, 1 if key_id is not None else jobs) as readers:
        lo, hi = conn.execute(EXPORT_BOUNDS.replace("{where}", where).replace("%%", "%")).fetchone()
        if lo is None:
            return
        statement = EXPORT_CHUNK.replace("{where}", where)
        ranges = [(lo, hi)] if key_id is not None else _ranges(lo, hi, EXPORT_CHUNK_POSITIONS)
        yield from _ordered(readers, statement, ranges)


def _ordered(readers: list[psycopg.Connection[Any]], statement: str, ranges: list[tuple[int, int]]
             ) -> Iterator[bytes]:
    """The chunks of ``ranges``, in order; reader k builds chunks k, k+n, ... ahead in its own thread."""
    def fetch(conn: psycopg.Connection[Any], lo: int, hi: int) -> bytes | None:
        return conn.execute(statement, {"lo": lo, "hi": hi}, binary=True).fetchone()[0]

    if len(readers) == 1:
        for lo, hi in ranges:
            chunk = fetch(readers[0], lo, hi)
            if chunk:
                yield chunk
        return
    n = len(readers)
    handoff: list[queue.Queue[Any]] = [queue.Queue(maxsize=2) for _ in readers]
    stop = threading.Event()

    def put(slot: int, item: Any) -> None:
        while not stop.is_set():
            try:
                handoff[slot].put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work(slot: int) -> None:
        try:
            for i in range(slot, len(ranges), n):
                if stop.is_set():
                    return
                put(slot, fetch(readers[slot], *ranges[i]))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            put(slot, exc)

    threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in range(n)]
    for t in threads:
        t.start()
    try:
        for i in range(len(ranges)):
            item = handoff[i % n].get()
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


def export(conn: psycopg.Connection[Any], since: dt.datetime | None = None, until: dt.datetime | None = None,
           key_id: str | None = None, *, jobs: int = DEFAULT_JOBS) -> Iterator[bytes]:
    """Yield export lines (with their newline), in position order, streamed: constant client memory.
    (A line never holds a raw newline or carriage return: JSON text escapes them.)"""
    for chunk in export_chunks(conn, since, until, key_id, jobs=jobs):
        yield from chunk.splitlines(keepends=True)


# ----------------------------------------------------------------------------------------------------------
# As-of: the keys active at an instant, folded from the log in SQL
# ----------------------------------------------------------------------------------------------------------
# Per key, over its events recorded at or before the instant: the creation (or import), whether it was revoked,
# the last enable/disable (version*2 + flag, so max() picks the latest without sorting), and the last
# name/expiry set by an update and start set by a rotation (zero-padded version || JSON value, compared
# bytewise). The secrets superseded by a rotation whose grace period still runs at the instant are listed with
# the key: they could call the API then too. Same rules as domain.evolve.
AS_OF = """
WITH k AS (
    SELECT stream_id,
           bool_or(type = 'ApiKeyRevoked') AS revoked,
           (array_agg(data) FILTER (WHERE type IN ('ApiKeyCreated', 'ApiKeyImported')))[1] AS created,
           min(recorded_at) FILTER (WHERE type IN ('ApiKeyCreated', 'ApiKeyImported')) AS recorded_at,
           max(version * 2 + (type = 'ApiKeyEnabled')::int)
               FILTER (WHERE type IN ('ApiKeyEnabled', 'ApiKeyDisabled')) AS flip,
           max(lpad(version::text, 10, '0') || (data -> 'name')::text COLLATE "C")
               FILTER (WHERE type = 'ApiKeyUpdated' AND data ? 'name') AS name_set,
           max(lpad(version::text, 10, '0') || (data -> 'expiresAt')::text COLLATE "C")
               FILTER (WHERE type = 'ApiKeyUpdated' AND data ? 'expiresAt') AS expiry_set,
           max(lpad(version::text, 10, '0') || (data -> 'start')::text COLLATE "C")
               FILTER (WHERE type = 'ApiKeyRotated') AS start_set,
           jsonb_agg(jsonb_build_object('start', data -> 'previousStart', 'graceUntil', data -> 'graceUntil'))
               FILTER (WHERE type = 'ApiKeyRotated' AND (data ->> 'graceUntil')::timestamptz > %(at)s) AS grace
    FROM events
    WHERE recorded_at <= %(at)s
    GROUP BY stream_id
), s AS (
    SELECT stream_id, created, grace,
           coalesce((created ->> 'createdAt')::timestamptz, recorded_at) AS created_at,
           coalesce(substr(name_set, 11)::jsonb, created -> 'name') #>> '{}' AS name,
           coalesce(substr(start_set, 11)::jsonb, created -> 'start') #>> '{}' AS start,
           (coalesce(substr(expiry_set, 11)::jsonb, created -> 'expiresAt') #>> '{}')::timestamptz AS expires_at,
           CASE WHEN flip IS NULL THEN coalesce((created ->> 'enabled')::boolean, true) ELSE flip %% 2 = 1 END
               AS enabled
    FROM k
    WHERE created IS NOT NULL AND NOT revoked
)
SELECT stream_id, created ->> 'referenceId', name, start, created ->> 'prefix', expires_at, created_at,
       coalesce(grace, '[]')::text
FROM s
WHERE enabled AND (expires_at IS NULL OR expires_at > %(at)s)
ORDER BY stream_id
"""


class GraceSecret(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A secret superseded by a rotation, still working at the instant (until ``grace_until``)."""

    start: str | None
    grace_until: dt.datetime


class ActiveKey(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    key_id: str
    reference_id: str
    name: str | None
    start: str | None
    prefix: str | None
    expires_at: dt.datetime | None
    created_at: dt.datetime
    superseded: list[GraceSecret] = []  # omitted when empty


_grace_decoder = msgspec.json.Decoder(list[GraceSecret])


def parse_instant(text: str) -> dt.datetime:
    """ISO-8601; an instant without a zone is UTC (never the machine's local time). ``ValueError`` says what
    was expected, in one line."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO-8601 instant: {text!r} (e.g. 2026-12-01T09:30:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def as_of(conn: psycopg.Connection[Any], at: dt.datetime) -> list[ActiveKey]:
    """The keys active at ``at``: created, not revoked, enabled and before their expiry, per the log."""
    with conn.transaction():
        conn.execute("SET LOCAL work_mem = '256MB'")
        rows = conn.execute(AS_OF, {"at": at}).fetchall()
    return [ActiveKey(key_id=r[0], reference_id=r[1], name=r[2], start=r[3], prefix=r[4], expires_at=r[5],
                      created_at=r[6], superseded=sorted(_grace_decoder.decode(r[7]), key=_by_deadline))
            for r in rows]


def _by_deadline(secret: GraceSecret) -> dt.datetime:
    return secret.grace_until
