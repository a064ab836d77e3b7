"""What runs inside one ``keyledger serve`` process besides the HTTP handlers, and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from .bus import Bus
from .config import Settings
from .relay import OutboxRelay

log = logging.getLogger("keyledger")

SCHEMA_PATH = Path(__file__).with_name("schema.sql")

# jsonb parameters and results through msgspec rather than the stdlib json module: same JSON, less CPU on
# the hot path (event metadata is a jsonb parameter of every append).
set_json_dumps(msgspec.json.encode)
set_json_loads(msgspec.json.decode)
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('keyledger.migrate', 0))"


def migrate(database_url: str) -> None:
    """Apply schema.sql in one transaction (every statement is idempotent); concurrent starts serialise."""
    sql = SCHEMA_PATH.read_text()
    with psycopg.connect(database_url, autocommit=False) as conn:
        conn.execute(MIGRATION_LOCK)
        conn.execute(sql)
        conn.commit()


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = AsyncConnectionPool(
            settings.database_url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            kwargs={"autocommit": True, "connect_timeout": 3},
            timeout=5.0,
            open=False,
        )
        self.bus = Bus(settings.nats_url, settings.topology)
        self.relay = OutboxRelay(settings.database_url, self.bus)
        self._tasks: list[asyncio.Task[Any]] = []

    def nudge_relay(self) -> None:
        self.relay.nudge()

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=15)
        self.bus.start()
        if self.settings.run_relay:
            self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        if self.settings.run_projections:
            from .projections.subscriber import ActiveKeysSubscriber

            from .projections.invalidations import InvalidationProjection

            sub = ActiveKeysSubscriber(self.settings.database_url, self.bus)
            self._tasks.append(asyncio.create_task(sub.run(), name="projection-active-keys"))
            invalidations = InvalidationProjection(self.bus)
            self._tasks.append(asyncio.create_task(invalidations.run(), name="projection-invalidations"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.bus.close()
        await self.pool.close()
