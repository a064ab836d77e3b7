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
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .. import tasks
from ..config import StreamSettings, Topology, _redact, nats_servers

log = logging.getLogger("keyledger.bus")

# JetStream drops a repeated Nats-Msg-Id only inside this window. The relay republishes only what it could
# not confirm, normally within seconds; consumers still deduplicate by (keyId, version), which is forever.
DUPLICATE_WINDOW_S = 600.0


class Bus:
    """``url``: NATS_URL, one URL or a comma-separated list; ``options``: credentials and TLS
    (``config.nats_connect_options``)."""

    def __init__(self, url: str, topology: Topology, *, streams: StreamSettings | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.servers = nats_servers(url)
        self.topology = topology
        self.streams = streams or StreamSettings()
        self.options = options or {}
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_disconnect: Callable[[], None] | None = None  # called at every disconnect
        self._warned_at = float("-inf")
        self._closing = False

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
                    servers=self.servers,
                    name="keyledger",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    **self.options,
                )
                self.nc, self.js = nc, nc.jetstream(timeout=2)
                await ensure_streams(self.js, self.topology, self.streams)
                self._ready.set()
                url = nc.connected_url
                log.info("connected to NATS at %s", f"{url.hostname}:{url.port}" if url else "?")  # no credentials
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. the streams could not be declared: keep trying, and say so
                if self.nc is not None:
                    await _close(self.nc)
                    self.nc = None
                await self._on_error(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _on_error(self, exc: Exception) -> None:
        # nats-py retries the servers by itself (also on the first connect, which then never returns): this
        # callback is where a server that cannot be reached shows. Said at WARNING, at most every 30 s.
        now = asyncio.get_running_loop().time()
        if not self.connected and now - self._warned_at >= 30.0:
            self._warned_at = now
            log.warning("NATS not reachable at %s (%s: %s); retrying",
                        ", ".join(_redact(u) for u in self.servers), type(exc).__name__, exc)
        else:
            log.debug("NATS error: %s", exc)

    async def _on_disconnect(self) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect()
        if self._closing:  # our own shutdown
            log.info("NATS connection closed")
        else:
            log.warning("NATS disconnected; events wait in the outbox")

    async def _on_reconnect(self) -> None:
        log.info("NATS reconnected")

    async def listen(self, subject: str, handle: Callable[[bytes], None]) -> None:
        """Call ``handle(payload)`` for each core-NATS message on ``subject``, resubscribing after failures."""
        await self.ready()
        while True:
            try:
                sub = await self.nc.subscribe(subject)  # type: ignore[union-attr]
                try:
                    async for msg in sub.messages:
                        handle(msg.data)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        self._closing = True
        await tasks.stop([self._task])
        if self.nc is not None:
            await _close(self.nc)


def stream_configs(topology: Topology, streams: StreamSettings) -> list[StreamConfig]:
    """The two streams as keyledger declares them."""
    storage = StorageType.MEMORY if streams.storage == "memory" else StorageType.FILE
    return [
        # The events stream refuses rollup headers: a rollup is a purge, and NATS servers (2.9 among them) have
        # moved consumers past messages of other subjects on a purge (core/freshness.py). Nothing purges it.
        StreamConfig(name=topology.events_stream, subjects=[topology.events_subjects],
                     retention=RetentionPolicy.LIMITS, storage=storage, num_replicas=streams.replicas,
                     max_age=streams.events_max_age or None, duplicate_window=DUPLICATE_WINDOW_S,
                     allow_rollup_hdrs=False),
        StreamConfig(name=topology.invalidations_stream, subjects=[topology.invalidation_subject],
                     retention=RetentionPolicy.LIMITS, storage=storage, num_replicas=streams.replicas,
                     max_age=streams.invalidations_max_age, duplicate_window=DUPLICATE_WINDOW_S),
    ]


# What ``migrate --streams`` may change on an existing stream (JetStream refuses to change the storage type).
UPDATABLE = ("num_replicas", "max_age", "allow_rollup_hdrs", "duplicate_window")
COMPARED = (*UPDATABLE, "storage", "retention")


def differences(want: StreamConfig, have: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (existing, wanted)} for the settings keyledger cares about."""
    out = {}
    for name in COMPARED:
        wanted, existing = getattr(want, name), getattr(have, name)
        if name == "max_age":
            wanted, existing = wanted or 0.0, existing or 0.0
        if name == "num_replicas":
            wanted, existing = wanted or 1, existing or 1
        if wanted != existing:
            out[name] = (existing, wanted)
    return out


_reported: set[str] = set()


async def ensure_streams(js: JetStreamContext, topology: Topology, streams: StreamSettings | None = None,
                         *, update: bool = False) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Create the event and invalidation streams, or leave existing ones as they are.

    An existing stream whose settings differ is reported once per process at WARNING, with the difference.
    With ``update`` (``keyledger migrate --streams``), what JetStream allows to change is changed (replicas,
    max age, rollup, duplicate window; not the storage type). One exception without ``update``: rollup headers
    are turned off on the events stream if an earlier version turned them on (a rollup there can skip events).
    Returns {stream: {field: (before, after)}} for what was (or, without ``update``, would be) changed.
    """
    changed: dict[str, dict[str, tuple[Any, Any]]] = {}
    for config in stream_configs(topology, streams or StreamSettings()):
        try:
            await js.add_stream(config)
            continue
        except BadRequestError:
            pass  # exists with another configuration
        existing = (await js.stream_info(config.name)).config
        diff = differences(config, existing)
        if not diff:
            continue
        changed[config.name] = diff
        apply = {k: v[1] for k, v in diff.items() if k in UPDATABLE and (update or k == "allow_rollup_hdrs")}
        if apply:
            await js.update_stream(dataclasses.replace(existing, **apply))
            log.warning("stream %s: changed %s", config.name,
                        ", ".join(f"{k} {diff[k][0]} -> {diff[k][1]}" for k in apply))
        rest = {k: v for k, v in diff.items() if k not in apply}
        if rest and (config.name not in _reported or update):
            _reported.add(config.name)
            log.warning("stream %s differs from keyledger's settings: %s%s", config.name,
                        ", ".join(f"{k} is {v[0]}, configured {v[1]}" for k, v in rest.items()),
                        "" if update else " (left as it is; `keyledger migrate --streams` updates it)")
    return changed


async def _close(nc: Client) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(nc.close(), 2)
