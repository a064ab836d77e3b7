"""The ``active_api_keys`` projection: the table verification and the dashboard read.

One ``apply`` function, two call sites:

* inline, inside the transaction that appends the event (``keyledger.store``), so that the moment delete
  answers 200 the key is gone from this table and verify says ``valid: false``, with no window;
* the NATS subscriber (``keyledger.projections.subscriber``), which consumes the event stream and calls
  ``catch_up``, for events written by anyone who did not apply them inline and after a rebuild.

Exactly-once effect: ``apply`` advances ``projection_tracking`` for the key from version-1 to version in the
same transaction as the row change (``keyledger_advance`` in schema.sql raises otherwise, aborting the
transaction). An event the projection already has is skipped; a gap (NATS delivered v3 while we are at v1)
is filled from the log, in version order, never from the order NATS happened to deliver.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from msgspec import UNSET

from ..events import (
    ApiKeyCreated,
    ApiKeyDisabled,
    ApiKeyEnabled,
    ApiKeyRevoked,
    ApiKeyUpdated,
    RecordedEvent,
)
from ..log import read_stream

NAME = "active_api_keys"

INSERT_KEY = """
INSERT INTO active_api_keys (
    id, key_hash, config_id, reference_id, name, start, prefix, enabled, expires_at,
    rate_limit_enabled, rate_limit_time_window, rate_limit_max, refill_interval, refill_amount, remaining,
    permissions, metadata, created_at, updated_at, version)
VALUES (%(id)s, %(key_hash)s, %(config_id)s, %(reference_id)s, %(name)s, %(start)s, %(prefix)s, %(enabled)s,
    %(expires_at)s, %(rate_limit_enabled)s, %(rate_limit_time_window)s, %(rate_limit_max)s, %(refill_interval)s,
    %(refill_amount)s, %(remaining)s, %(permissions)s, %(metadata)s, %(at)s, %(at)s, %(version)s)
"""
SET_ENABLED = "UPDATE active_api_keys SET enabled = %s, updated_at = %s, version = %s WHERE id = %s"
DELETE_KEY = "DELETE FROM active_api_keys WHERE id = %s"
# ApiKeyUpdated carries only changed fields; each present field sets its column.
UPDATABLE_COLUMNS = {"name": "name", "expires_at": "expires_at", "metadata": "metadata"}
ADVANCE = "SELECT keyledger_advance(%s, %s, %s)"
# A transaction-scoped lock per (projection, key): the tracking row may not exist yet (first event), so a
# row lock alone could not serialise two subscribers catching up the same new key.
LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtextextended(%s || '/' || %s, 0))"
TRACKED_VERSION = "SELECT version FROM projection_tracking WHERE projection = %s AND stream_id = %s FOR UPDATE"
# One primary-key lookup per key (a generic plan for "stream_id = ANY(...)" filtered every tracked row).
TRACKED_VERSIONS = """
SELECT t.stream_id, t.version
FROM unnest(%s::text[]) AS k(stream_id)
JOIN projection_tracking t ON t.projection = %s AND t.stream_id = k.stream_id
"""


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def apply(conn: AsyncConnection[Any], recorded: RecordedEvent, projection: str = NAME) -> None:
    """Apply one event. Must run inside a transaction; safe to call in pipeline mode (fetches nothing).

    ``projection`` names the tracking rows; a rebuild uses another name and another table (see replay).
    """
    event, key_id, at = recorded.event, recorded.stream_id, recorded.recorded_at
    if isinstance(event, ApiKeyCreated):
        await conn.execute(
            INSERT_KEY,
            {
                "id": key_id,
                "key_hash": event.key_hash,
                "config_id": event.config_id,
                "reference_id": event.reference_id,
                "name": event.name,
                "start": event.start,
                "prefix": event.prefix,
                "enabled": event.enabled,
                "expires_at": event.expires_at,
                "rate_limit_enabled": event.rate_limit_enabled,
                "rate_limit_time_window": event.rate_limit_time_window,
                "rate_limit_max": event.rate_limit_max,
                "refill_interval": event.refill_interval,
                "refill_amount": event.refill_amount,
                "remaining": event.remaining,
                "permissions": _json(event.permissions),
                "metadata": _json(event.metadata),
                "at": at,
                "version": recorded.version,
            },
        )
    elif isinstance(event, ApiKeyUpdated):
        sets, params = ["updated_at = %s", "version = %s"], [at, recorded.version]
        for field, column in UPDATABLE_COLUMNS.items():
            value = getattr(event, field)
            if value is not UNSET:
                sets.append(f"{column} = %s")
                params.append(_json(value) if field == "metadata" else value)
        await conn.execute(f"UPDATE active_api_keys SET {', '.join(sets)} WHERE id = %s", [*params, key_id])
    elif isinstance(event, (ApiKeyDisabled, ApiKeyEnabled)):
        await conn.execute(SET_ENABLED, (isinstance(event, ApiKeyEnabled), at, recorded.version, key_id))
    elif isinstance(event, ApiKeyRevoked):
        await conn.execute(DELETE_KEY, (key_id,))
    # The tracking advance comes last and fails the transaction unless we were exactly one version behind.
    await conn.execute(ADVANCE, (projection, key_id, recorded.version))


async def catch_up(conn: AsyncConnection[Any], key_id: str, upto_version: int, projection: str = NAME) -> int:
    """Bring one key's projection up to ``upto_version`` from the log. Returns how many events were applied.

    Runs in its own transaction and locks the key's tracking row first, so the inline writer and any
    number of subscribers serialise per key and never apply an event twice.
    """
    async with conn.transaction():
        await conn.execute(LOCK_KEY, (projection, key_id))
        cur = await conn.execute(TRACKED_VERSION, (projection, key_id))
        row = await cur.fetchone()
        current = row[0] if row else 0
        if current >= upto_version:
            return 0
        pending = [e for e in await read_stream(conn, key_id, current) if e.version <= upto_version]
        for recorded in pending:
            await apply(conn, recorded, projection)
        return len(pending)


async def tracked_versions(conn: AsyncConnection[Any], key_ids: list[str], projection: str = NAME) -> dict[str, int]:
    cur = await conn.execute(TRACKED_VERSIONS, (key_ids, projection))
    return dict(await cur.fetchall())
