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
``hash``), so PostgreSQL checks them with parallel workers instead of one Python loop. (Measured on the bench
machine: printing two jsonb columns alone costs PostgreSQL ~2.5 us per event, which caps a single-stream
Python verifier near 300k events/s before any hashing; see bench/audit_bench.py.)

The sealer
----------
One sealer (advisory lock) chains events *after* they committed, so the write path is untouched. The gap
problem: positions are drawn at insert but become visible at commit, so a lower position can appear after a
higher one was seen. ``schema.sql`` assigns each writer's xid before its position (trigger
``events_position``), which gives a horizon: read ``L`` = the sequence's last value, THEN take a snapshot
``S``; every position <= L was drawn by a transaction whose xid existed before ``S``, so it has either ended
or is listed in ``pg_snapshot_xip(S)``. Once none of those is in a newer snapshot's xip list any more (not
``pg_xact_status``, which says 'committed' a moment before the commit becomes visible), every position <= L is
final (committed or never to appear) and the sealer chains the visible rows up to L in position order.
Positions that never commit are simply absent: the chain links consecutive *existing* events.
(This relies on ``events_position_seq`` having CACHE 1, the default: a cached value could be drawn later.)

The window: an event is unsealed from its commit until the next sealer pass (``AuditSealer.interval``,
0.5 s by default, longer while a transaction that was running at horizon time stays open). ``audit verify``
reports those events as unsealed, not as errors, and ``audit export`` prints them with null hashes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg import sql

log = logging.getLogger("keyledger.audit")

GENESIS = "0" * 64

# canonical(e), built by PostgreSQL (see the module docstring). `e` is the events row.
CANONICAL = (
    """('{"id":"' || e.id::text || '","type":' || to_json(e.type)::text"""
    """ || ',"keyId":' || to_json(e.stream_id)::text"""
    """ || ',"version":' || e.version::text || ',"position":' || e.position::text"""
    """ || ',"occurredAt":"' || to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
    """ || '","actor":' || e.metadata::text || ',"data":' || e.data::text || '}')"""
)
# The hash of an events row `e` given its chain row `c`, recomputed by PostgreSQL.
RECOMPUTED_HASH = f"encode(sha256(convert_to(c.prev_hash || {CANONICAL}, 'UTF8')), 'hex')"

SEQUENCE_LAST_VALUE = "SELECT pg_sequence_last_value('events_position_seq')"
# A snapshot's xip list only holds running xids *below its xmax* (latestCompletedXid + 1): a writer whose xid is
# the newest assigned, with no later xid completed yet, is running but absent from xip (PostgreSQL's
# GetSnapshotData skips xids >= xmax), so reading xip alone let the horizon pass an uncommitted revoke (the
# replay test's resurrected keys). Hence OWN_XID: an autocommitted statement that takes an xid of its own and
# commits. Every writer whose position is <= the sequence value read before it has a smaller xid (positions are
# drawn after the xid, see the events_position trigger), and every snapshot taken after it has xmax > that xid,
# so it lists each such writer still running in its xip.
OWN_XID = "SELECT pg_current_xact_id()::text::bigint"
CURRENT_SNAPSHOT_XIP = (
    "SELECT array_agg(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE x::text::bigint < %s"
)
# "Still running" means: still in a NEW snapshot's xip list. Not pg_xact_status(): a transaction is marked
# committed in the commit log *before* it leaves the proc array, and in between, a new snapshot still treats it
# as running, so its rows are invisible although pg_xact_status already says 'committed' (a replay test caught
# exactly that: a revoke sealed out of the rebuilt table).
STILL_RUNNING = (
    "SELECT array_agg(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x "
    "WHERE x::text::bigint = ANY(%s::bigint[])"
)
HEAD = "SELECT position, hash FROM event_chain ORDER BY position DESC LIMIT 1"
TO_SEAL = f"""
SELECT e.position, convert_to({CANONICAL}, 'UTF8')
FROM events e
WHERE e.position > %s AND e.position <= %s
ORDER BY e.position
LIMIT %s
"""
COPY_CHAIN = "COPY event_chain (position, prev_hash, hash) FROM STDIN"
SEALER_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('keyledger.audit-sealer', 0))"
SEALER_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('keyledger.audit-sealer', 0))"

# verify: every check names the smallest position where it fails (NULL: intact).
CHECK_HASHES = f"""
SELECT min(e.position) FILTER (WHERE c.hash IS DISTINCT FROM {RECOMPUTED_HASH}), count(*)
FROM events e JOIN event_chain c ON c.position = e.position
"""
CHECK_LINKS = f"""
SELECT min(position) FROM (
    SELECT position, prev_hash, lag(hash, 1, '{GENESIS}') OVER (ORDER BY position) AS expected
    FROM event_chain
) links
WHERE prev_hash IS DISTINCT FROM expected
"""
CHECK_UNCHAINED = """
SELECT min(e.position) FROM events e
WHERE e.position < %s AND NOT EXISTS (SELECT 1 FROM event_chain c WHERE c.position = e.position)
"""
CHECK_ORPHANS = """
SELECT min(c.position) FROM event_chain c
WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = c.position)
"""
COUNT_UNSEALED = "SELECT count(*) FROM events e WHERE e.position > %s"
CHAIN_AT = "SELECT hash FROM event_chain WHERE position = %s"
# Cheap completeness check: when the join matched every chain row and every event up to the head, there is
# neither an orphan nor an unchained event, and the two anti-joins above need not run.
COUNTS = "SELECT (SELECT count(*) FROM event_chain), (SELECT count(*) FROM events WHERE position <= %s)"

# The session settings audit reads run with: parallel workers for verify, memory for as-of's aggregate.
READ_SETTINGS = "SET work_mem = '256MB'"


# ----------------------------------------------------------------------------------------------------------
# Horizon and sealing
# ----------------------------------------------------------------------------------------------------------
def final_horizon(conn: psycopg.Connection[Any], *, max_wait: float = 5.0, poll: float = 0.002) -> int | None:
    """The highest position L such that every position <= L is final, or None (nothing yet / timed out).

    ``conn`` must be in autocommit mode: the sequence read, the own-xid statement and the snapshot are three
    statements, in that order (a single statement would take its snapshot *before* reading the sequence, and
    the own xid must have committed before the snapshot is taken; see OWN_XID).
    """
    last = conn.execute(SEQUENCE_LAST_VALUE).fetchone()[0]
    if last is None:
        return None
    own = conn.execute(OWN_XID).fetchone()[0]  # its own statement, committed before the snapshot below
    running = conn.execute(CURRENT_SNAPSHOT_XIP, (own,)).fetchone()[0] or []
    deadline = time.monotonic() + max_wait
    while running:
        running = conn.execute(STILL_RUNNING, (running,)).fetchone()[0] or []
        if not running:
            break
        if time.monotonic() > deadline:
            log.info("audit horizon: %d transaction(s) still running after %.1fs", len(running), max_wait)
            return None
        time.sleep(poll)
    return int(last)


def head(conn: psycopg.Connection[Any]) -> tuple[int, str] | None:
    row = conn.execute(HEAD).fetchone()
    return (int(row[0]), row[1]) if row else None


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def seal(conn: psycopg.Connection[Any], *, batch: int = 20_000, max_wait: float = 5.0) -> int:
    """Chain every event that is final; returns how many were sealed. Caller is the one sealer.

    Each batch is one transaction: read the canonical texts, hash them in order, COPY the chain rows. A
    crash between batches leaves a shorter, still valid chain; the next pass continues from its head.
    """
    horizon = final_horizon(conn, max_wait=max_wait)
    if horizon is None:
        return 0
    sealed = 0
    current = head(conn)
    position, prev = current if current else (0, GENESIS)
    while position < horizon:
        rows = conn.execute(TO_SEAL, (position, horizon, batch)).fetchall()
        if not rows:
            break
        chain = []
        for pos, canonical in rows:
            digest = hashlib.sha256(prev.encode("ascii") + canonical).hexdigest()
            chain.append((pos, prev, digest))
            prev = digest
        with conn.transaction():
            with conn.cursor().copy(COPY_CHAIN) as copy:
                for row in chain:
                    copy.write_row(row)
        position = chain[-1][0]
        sealed += len(chain)
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
    Only one sealer chains at a time (session advisory lock); the others wait for the lock.
    """

    def __init__(self, database_url: str, bus: Any | None = None, *, interval: float = 0.5,
                 head_every: float = 10.0) -> None:
        self.database_url = database_url
        self.bus = bus
        self.interval = interval
        self.head_every = head_every
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

    def _connect_and_lead(self) -> bool:
        if self._conn is None:
            self._conn = psycopg.connect(self.database_url, autocommit=True)
        return try_lead(self._conn)

    def _seal(self) -> tuple[int, tuple[int, str] | None]:
        assert self._conn is not None
        n = seal(self._conn, max_wait=max(self.interval * 4, 1.0))
        return n, head(self._conn)

    async def _run(self) -> None:
        while not await asyncio.to_thread(self._connect_and_lead):
            await asyncio.sleep(1.0)
        last_publish = 0.0
        while True:
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


def verify(conn: psycopg.Connection[Any], anchor: tuple[int, str] | None = None) -> Verdict:
    """Recompute every chained hash from the events rows and check every link, table against table.

    Catches, with the first bad position: an events row altered (hash mismatch), rows swapped (mismatch at
    the lower one), a chain row altered or a link broken, an event deleted (chain entry without event), an
    event inserted below the head out of band (event without chain entry), and, with ``anchor``, a chain
    recomputed or truncated by someone with write access (the chain at POSITION must still hash to HASH).
    """
    started = time.perf_counter()
    conn.execute(READ_SETTINGS)
    current = head(conn)
    problems: list[tuple[int, str]] = []
    bad_hash, checked = conn.execute(CHECK_HASHES).fetchone()
    if bad_hash is not None:
        problems.append((bad_hash, "hash mismatch (event or chain row altered, or rows reordered)"))
    bad_link = conn.execute(CHECK_LINKS).fetchone()[0]
    if bad_link is not None:
        problems.append((bad_link, "broken link (prev_hash is not the previous event's hash)"))
    chained, below_head = conn.execute(COUNTS, (current[0] if current else 0,)).fetchone()
    if chained != checked:
        orphan = conn.execute(CHECK_ORPHANS).fetchone()[0]
        if orphan is not None:
            problems.append((orphan, "chain entry without event (event deleted)"))
    if current is not None and below_head != checked:
        unchained = conn.execute(CHECK_UNCHAINED, (current[0],)).fetchone()[0]
        if unchained is not None:
            problems.append((unchained, "event without chain entry below the sealed head (inserted out of band)"))
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
EXPORT = """
COPY (
    SELECT left({canonical}, -1)
        || ',"prevHash":' || coalesce('"' || c.prev_hash || '"', 'null')
        || ',"hash":' || coalesce('"' || c.hash || '"', 'null') || '}}'
    FROM events e LEFT JOIN event_chain c ON c.position = e.position
    WHERE {where}
    ORDER BY e.position
) TO STDOUT
"""


def export_statement(since: dt.datetime | None = None, until: dt.datetime | None = None,
                     key_id: str | None = None) -> sql.Composed:
    """COPY takes no bind parameters, so the filters are composed as SQL literals (psycopg quotes them)."""
    where: list[sql.Composable] = [sql.SQL("true")]
    if since is not None:
        where.append(sql.SQL("e.recorded_at >= {}").format(sql.Literal(since)))
    if until is not None:
        where.append(sql.SQL("e.recorded_at < {}").format(sql.Literal(until)))
    if key_id is not None:
        where.append(sql.SQL("e.stream_id = {}").format(sql.Literal(key_id)))
    return sql.SQL(EXPORT.replace("{canonical}", CANONICAL.replace("{", "{{").replace("}", "}}"))).format(
        where=sql.SQL(" AND ").join(where))


def export(conn: psycopg.Connection[Any], since: dt.datetime | None = None, until: dt.datetime | None = None,
           key_id: str | None = None) -> Iterator[bytes]:
    """Yield export lines (with their newline), in position order, streamed: constant client memory.

    COPY sends one message per row; the text format doubles backslashes (the only escape a JSON line can
    need, since JSON text never holds raw control characters), so undoing that gives the line's bytes.
    """
    with conn.cursor() as cur:
        with cur.copy(export_statement(since, until, key_id)) as copy:
            for block in copy:
                data = bytes(block)
                yield data.replace(b"\\\\", b"\\") if b"\\" in data else data


# ----------------------------------------------------------------------------------------------------------
# As-of: the keys active at an instant, folded from the log in SQL
# ----------------------------------------------------------------------------------------------------------
# Per key, over its events recorded at or before the instant: the creation, whether it was revoked, the last
# enable/disable (version*2 + flag, so max() picks the latest without sorting), and the last name/expiry set
# by an update (zero-padded version || JSON value, compared bytewise). Same rules as domain.evolve.
AS_OF = """
WITH k AS (
    SELECT stream_id,
           bool_or(type = 'ApiKeyRevoked') AS revoked,
           (array_agg(data) FILTER (WHERE type = 'ApiKeyCreated'))[1] AS created,
           min(recorded_at) FILTER (WHERE type = 'ApiKeyCreated') AS created_at,
           max(version * 2 + (type = 'ApiKeyEnabled')::int)
               FILTER (WHERE type IN ('ApiKeyEnabled', 'ApiKeyDisabled')) AS flip,
           max(lpad(version::text, 10, '0') || (data -> 'name')::text COLLATE "C")
               FILTER (WHERE type = 'ApiKeyUpdated' AND data ? 'name') AS name_set,
           max(lpad(version::text, 10, '0') || (data -> 'expiresAt')::text COLLATE "C")
               FILTER (WHERE type = 'ApiKeyUpdated' AND data ? 'expiresAt') AS expiry_set
    FROM events
    WHERE recorded_at <= %(at)s
    GROUP BY stream_id
), s AS (
    SELECT stream_id, created, created_at,
           coalesce(substr(name_set, 11)::jsonb, created -> 'name') #>> '{}' AS name,
           (coalesce(substr(expiry_set, 11)::jsonb, created -> 'expiresAt') #>> '{}')::timestamptz AS expires_at,
           CASE WHEN flip IS NULL THEN coalesce((created ->> 'enabled')::boolean, true) ELSE flip %% 2 = 1 END
               AS enabled
    FROM k
    WHERE created IS NOT NULL AND NOT revoked
)
SELECT stream_id, created ->> 'referenceId', name, created ->> 'start', created ->> 'prefix', expires_at, created_at
FROM s
WHERE enabled AND (expires_at IS NULL OR expires_at > %(at)s)
ORDER BY stream_id
"""


class ActiveKey(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    key_id: str
    reference_id: str
    name: str | None
    start: str | None
    prefix: str | None
    expires_at: dt.datetime | None
    created_at: dt.datetime


def parse_instant(text: str) -> dt.datetime:
    """ISO-8601; an instant without a zone is UTC (never the machine's local time)."""
    value = dt.datetime.fromisoformat(text.strip())
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def as_of(conn: psycopg.Connection[Any], at: dt.datetime) -> list[ActiveKey]:
    """The keys active at ``at``: created, not revoked, enabled and before their expiry, per the log."""
    with conn.transaction():
        conn.execute("SET LOCAL work_mem = '256MB'")
        rows = conn.execute(AS_OF, {"at": at}).fetchall()
    return [ActiveKey(key_id=r[0], reference_id=r[1], name=r[2], start=r[3], prefix=r[4], expires_at=r[5],
                      created_at=r[6]) for r in rows]


# ----------------------------------------------------------------------------------------------------------
# CLI: `keyledger replay`, `keyledger audit as-of|export|verify|head`
# ----------------------------------------------------------------------------------------------------------
def _connect(env: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(env.database_url, autocommit=True)


def _environment() -> Any:
    from .cli import Environment  # late: cli imports this module to register the commands

    return Environment(need_nats=False)


def cmd_as_of(args: argparse.Namespace) -> int:
    at = parse_instant(args.instant)
    env = _environment()
    try:
        with _connect(env) as conn:
            keys = as_of(conn, at)
    finally:
        env.stop()
    out = sys.stdout
    if args.json:
        encoder = msgspec.json.Encoder()
        buf = bytearray()
        for key in keys:
            encoder.encode_into(key, buf, len(buf))
            buf += b"\n"
        sys.stdout.buffer.write(buf)
    else:
        for key in keys:
            expires = key.expires_at.astimezone(dt.timezone.utc).isoformat() if key.expires_at else "never"
            out.write(f"{key.key_id}  owner={key.reference_id}  start={key.start}  expires={expires}  "
                      f"name={key.name!r}\n")
    print(f"keyledger: {len(keys):,} keys active at {at.isoformat()}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    since = parse_instant(args.since) if args.since else None
    until = parse_instant(args.until) if args.until else None
    env = _environment()
    try:
        with _connect(env) as conn:
            out = sys.stdout.buffer
            buf = bytearray()
            for line in export(conn, since, until, args.key):
                buf += line
                if len(buf) > 1 << 20:
                    out.write(buf)
                    buf.clear()
            out.write(buf)
            out.flush()
    finally:
        env.stop()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        anchor = parse_anchor(args.head) if args.head else None
    except ValueError as exc:
        print(f"keyledger: --head: {exc}", file=sys.stderr)
        return 2
    env = _environment()
    try:
        with _connect(env) as conn:
            if args.seal:
                with psycopg.connect(env.database_url, autocommit=True) as lead:
                    if try_lead(lead):
                        seal(lead)
            verdict = verify(conn, anchor)
    finally:
        env.stop()
    print(verdict.summary(), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def cmd_head(args: argparse.Namespace) -> int:
    env = _environment()
    try:
        with _connect(env) as conn:
            current = head(conn)
    finally:
        env.stop()
    if current is None:
        print("keyledger: the chain is empty (nothing sealed yet)", file=sys.stderr)
        return 1
    print(f"{current[0]}:{current[1]}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import PROJECTIONS, replay

    if args.projection not in PROJECTIONS:
        print(f"keyledger: unknown projection {args.projection!r} (known: {', '.join(PROJECTIONS)})",
              file=sys.stderr)
        return 2
    env = _environment()
    try:
        report = replay(env.database_url, args.projection, progress=not args.quiet)
    finally:
        env.stop()
    print(report.summary(), file=sys.stderr)
    return 0


def add_audit_commands(subparsers: Any) -> None:
    """Register ``replay`` and ``audit {as-of,export,verify,head}`` on keyledger's top-level subparsers."""
    p = subparsers.add_parser("replay", help="rebuild a projection from the event log (built aside, then swapped)")
    p.add_argument("--projection", default="active_api_keys")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    audit = subparsers.add_parser("audit", help="tamper-evident chain, exports and point-in-time queries")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    p = sub.add_parser("as-of", help="the keys active at an instant, from the log")
    p.add_argument("instant", help="ISO-8601; without a zone it is UTC")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_as_of)

    p = sub.add_parser("export", help="events as JSON lines with their chain hashes, in position order")
    p.add_argument("--since", help="recorded at or after (ISO-8601, inclusive)")
    p.add_argument("--until", help="recorded before (ISO-8601, exclusive)")
    p.add_argument("--key", help="only this key's events")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="recompute the chain from the events; exit 1 naming the first bad position")
    p.add_argument("--head", help="POSITION:HASH anchor (as published on <prefix>.audit.head)")
    p.add_argument("--seal", action="store_true", help="seal what is final first (when no sealer runs)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("head", help="print the chain head as POSITION:HASH")
    p.set_defaults(func=cmd_head)
