"""Run a projection as a JetStream subscriber: a durable consumer on the event stream (``consumer.py``).

Delivery is at-least-once and, across retries, not strictly ordered; the projection's per-key tracking
makes that harmless: for each key in a batch we look up the version the projection already has, skip what
it has, and let ``catch_up`` fill anything newer *from the log*, in version order. A message is acked only
after the transaction that applied it (or proved it already applied) committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from nats.js.api import AckPolicy

from ..background.bus import Bus
from ..core.events import decode_envelope_head
from ..storage.connections import long_lived
from . import active_keys
from .consumer import consume, run_forever


class ActiveKeysSubscriber:
    """Feeds ``active_api_keys`` from NATS (the inline writer usually got there first)."""

    name = active_keys.NAME

    def __init__(self, database_url: str, bus: Bus, *, fence: Callable[[], None] = lambda: None,
                 epoch: int | None = None) -> None:
        self.database_url = database_url
        self.bus = bus
        self.fence = fence
        self.epoch = epoch  # the leadership term: its own durable consumer (consumer.py)
        self.applied = 0
        self.skipped = 0

    async def run(self) -> None:
        await run_forever(f"{self.name} subscriber", self._consume)

    async def _consume(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         **long_lived(self.database_url, name="active keys")
                                                         ) as conn:
            # AckAll: one ack per batch (acking the last message acks everything delivered before it).
            await consume(self.bus, self.name.replace("_", "-"), lambda msgs: self.handle(conn, msgs),
                          ack_policy=AckPolicy.ALL, ack_wait=5, epoch=self.epoch)

    async def handle(self, conn: psycopg.AsyncConnection[Any], msgs: list[Any]) -> None:
        self.fence()
        newest: dict[str, int] = {}
        for msg in msgs:
            # Only the key and version: the rest comes from the log (so a reduced envelope is just as good).
            head = decode_envelope_head(msg.data)
            newest[head.key_id] = max(newest.get(head.key_id, 0), head.version)
        have = await active_keys.tracked_versions(conn, list(newest))
        for key_id, version in newest.items():
            if have.get(key_id, 0) >= version:
                self.skipped += 1
                continue
            self.applied += await active_keys.catch_up(conn, key_id, version)
        if msgs:
            await msgs[-1].ack()  # AckAll: covers the whole batch, only after it was applied
