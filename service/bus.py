"""The NATS connection: connect in the background, keep reconnecting, declare the JetStream streams.

The service must keep accepting revocations while NATS is down, so nothing on the request path waits for
this connection: the outbox relay and the subscribers wait for ``ready``, the handlers never touch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .config import Topology

log = logging.getLogger("keyledger.bus")

# JetStream drops a repeated Nats-Msg-Id only inside this window. The relay republishes only what it could
# not confirm, normally within seconds; consumers still deduplicate by (keyId, version), which is forever.
DUPLICATE_WINDOW_S = 600.0


class Bus:
    def __init__(self, url: str, topology: Topology) -> None:
        self.url = url
        self.topology = topology
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_disconnect: Callable[[], None] | None = None  # called at every disconnect

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def is_ready(self) -> bool:
        """Connected, with the streams declared: JetStream work can start."""
        return self._ready.is_set() and self.connected

    async def ready(self) -> JetStreamContext:
        await self._ready.wait()
        assert self.js is not None
        return self.js

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever(), name="nats-connect")

    async def _connect_forever(self) -> None:
        delay = 0.05
        while True:
            try:
                nc = await nats.connect(
                    self.url,
                    name="keyledger",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
                self.nc, self.js = nc, nc.jetstream(timeout=2)
                await ensure_streams(self.js, self.topology)
                self._ready.set()
                log.info("connected to NATS at %s", self.url)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # server down or starting: keep trying, quietly
                if self.nc is not None:
                    await _close(self.nc)
                    self.nc = None
                log.debug("NATS not available yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)

    async def _on_disconnect(self) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect()
        log.warning("NATS disconnected; events wait in the outbox")

    async def _on_reconnect(self) -> None:
        log.info("NATS reconnected")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        if self.nc is not None:
            await _close(self.nc)


async def ensure_streams(js: JetStreamContext, topology: Topology) -> None:
    """Create the event and invalidation streams, or leave them as they are.

    One exception: the events stream must allow rollup headers, which the freshness checkpoints use so that the
    stream keeps only the newest one. An existing stream without it gets it (JetStream allows that update).
    """
    for name, subjects, rollup in (
        (topology.events_stream, [topology.events_subjects], True),
        (topology.invalidations_stream, [topology.invalidation_subject], False),
    ):
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            allow_rollup_hdrs=rollup,
        )
        try:
            await js.add_stream(config)
        except BadRequestError as exc:  # exists with another config: keep the operator's
            log.info("stream %s exists (%s); leaving it unchanged", name, exc.description)
            if rollup:
                existing = (await js.stream_info(name)).config
                if not existing.allow_rollup_hdrs:
                    await js.update_stream(dataclasses.replace(existing, allow_rollup_hdrs=True))
                    log.warning("stream %s: enabled rollup headers (freshness checkpoints need them)", name)


async def _close(nc: Client) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(nc.close(), 2)
