"""The expiry sweeper: records ``ApiKeyExpired`` once per key when its ``expiresAt`` has passed, and
``ApiKeySecretRetired`` once per superseded secret when its rotation grace period has ended.

Verify refuses an expired key (or a superseded secret) from its deadline on, event or no event; the events are
for everyone who is not calling verify: projections, caches (the invalidation projection turns them into
reasons ``expired`` and ``rotated``), auditors.

Exactly once, even with several sweepers: the sweeper runs an ordinary domain command (``ExpireKey``)
through the write path, whose per-key version check lets one append win; the loser re-reads the key, finds it
already expired, and records nothing. The candidates come from the projection (a partial index on deadlines
not yet recorded; the superseded secrets by their deadline), the decision from the log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from ..core.domain import Command, ExpireKey, RetireSecret
from ..storage import store
from ..storage.connections import long_lived

log = logging.getLogger("keyledger.sweeper")

DUE = """
SELECT id FROM active_api_keys
WHERE NOT expired AND expires_at <= %s
ORDER BY expires_at
LIMIT %s
"""
GRACE_ENDED = """
SELECT key_id, key_hash FROM superseded_key_secrets
WHERE valid_until <= %s
ORDER BY valid_until
LIMIT %s
"""
ACTOR = {"userId": None, "sessionId": None, "via": "expiry-sweeper"}


async def sweep_once(conn: psycopg.AsyncConnection[Any], *, batch: int = 500,
                     fence: Callable[[], None] = lambda: None) -> int:
    """Record ApiKeyExpired for every key whose deadline passed and ApiKeySecretRetired for every superseded
    secret whose grace ended; returns how many events this call recorded."""
    recorded = 0
    for query, command in ((DUE, _expire), (GRACE_ENDED, _retire)):
        while True:
            now = dt.datetime.now(dt.timezone.utc)
            due = await (await conn.execute(query, (now, batch))).fetchall()
            before = recorded
            for row in due:
                fence()  # a deposed leader records nothing more (a late one would be a no-op anyway)
                _, events = await store.execute(conn, command(now, *row), row[0], ACTOR)
                recorded += len(events)
            if len(due) < batch or recorded == before:  # a full batch that changed nothing would repeat
                break
    return recorded


def _expire(now: dt.datetime, key_id: str) -> Command:
    return ExpireKey(actor_id="system", now=now, key_id=key_id)


def _retire(now: dt.datetime, key_id: str, key_hash: str) -> Command:
    return RetireSecret(actor_id="system", now=now, key_id=key_id, key_hash=key_hash)


class ExpirySweeper:
    def __init__(self, database_url: str, *, interval: float = 1.0, on_recorded: Any = None,
                 fence: Callable[[], None] = lambda: None) -> None:
        self.database_url = database_url
        self.fence = fence
        self.interval = interval
        self.on_recorded = on_recorded  # called after a pass that recorded something (nudges the relay)
        self.recorded = 0

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                                 **long_lived(self.database_url,
                                                                              name="expiry sweeper")) as conn:
                    while True:
                        count = await sweep_once(conn, fence=self.fence)
                        if count:
                            self.recorded += count
                            log.info("recorded %d expirations", count)
                            if self.on_recorded:
                                self.on_recorded()
                        await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("expiry sweeper: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(self.interval)
