"""``lastRequest`` for keys without limits, written in batches so that verifying them stays one read.

A key with a usage or rate limit is counted by verify itself (``keyledger_verify_key``, schema.sql, under a row
lock). A key without limits writes nothing on verify: that is what keeps plain verify fast. Its owner still
wants to see whether it is in use, so each process remembers, in memory, the latest successful verify of every
such key (``note``: a dict assignment, no I/O) and writes them all about once a second in ONE statement
(``keyledger_touch_keys``: an upsert over ``unnest`` that keeps the later time), plus a last flush on shutdown.

Bounded staleness: ``lastRequest`` in get/list lags by up to the flush interval (``KEYLEDGER_LAST_REQUEST_FLUSH_S``,
1 s by default), plus a flush's own duration; a crash (SIGKILL, power loss) loses at most the last interval's
times, and like every counter they skip the WAL flush wait (synchronous_commit off). A database outage only
delays them: a batch that fails is merged back and retried at the next tick. Several processes (``--workers``)
each flush their own map; the upsert keeps the latest time whoever writes last. Only key ids and timestamps are
kept, never a key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

log = logging.getLogger("keyledger.usage")

DEFAULT_FLUSH_S = 1.0
# One statement per flush, whatever the batch size (schema.sql says why each row is or is not written).
TOUCH_KEYS = "SELECT keyledger_touch_keys(%s::text[], %s::timestamptz[])"


class LastRequests:
    """key id -> latest successful verify of a key without limits, flushed every ``interval`` seconds."""

    def __init__(self, pool: Any, interval: float = DEFAULT_FLUSH_S) -> None:
        self.pool = pool
        self.interval = interval
        self._pending: dict[str, dt.datetime] = {}
        self.flushed = 0  # rows written so far (diagnostics and tests)

    def note(self, key_id: str, at: dt.datetime) -> None:
        """Called by verify for a valid key without limits: no I/O, no await."""
        self._pending[key_id] = at

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> int:
        """Write every pending time in one statement; on failure keep them for the next try."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        ids = sorted(batch)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(TOUCH_KEYS, (ids, [batch[i] for i in ids]))
                written = (await cur.fetchone())[0]
        except asyncio.CancelledError:
            self._merge(batch)
            raise
        except Exception as exc:
            self._merge(batch)
            log.warning("lastRequest flush of %d key(s) failed (%s); retrying next tick", len(batch),
                        type(exc).__name__)
            return 0
        self.flushed += written
        return written

    def _merge(self, batch: dict[str, dt.datetime]) -> None:
        for key_id, at in batch.items():
            newer = self._pending.get(key_id)
            if newer is None or newer < at:
                self._pending[key_id] = at
