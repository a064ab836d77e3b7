"""Run a projection as a JetStream subscriber: a durable pull consumer on the event stream.

Delivery is at-least-once and, across retries, not strictly ordered; the projection's per-key tracking
makes that harmless: for each key in a batch we look up the version the projection already has, skip what
it has, and let ``catch_up`` fill anything newer *from the log*, in version order. A message is acked only
after the transaction that applied it (or proved it already applied) committed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..bus import Bus
from ..events import decode_envelope
from . import active_keys

log = logging.getLogger("keyledger.projections")


class ActiveKeysSubscriber:
    """Feeds ``active_api_keys`` from NATS (the inline writer usually got there first)."""

    name = active_keys.NAME

    def __init__(self, database_url: str, bus: Bus, *, batch: int = 256) -> None:
        self.database_url = database_url
        self.bus = bus
        self.batch = batch
        self.applied = 0
        self.skipped = 0

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s subscriber: %s: %s; retrying", self.name, type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _consume(self) -> None:
        js = await self.bus.ready()
        topology = self.bus.topology
        durable = topology.consumer(self.name.replace("_", "-"))
        sub = await js.pull_subscribe(
            topology.events_subjects,
            durable=durable,
            stream=topology.events_stream,
            # AckAll: one ack per batch (acking the last message acks everything delivered before it).
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
                                  ack_wait=30, max_ack_pending=10_000),
        )
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            while True:
                try:
                    msgs = await sub.fetch(self.batch, timeout=1.0)
                except NatsTimeout:
                    continue
                await self.handle(conn, msgs)

    async def handle(self, conn: psycopg.AsyncConnection[Any], msgs: list[Any]) -> None:
        newest: dict[str, int] = {}
        for msg in msgs:
            recorded = decode_envelope(msg.data)
            newest[recorded.stream_id] = max(newest.get(recorded.stream_id, 0), recorded.version)
        have = await active_keys.tracked_versions(conn, list(newest))
        for key_id, version in newest.items():
            if have.get(key_id, 0) >= version:
                self.skipped += 1
                continue
            self.applied += await active_keys.catch_up(conn, key_id, version)
        if msgs:
            await msgs[-1].ack()  # AckAll: covers the whole batch, only after it was applied
