"""The write path: load a key's events, decide, append at the next version, project inline. One place.

A command costs two database round trips on the hot path:

1. one pipelined read of the caller's session and of the key's stream (``load``);
2. one pipelined transaction: ``BEGIN``, ``INSERT`` the new events at ``version+1..``, apply the
   ``active_api_keys`` projection to them, ``COMMIT`` (``append``), flushed with a single Sync. The outbox
   row is written by a trigger on ``events``.

There is no global lock: the unique ``(stream_id, version)`` index is the concurrency check. Two concurrent
revokes of one key both decide ``ApiKeyRevoked`` at version n+1; one insert wins, the other fails with a
unique violation, re-reads the stream, sees the key revoked and answers 404. Per key, a later version can
only be written after the earlier one committed, so per-key order in the log is commit order too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from typing import Any

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from .domain import Command, KeyState, decide, evolve, fold
from .events import Event, RecordedEvent, encode_data
from .log import READ_STREAM, as_fold_input, read_stream, row_to_event
from .projections import active_keys

APPEND = """
INSERT INTO events (id, stream_id, version, type, data, metadata, recorded_at)
VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s)
RETURNING position
"""

# The better-auth session, joined with its user for the ban. An expired session is no session.
SESSION_QUERY = """
SELECT s.id, s."userId",
       coalesce(u.banned, false) AND (u."banExpires" IS NULL OR u."banExpires" > now()) AS banned
FROM session s JOIN "user" u ON u.id = s."userId"
WHERE s.token = %s AND s."expiresAt" > now()
"""

# A conflict means someone else appended to this key; each retry re-reads and re-decides, after a short random
# pause so that a crowd of writers on one key spreads out instead of colliding again in lockstep.
MAX_ATTEMPTS = 40
RETRY_PAUSE_S = 0.004


class ConcurrencyConflict(Exception):
    """Another writer appended to the key between our read and our append (409 if retries run out)."""


class ProjectionBehind(Exception):
    """The inline projection is not at the version before ours (a rebuild, or events it never saw)."""


class Session(tuple):  # (session_id, user_id, banned)
    @property
    def id(self) -> str:
        return self[0]

    @property
    def user_id(self) -> str:
        return self[1]

    @property
    def banned(self) -> bool:
        return bool(self[2])


async def load(
    conn: AsyncConnection[Any], session_token: str | None, key_id: str | None
) -> tuple[Session | None, list[RecordedEvent]]:
    """The caller's session and the key's stream, in one round trip (pipeline)."""
    async with conn.pipeline():
        session_cur = await conn.execute(SESSION_QUERY, (session_token,)) if session_token else None
        stream_cur = await conn.execute(READ_STREAM, (key_id, 0)) if key_id else None
        row = await session_cur.fetchone() if session_cur else None
        rows = await stream_cur.fetchall() if stream_cur else []
    return (Session(row) if row else None), [row_to_event(r) for r in rows]


async def load_session(conn: AsyncConnection[Any], session_token: str | None) -> Session | None:
    if not session_token:
        return None
    cur = await conn.execute(SESSION_QUERY, (session_token,))
    row = await cur.fetchone()
    return Session(row) if row else None


def _state(events: list[RecordedEvent], key_id: str) -> KeyState | None:
    return fold(as_fold_input(events), key_id)


async def append(
    conn: AsyncConnection[Any],
    key_id: str,
    expected_version: int,
    events: list[Event],
    metadata: dict[str, Any],
    at: dt.datetime,
) -> list[RecordedEvent]:
    """Append ``events`` after ``expected_version`` and apply them to the projection, atomically."""
    pending = [
        RecordedEvent(
            id=str(uuid.uuid4()),
            stream_id=key_id,
            version=expected_version + i,
            position=0,  # assigned by the INSERT below; projections never read it
            recorded_at=at,
            metadata=metadata,
            event=event,
        )
        for i, event in enumerate(events, start=1)
    ]
    try:
        return await _append_fast(conn, pending)
    except ProjectionBehind:
        return await _append_catching_up(conn, pending)


async def _insert(conn: AsyncConnection[Any], pending: list[RecordedEvent]) -> list[psycopg.AsyncCursor[Any]]:
    cursors = []
    for r in pending:
        cursors.append(
            await conn.execute(
                APPEND,
                (r.id, r.stream_id, r.version, r.type, encode_data(r.event).decode(), Jsonb(r.metadata), r.recorded_at),
            )
        )
    return cursors


def _with_positions(pending: list[RecordedEvent], positions: list[int]) -> list[RecordedEvent]:
    return [msgspec.structs.replace(r, position=p) for r, p in zip(pending, positions)]


async def _append_fast(conn: AsyncConnection[Any], pending: list[RecordedEvent]) -> list[RecordedEvent]:
    # One network round trip: BEGIN, the INSERTs, the projection updates and COMMIT are queued in a pipeline
    # and flushed with a single Sync. (psycopg's transaction() would sync after BEGIN and after COMMIT too:
    # three round trips instead of one, measured with a libpq trace.) On any error the server skips the rest,
    # COMMIT included, so nothing is written; we then roll the aborted transaction back.
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            cursors = await _insert(conn, pending)
            for r in pending:
                await active_keys.apply(conn, r)
            await conn.execute("COMMIT")
        positions = [(await c.fetchone())[0] for c in cursors]
    except psycopg.Error as exc:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            # conn.rollback(), not execute("ROLLBACK"): psycopg reacts to a ROLLBACK *result* by dropping its
            # prepared-statement cache and queueing a DEALLOCATE ALL that can land in the next pipeline after
            # a fresh Parse ("prepared statement _pg3_N does not exist"). Server-side prepared statements
            # survive a rollback, so there is nothing to forget.
            await conn.rollback()
        if isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == "events_stream_version_key":
            raise ConcurrencyConflict() from exc
        if exc.sqlstate == "KL409":
            raise ProjectionBehind() from exc
        raise
    return _with_positions(pending, positions)


async def _append_catching_up(conn: AsyncConnection[Any], pending: list[RecordedEvent]) -> list[RecordedEvent]:
    # Slow path, only after a projection rebuild or for keys whose earlier events were never projected
    # inline: append, then let the projection catch up from the log (our own events included) under its
    # per-key lock. Still one transaction, so the 200 still means "verify already agrees".
    try:
        async with conn.transaction():
            cursors = await _insert(conn, pending)
            positions = [(await c.fetchone())[0] for c in cursors]
            await active_keys.catch_up(conn, pending[0].stream_id, pending[-1].version)
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "events_stream_version_key":
            raise ConcurrencyConflict() from exc
        raise
    return _with_positions(pending, positions)


async def execute(
    conn: AsyncConnection[Any],
    command: Command,
    key_id: str,
    metadata: dict[str, Any],
    loaded: list[RecordedEvent] | None = None,
) -> tuple[KeyState | None, list[RecordedEvent]]:
    """Decide and append ``command`` for ``key_id``, retrying on concurrent appends.

    Returns the key's new state and the recorded events (empty when the command changed nothing).
    Domain errors (``KeyNotFound``...) propagate unchanged and nothing is written.
    """
    stream = loaded
    for _ in range(MAX_ATTEMPTS):
        if stream is None:
            stream = await read_stream(conn, key_id)
        state = _state(stream, key_id)
        new_events = decide(command, state)
        if not new_events:
            return state, []
        version = state.version if state else 0
        try:
            recorded = await append(conn, key_id, version, new_events, metadata, command.now)
        except ConcurrencyConflict:
            stream = None  # someone else won: re-read and decide again
            await asyncio.sleep(random.uniform(0, RETRY_PAUSE_S))
            continue
        for r in recorded:
            state = evolve(state, r.event, key_id=key_id, version=r.version, at=r.recorded_at)
        return state, recorded
    raise ConcurrencyConflict(f"gave up on key {key_id} after {MAX_ATTEMPTS} conflicting attempts")
