"""Reading the event log (the source of truth). Writing it is ``store.py``'s job.

Every query on the log is a named constant here so a reader can see the SQL in one place.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from psycopg import AsyncConnection

from .events import RecordedEvent, decode_data

# A key's stream, in version order, optionally after a version we already have.
READ_STREAM = """
SELECT id::text, stream_id, version, position, recorded_at, type, data::text, metadata
FROM events
WHERE stream_id = %s AND version > %s
ORDER BY version
"""

# Recorded events by position, for the relay (joined with the outbox) and for history.
EVENT_COLUMNS = "e.id::text, e.stream_id, e.version, e.position, e.recorded_at, e.type, e.data::text, e.metadata"


def row_to_event(row: tuple[Any, ...]) -> RecordedEvent:
    event_id, stream_id, version, position, recorded_at, event_type, data, metadata = row
    return RecordedEvent(
        id=event_id,
        stream_id=stream_id,
        version=version,
        position=position,
        recorded_at=recorded_at,
        metadata=metadata or {},
        event=decode_data(event_type, data),
    )


async def read_stream(conn: AsyncConnection[Any], stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
    cur = await conn.execute(READ_STREAM, (stream_id, after_version))
    return [row_to_event(row) for row in await cur.fetchall()]


def as_fold_input(events: list[RecordedEvent]) -> list[tuple[int, dt.datetime, Any]]:
    return [(e.version, e.recorded_at, e.event) for e in events]
