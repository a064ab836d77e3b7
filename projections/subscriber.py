"""Run the database projections as a JetStream subscriber: a durable consumer on the event stream (``consumer.py``).

Delivery is at-least-once and, across retries, not strictly ordered; the projection's per-key tracking
makes that harmless: for each key in a batch we look up the version the projection already has, skip what
it has, and let ``catch_up`` fill anything newer *from the log*, in version order. A message is acked only
after the transaction that applied it (or proved it already applied) committed.

The same batches feed the ``followers``: the invalidation projection publishes the batch's invalidations
(``invalidations.InvalidationProjection.follow``) and the receipts projection records its revocations
(``receipts.ReceiptsProjection.record``), and no batch is acked before all of them made it durable (then the
``on_ack`` hooks hear of it: the invalidation projection's checkpoints wait for this consumer's acks). Each
envelope's head is decoded once, here, and handed to the followers beside the messages. One consumer, not one
each: every consumer of the events stream makes NATS deliver every event once more and the service parse and
acknowledge it (and the invalidation projection, with a consumer of its own, acked every event): the receipts'
consumer cost revoke throughput about 4%, the invalidations' about 2% (one run each, docs/benchmarks.md). A
follower that fails fails the batch: it is delivered again, and every projection takes repeats in its stride.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from nats.js.api import AckPolicy

from ..background.bus import Bus
from ..core.events import EnvelopeHead, decode_envelope_head
from ..storage.connections import long_lived
from . import active_keys
from .consumer import consume, run_forever

# A follower takes a delivery batch and its envelopes' heads (decoded once, by the subscriber).
Follower = Callable[[list[Any], list[EnvelopeHead]], Awaitable[None]]


class ActiveKeysSubscriber:
    """Feeds ``active_api_keys`` from NATS (the inline writer usually got there first), then the followers."""

    name = active_keys.NAME
    consumer = name.replace("_", "-")  # its durable consumer's name (per term: consumer.py)

    def __init__(self, database_url: str, bus: Bus, *, fence: Callable[[], None] = lambda: None,
                 epoch: int | None = None, followers: Sequence[Follower] = (),
                 on_ack: Sequence[Callable[[], None]] = ()) -> None:
        self.database_url = database_url
        self.bus = bus
        self.fence = fence
        self.epoch = epoch  # the leadership term: its own durable consumer (consumer.py)
        self.followers = followers
        self.on_ack = on_ack
        self.applied = 0
        self.skipped = 0

    async def run(self) -> None:
        await run_forever(f"{self.name} subscriber", self._consume)

    async def _consume(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         **long_lived(self.database_url, name="active keys")
                                                         ) as conn:
            # AckAll: one ack per batch (acking the last message acks everything delivered before it).
            await consume(self.bus, self.consumer, lambda msgs: self.handle(conn, msgs),
                          ack_policy=AckPolicy.ALL, ack_wait=5, epoch=self.epoch)

    async def handle(self, conn: psycopg.AsyncConnection[Any], msgs: list[Any]) -> None:
        """Apply the batch and hand it to the followers, side by side (each has its own connection, and a
        follower's latency is a receipt's); ack once all succeeded, else raise the first failure."""
        self.fence()
        # Each envelope's head, once for all: the active keys need only the key and version (the rest comes from the
        # log, so a reduced envelope is just as good); the receipts need its type, position and time.
        heads = [decode_envelope_head(msg.data) for msg in msgs]
        outcomes = await asyncio.gather(self._apply(conn, heads),
                                        *(follow(msgs, heads) for follow in self.followers), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if msgs:
            await msgs[-1].ack()  # AckAll: covers the whole batch, only after every projection had it
            for hook in self.on_ack:
                hook()

    async def _apply(self, conn: psycopg.AsyncConnection[Any], heads: list[EnvelopeHead]) -> None:
        newest: dict[str, int] = {}
        for head in heads:
            newest[head.key_id] = max(newest.get(head.key_id, 0), head.version)
        have = await active_keys.tracked_versions(conn, list(newest))
        for key_id, version in newest.items():
            if have.get(key_id, 0) >= version:
                self.skipped += 1
                continue
            self.applied += await active_keys.catch_up(conn, key_id, version)
