"""The write path: load a key's events, decide, append at the next version, project inline. One place.

A command costs two statements, two database round trips, on the hot path:

1. ``LOAD``: the caller's session and the key's stream, in one statement (``load``);
2. ``APPEND``: one statement that inserts the new events at ``version+1..`` and, for each, calls the
   ``active_api_keys`` projection function (``append``). A single statement is its own transaction: the
   events, their outbox rows (a trigger on ``events``) and the projection change commit together or not at
   all. (We measured the alternatives: a pipeline of BEGIN/INSERT/apply/COMMIT costs one event-loop wake-up
   per statement in psycopg, and ``transaction()`` adds two round trips.)

There is no global lock: the unique ``(stream_id, version)`` index is the concurrency check. Two concurrent
revokes of one key both decide ``ApiKeyRevoked`` at version n+1; one insert wins, the other fails with a
unique violation, re-reads the stream, sees the key revoked and answers 404. Per key, a later version can
only be written after the earlier one committed, so per-key order in the log is commit order too.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import random
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import PoolTimeout

from ..core.domain import Command, KeyState, decide, evolve, fold
from ..core.events import Event, RecordedEvent, decode_data, encode_data
from ..projections import active_keys
from .log import as_fold_input

_encoder = msgspec.json.Encoder()

Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection[Any]]]

# Insert the events (arrays in version order) and apply each to the projection, in one statement. The
# projection function aborts the statement (KL409) unless the key's projection was exactly one version behind,
# so a misordered or repeated application can never commit.
APPEND = """
WITH appended AS (
    INSERT INTO events (id, stream_id, version, type, data, metadata, recorded_at)
    SELECT * FROM unnest(%(id)s::uuid[], %(stream)s::text[], %(version)s::integer[], %(type)s::text[],
                         %(data)s::jsonb[], %(metadata)s::jsonb[], %(at)s::timestamptz[])
    RETURNING position, stream_id, version, type, data, recorded_at
)
SELECT position, keyledger_project_active_key(stream_id, version, type, data, recorded_at)
FROM appended
"""
# APPEND for the common case of one event (a revoke), with scalar parameters: psycopg dumps seven one-element
# arrays in ~30 us of Python per call against ~2 us for scalars (measured), and a revoke costs ~1 ms in all.
APPEND_ONE = """
WITH appended AS (
    INSERT INTO events (id, stream_id, version, type, data, metadata, recorded_at)
    VALUES (%(id)s::uuid, %(stream)s, %(version)s, %(type)s, %(data)s::jsonb, %(metadata)s::jsonb, %(at)s)
    RETURNING position, stream_id, version, type, data, recorded_at
)
SELECT position, keyledger_project_active_key(stream_id, version, type, data, recorded_at)
FROM appended
"""
# The same insert without the inline projection, for the slow path (the projection then catches up).
APPEND_ONLY = """
INSERT INTO events (id, stream_id, version, type, data, metadata, recorded_at)
SELECT * FROM unnest(%(id)s::uuid[], %(stream)s::text[], %(version)s::integer[], %(type)s::text[],
                     %(data)s::jsonb[], %(metadata)s::jsonb[], %(at)s::timestamptz[])
RETURNING position
"""

# The better-auth session (joined with its user for the ban; an expired session is no session) and the key's
# events in version order, as two JSON arrays in one row.
LOAD = """
SELECT
    (SELECT json_build_array(s.id, s."userId",
                             coalesce(u.banned, false) AND (u."banExpires" IS NULL OR u."banExpires" > now()))
     FROM session s JOIN "user" u ON u.id = s."userId"
     WHERE s.token = %(token)s AND s."expiresAt" > now())::text,
    (SELECT json_agg(json_build_array(e.id, e.version, e.position, e.recorded_at, e.type, e.data, e.metadata)
                     ORDER BY e.version)
     FROM events e WHERE e.stream_id = %(key)s)::text
"""

# A conflict means someone else appended to this key; each retry re-reads and re-decides, after a short random
# pause so that a crowd of writers on one key spreads out instead of colliding again in lockstep.
MAX_ATTEMPTS = 40
RETRY_PAUSE_S = 0.004


# The largest event (data + metadata as stored) an append accepts. The body limit (64 KiB) and the caps on what
# a request copies into metadata (app.py) keep every real event far below it; it is the last guard that keeps an
# event publishable whole under NATS's default 1 MB max_payload. (A broker set lower still gets the reduced form,
# relay.py.)
MAX_EVENT_BYTES = 256 * 1024

# Events appended by this process, by type (for /metrics).
APPENDED: collections.Counter[str] = collections.Counter()


class OutcomeUnknown(Exception):
    """The connection failed after the append was sent: it may have committed or not. ``execute`` finds out
    on another connection when it can (``resolve``); this escapes only when it could not tell in time."""

    def __init__(self, pending: list[RecordedEvent], backend_pid: int | None) -> None:
        super().__init__("the database connection failed after the change was sent")
        self.pending = pending
        self.backend_pid = backend_pid


class EventTooLarge(Exception):
    """An event over MAX_EVENT_BYTES: refused before anything is written (413)."""


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


class _StreamRow(msgspec.Struct, array_like=True):
    id: str
    version: int
    position: int
    recorded_at: dt.datetime
    type: str
    data: msgspec.Raw
    metadata: dict[str, Any]


_session_decoder = msgspec.json.Decoder(tuple[str, str, bool])
_stream_decoder = msgspec.json.Decoder(list[_StreamRow])


async def read_stream(conn: AsyncConnection[Any], key_id: str) -> list[RecordedEvent]:
    """A key's events in version order (the LOAD statement without a session)."""
    return (await load(conn, None, key_id))[1]


async def load(
    conn: AsyncConnection[Any], session_token: str | None, key_id: str | None
) -> tuple[Session | None, list[RecordedEvent]]:
    """The caller's session and the key's stream, in one statement."""
    cur = await conn.execute(LOAD, {"token": session_token, "key": key_id})
    session_json, stream_json = await cur.fetchone()
    session = Session(_session_decoder.decode(session_json)) if session_json else None
    stream = [
        RecordedEvent(id=r.id, stream_id=key_id, version=r.version, position=r.position, recorded_at=r.recorded_at,
                      metadata=r.metadata, event=decode_data(r.type, r.data))
        for r in (_stream_decoder.decode(stream_json) if stream_json else ())
    ]
    return session, stream


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


def _event_params(r: RecordedEvent) -> dict[str, Any]:
    """One event's column values, named as in APPEND_ONE."""
    data, metadata = encode_data(r.event), _encoder.encode(r.metadata)
    if len(data) + len(metadata) > MAX_EVENT_BYTES:
        raise EventTooLarge(f"the event would take {len(data) + len(metadata)} bytes (at most {MAX_EVENT_BYTES})")
    return {"id": r.id, "stream": r.stream_id, "version": r.version, "type": r.type,
            "data": data.decode(), "metadata": metadata.decode(), "at": r.recorded_at}


def _params(pending: list[RecordedEvent]) -> dict[str, list[Any]]:
    """The same values as arrays, one element per event, for APPEND and APPEND_ONLY."""
    rows = [_event_params(r) for r in pending]
    return {name: [row[name] for row in rows] for name in rows[0]}


def _with_positions(pending: list[RecordedEvent], positions: list[int]) -> list[RecordedEvent]:
    return [msgspec.structs.replace(r, position=p) for r, p in zip(pending, positions)]


def _conflict(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == "events_stream_version_key"


async def _append_fast(conn: AsyncConnection[Any], pending: list[RecordedEvent]) -> list[RecordedEvent]:
    params = _event_params(pending[0]) if len(pending) == 1 else _params(pending)  # EventTooLarge before I/O
    backend = conn.info.backend_pid
    try:
        cur = await conn.execute(APPEND_ONE if len(pending) == 1 else APPEND, params)
        positions = [row[0] for row in await cur.fetchall()]
    except psycopg.Error as exc:
        if _conflict(exc):
            raise ConcurrencyConflict() from exc
        if exc.sqlstate == "KL409":
            raise ProjectionBehind() from exc
        if conn.broken or conn.closed:  # no answer from the server: it may have committed
            raise OutcomeUnknown(pending, backend) from exc
        raise
    return _with_positions(pending, positions)


async def _append_catching_up(conn: AsyncConnection[Any], pending: list[RecordedEvent]) -> list[RecordedEvent]:
    # Slow path, only after a projection rebuild or for keys whose earlier events were never projected
    # inline: append, then let the projection catch up from the log (our own events included) under its
    # per-key lock. Still one transaction, so the 200 still means "verify already agrees".
    backend = conn.info.backend_pid
    try:
        async with conn.transaction():
            cur = await conn.execute(APPEND_ONLY, _params(pending))
            positions = [row[0] for row in await cur.fetchall()]
            await active_keys.catch_up(conn, pending[0].stream_id, pending[-1].version)
    except psycopg.Error as exc:
        if _conflict(exc):
            raise ConcurrencyConflict() from exc
        if conn.broken or conn.closed:
            raise OutcomeUnknown(pending, backend) from exc
        raise
    return _with_positions(pending, positions)


# Finding out what became of an append whose connection failed: the backend that ran it must be gone (a network
# cut can leave it running, about to commit), then the events' ids say whether it committed, all or nothing.
BACKEND_ALIVE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s"
COMMITTED = "SELECT position FROM events WHERE id = ANY(%s::uuid[]) ORDER BY version"
RESOLVE_WITHIN_S = 3.0


async def resolve(unknown: OutcomeUnknown, connect: Connect, *, within: float = RESOLVE_WITHIN_S) -> list[int] | None:
    """The positions the events got if the append committed, ``[]`` if it certainly did not, ``None`` if that
    could not be found out within ``within`` seconds (the database unreachable meanwhile)."""
    deadline = time.monotonic() + within
    ids = [r.id for r in unknown.pending]
    while True:
        try:
            async with connect() as conn:
                if unknown.backend_pid is not None:
                    while await (await conn.execute(BACKEND_ALIVE, (unknown.backend_pid,))).fetchone():
                        if time.monotonic() > deadline:
                            return None
                        await asyncio.sleep(0.01)  # terminated: wait until it has left
                rows = await (await conn.execute(COMMITTED, (ids,))).fetchall()
                return [r[0] for r in rows]
        except psycopg.errors.InsufficientPrivilege:
            return None  # may not end that backend (another role): cannot be sure
        except (psycopg.OperationalError, PoolTimeout):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)


async def execute(
    conn: AsyncConnection[Any],
    command: Command,
    key_id: str,
    metadata: dict[str, Any],
    loaded: list[RecordedEvent] | None = None,
    *,
    connect: Connect | None = None,
) -> tuple[KeyState | None, list[RecordedEvent]]:
    """Decide and append ``command`` for ``key_id``, retrying on concurrent appends.

    Returns the key's new state and the recorded events (empty when the command changed nothing).
    Domain errors (``KeyNotFound``...) propagate unchanged and nothing is written.

    Truthful outcomes: when the connection fails after the append was sent, nobody knows whether it committed.
    With ``connect`` (a way to get another connection), ``execute`` finds out (``resolve``): committed, it
    returns as if nothing had failed; certainly not, it raises the connection's error ("nothing was changed");
    cannot tell in time, it raises ``OutcomeUnknown``. Without ``connect`` it raises ``OutcomeUnknown`` at once.
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
        except OutcomeUnknown as unknown:
            positions = await resolve(unknown, connect) if connect is not None else None
            if positions is None:
                raise
            if not positions:
                raise unknown.__cause__ or unknown  # certainly not committed: nothing was changed
            recorded = _with_positions(unknown.pending, positions)
        for r in recorded:
            state = evolve(state, r.event, key_id=key_id, version=r.version, at=r.recorded_at)
            APPENDED[r.type] += 1
        return state, recorded
    raise ConcurrencyConflict(f"gave up on key {key_id} after {MAX_ATTEMPTS} conflicting attempts")
