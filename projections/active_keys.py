"""The ``active_api_keys`` projection: the table verification and the dashboard read.

The projection's rules are one SQL function, ``keyledger_project_active_key`` in schema.sql, with two call
sites and no twin:

* inline, inside the statement that appends the event (``keyledger.storage.store.APPEND``), so that the moment delete
  answers 200 the key is gone from this table and verify says ``valid: false``, with no window, and at no
  extra round trip;
* the NATS subscriber (``keyledger.projections.subscriber``), through ``catch_up`` below, for events written
  by anyone who did not apply them inline, and after a rebuild.

Exactly-once effect: the function advances ``projection_tracking`` for the key from version-1 to version in
the same transaction as the row change (``keyledger_advance`` raises otherwise, aborting the transaction). An
event the projection already has is skipped; a gap (NATS delivered v3 while we are at v1) is filled from the
log, in version order, never from the order NATS happened to deliver.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection


NAME = "active_api_keys"

# Apply a key's events after the tracked version, up to a version, straight from the log, in version order.
CATCH_UP = """
SELECT keyledger_project_active_key(e.stream_id, e.version, e.type, e.data, e.recorded_at)
FROM (SELECT * FROM events WHERE stream_id = %s AND version > %s AND version <= %s ORDER BY version) e
"""
# A transaction-scoped lock per (projection, key): the tracking row may not exist yet (first event), so a
# row lock alone could not serialise two subscribers catching up the same new key.
LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtextextended(%s || '/' || %s, 0))"
TRACKED_VERSION = "SELECT version FROM projection_tracking WHERE projection = %s AND stream_id = %s FOR UPDATE"
# One primary-key lookup per key, whatever plan the prepared statement gets: a join against unnest() let the
# generic plan scan every tracked key of the projection (measured: 0.7 ms per batch at 2,000 keys, growing).
TRACKED_VERSIONS = """
SELECT k.stream_id,
       (SELECT t.version FROM projection_tracking t WHERE t.projection = %s AND t.stream_id = k.stream_id)
FROM unnest(%s::text[]) AS k(stream_id)
"""


async def catch_up(conn: AsyncConnection[Any], key_id: str, upto_version: int) -> int:
    """Bring one key's projection up to ``upto_version`` from the log. Returns how many events were applied.

    Runs in its own transaction and locks the key's tracking row first, so the inline writer and any
    number of subscribers serialise per key and never apply an event twice.
    """
    async with conn.transaction():
        await conn.execute(LOCK_KEY, (NAME, key_id))
        cur = await conn.execute(TRACKED_VERSION, (NAME, key_id))
        row = await cur.fetchone()
        current = row[0] if row else 0
        if current >= upto_version:
            return 0
        cur = await conn.execute(CATCH_UP, (key_id, current, upto_version))
        return cur.rowcount


async def tracked_versions(conn: AsyncConnection[Any], key_ids: list[str]) -> dict[str, int]:
    cur = await conn.execute(TRACKED_VERSIONS, (NAME, key_ids))
    return {key_id: version for key_id, version in await cur.fetchall() if version is not None}
