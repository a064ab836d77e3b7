"""Decoding rows of the event log. A key's stream is read by ``store.load`` (one statement, with the
caller's session on the hot path); the relay reads events by position through ``EVENT_COLUMNS``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..core.events import RecordedEvent, decode_data

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


def as_fold_input(events: list[RecordedEvent]) -> list[tuple[int, dt.datetime, Any]]:
    return [(e.version, e.recorded_at, e.event) for e in events]
