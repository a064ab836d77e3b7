"""What runs inside one ``keyledger serve`` process besides the HTTP handlers, and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from .bus import Bus
from .config import PG_KEEPALIVES, Settings
from .relay import OutboxRelay
from .usage import LastRequests
from .schema import migrate  # noqa: F401  (re-exported: keyledger.runtime.migrate)

log = logging.getLogger("keyledger")

# jsonb parameters and results through msgspec rather than the stdlib json module: same JSON, less CPU on
# the hot path (event metadata is a jsonb parameter of every append).
set_json_dumps(msgspec.json.encode)
set_json_loads(msgspec.json.decode)


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    """Check a pooled connection before use, without a round trip unless something looks wrong.

    A PostgreSQL restart breaks every idle connection in the pool; unchecked, the next requests would get them
    and answer 503 although the database is back. A full check on every checkout would add a round trip to
    the hot path. But an idle connection has nothing to read unless the server spoke first (a termination
    notice, or the socket closed): so we peek at the socket, and only then run the real check, which fails and
    makes the pool discard the connection.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        await AsyncConnectionPool.check_connection(conn)


BACKGROUND_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('keyledger.background', 0))"


class Runtime:
    """One process's share of the service: the HTTP pool, and, in exactly one process, the background work.

    Several processes (``serve --workers N``, or several hosts) can serve the API at once. The outbox relay
    and the NATS subscribers run in one of them only: whoever holds the ``keyledger.background`` advisory
    lock (held by a dedicated connection; if that process dies, the lock is released and another takes
    over within a second). One relay keeps batches in position order; one puller per durable consumer keeps
    the subscribers' batch acknowledgements (AckAll) safe.

    After a commit, a handler nudges the relay so publication does not wait for its next poll: directly when
    the relay runs in this process, otherwise with an empty core-NATS message on ``<prefix>.internal.wake``
    that the leader listens to. The ping carries nothing; losing it only delays publication to the next poll.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = AsyncConnectionPool(
            settings.database_url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            kwargs={"autocommit": True, "connect_timeout": 3, **PG_KEEPALIVES},
            timeout=5.0,
            check=_check_if_idle,
            # psycopg_pool's reconnect backoff doubles up to reconnect_timeout (300 s by default): after a 30 s
            # outage the service stayed 503 for 27 s with the database back. A short timeout ends a failing
            # attempt early; the next request starts a fresh one.
            reconnect_timeout=10.0,
            open=False,
        )
        self.bus = Bus(settings.nats_url, settings.topology)
        self.relay = OutboxRelay(settings.database_url, self.bus, poll_interval=settings.relay_poll_s)
        # lastRequest of keys without limits: noted by verify in memory, written in batches (usage.py).
        self.last_requests = LastRequests(self.pool, settings.last_request_flush_s)
        self._flusher: asyncio.Task[Any] | None = None
        self.leader = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._wake_subject = f"{settings.topology.prefix}.internal.wake"

    def nudge_relay(self) -> None:
        if self.leader:
            self.relay.nudge()
        elif self.bus.connected:  # the relay runs in another process (also when this one never leads)
            asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(self._wake_subject, b"")  # type: ignore[union-attr]

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=15)
        self._flusher = asyncio.create_task(self.last_requests.run(), name="last-request-flusher")
        self.bus.start()
        if self.settings.run_relay or self.settings.run_projections:
            self._tasks.append(asyncio.create_task(self._background(), name="background-leader"))

    async def _background(self) -> None:
        """Become the background leader (or wait to), run the relay and subscribers, step down on failure."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.settings.database_url, autocommit=True,
                                                                 **PG_KEEPALIVES) as conn:
                    while not (await (await conn.execute(BACKGROUND_LOCK)).fetchone())[0]:
                        await asyncio.sleep(1.0)
                    await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("background work stopped (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(1.0)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        from .projections.invalidations import InvalidationProjection
        from .projections.subscriber import ActiveKeysSubscriber

        workers: list[asyncio.Task[Any]] = []
        if self.settings.run_relay:
            workers.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        if self.settings.run_projections:
            sub = ActiveKeysSubscriber(self.settings.database_url, self.bus)
            workers.append(asyncio.create_task(sub.run(), name="projection-active-keys"))
            workers.append(asyncio.create_task(InvalidationProjection(self.bus).run(), name="projection-invalidations"))
        if self.settings.run_projections:
            from .sweeper import ExpirySweeper

            sweeper = ExpirySweeper(self.settings.database_url, on_recorded=self.relay.nudge)
            workers.append(asyncio.create_task(sweeper.run(), name="expiry-sweeper"))
        if self.settings.run_relay:
            from .audit import AuditSealer

            sealer = AuditSealer(self.settings.database_url, self.bus)
            workers.append(asyncio.create_task(sealer.run(), name="audit-sealer"))
        workers.append(asyncio.create_task(self._listen_for_wake(), name="relay-wake"))
        self.leader = True
        try:
            while True:  # hold the lock; a broken connection means another process may lead now
                await asyncio.sleep(2.0)
                await conn.execute("SELECT 1")
        finally:
            self.leader = False
            for task in workers:
                task.cancel()
            for task in workers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _listen_for_wake(self) -> None:
        await self.bus.ready()
        while True:
            try:
                sub = await self.bus.nc.subscribe(self._wake_subject)  # type: ignore[union-attr]
                async for _ in sub.messages:
                    self.relay.nudge()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._flusher is not None:  # then the last lastRequest times, while the pool is still open
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.last_requests.flush(), timeout=5.0)
        await self.bus.close()
        await self.pool.close()
