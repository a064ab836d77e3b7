"""Feed a projection from the event stream in batches: a durable push consumer drained into a local queue.

Why not nats-py's pull ``fetch``: it creates a task and a ``wait_for`` per message, several event-loop turns
each, and in a busy service process those turns queue behind every in-flight HTTP request (measured: an
invalidation took 120-300 ms to get through under revoke load). A push subscription's callback only appends
to a queue; the projection then takes everything that arrived in one go, however many messages that is, so a
lone revocation is handled at once and a burst costs one turn per batch.

Delivery stays at-least-once and durable (the consumer remembers what was acknowledged across restarts).

**One consumer per leadership term.** A deposed leader may be hung rather than dead (SIGSTOP): its subscription
stays bound, and a consumer shared with it would keep pushing part of the stream into a process that never
acks, each message stuck until ``ack_wait``. So each term creates its own durable consumer,
``<prefix>-<name>-e<epoch>``, starting right after the ack floor of the newest earlier one, and then deletes the
earlier ones: everything not acknowledged before is delivered again (to this term only), and a hung leader's
subscription simply stops receiving. The new consumer exists before the old ones go, so a crash in between
never loses the position. Repeats are harmless to every projection here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ..background.bus import Bus

Handler = Callable[[list[Any]], Awaitable[Any]]

log = logging.getLogger("keyledger.projections")


async def run_forever(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` until cancelled, restarting it with backoff whenever NATS or Postgres fails under it."""
    backoff = 0.1
    while True:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: %s: %s; retrying", name, type(exc).__name__, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def term_consumer(base: str, epoch: int | None) -> str:
    """The durable consumer of one leadership term (``base`` alone outside a term: tests, tools)."""
    return base if epoch is None else f"{base}-e{epoch}"


def _term_of(base: str, consumer: str) -> int:
    suffix = consumer[len(base):]
    return int(suffix[2:]) if suffix.startswith("-e") and suffix[2:].isdigit() else 0


async def terms(js: Any, stream: str, base: str) -> list[Any]:
    """Info of every durable consumer of ``base`` on ``stream``: ``base`` itself and each term's ``base-e<N>``."""
    return [c for c in await js.consumers_info(stream)
            if c.name == base or (c.name.startswith(base + "-e") and _term_of(base, c.name) > 0)]


async def delete(js: Any, stream: str, consumers: list[Any]) -> None:
    """Delete these consumers (one already gone is fine: another process may have deleted it)."""
    for consumer in consumers:
        try:
            await js.delete_consumer(stream, consumer.name)
        except NotFoundError:
            pass


async def retire(bus: Bus, names: list[str]) -> None:
    """Delete the events-stream consumers (``<prefix>-<name>``, ``-e<term>``) of projections that no longer have one:
    receipts and invalidations now follow the active-keys subscriber (subscriber.py). Nobody reads them, and NATS
    would keep them, and their backlog. Once per term; NATS unavailable: harmless, the next term tries again."""
    try:
        js = await bus.ready()
        stream = bus.topology.events_stream
        for name in names:
            await delete(js, stream, await terms(js, stream, bus.topology.consumer(name)))
    except Exception as exc:
        log.info("retired consumers not deleted: %s: %s", type(exc).__name__, exc)


async def _take_over(js: Any, stream: str, base: str, durable: str, config: ConsumerConfig) -> None:
    """Create this term's consumer after the newest earlier one's ack floor, then delete the earlier ones."""
    try:
        await js.consumer_info(stream, durable)
        return  # this term's consumer exists already (a resubscription after an error)
    except NotFoundError:
        pass
    earlier = await terms(js, stream, base)
    config.durable_name = durable
    config.deliver_group = durable
    config.deliver_subject = f"_KL_DELIVER.{durable}"
    if earlier:
        newest = max(earlier, key=lambda c: _term_of(base, c.name))
        floor = newest.ack_floor.stream_seq if newest.ack_floor else 0
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = (floor or 0) + 1
    await js.add_consumer(stream, config)
    await delete(js, stream, earlier)


async def consume(bus: Bus, name: str, handle: Handler, *, ack_policy: AckPolicy = AckPolicy.EXPLICIT,
                  max_batch: int = 512, ack_wait: float = 30.0, epoch: int | None = None) -> None:
    """Run ``handle(messages)`` on batches from the durable consumer ``name`` of term ``epoch``, until cancelled.

    ``handle`` acknowledges what it processed (with ``AckPolicy.ALL``, acking the last message of a batch
    acknowledges the batch). Raises when the connection or subscription fails; the caller retries.
    """
    js = await bus.ready()
    topology = bus.topology
    base = topology.consumer(name)
    durable = term_consumer(base, epoch)
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def arrived(msg: Any) -> None:
        queue.put_nowait(msg)

    config = ConsumerConfig(ack_policy=ack_policy, deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait,
                            max_ack_pending=10_000)
    subjects = topology.event_only_subjects
    if epoch is not None:
        config.filter_subject = subjects
        await _take_over(js, topology.events_stream, base, durable, config)
    sub = await js.subscribe(
        subjects,
        queue=durable,
        durable=durable,
        stream=topology.events_stream,
        cb=arrived,
        manual_ack=True,
        config=None if epoch is not None else config,
    )
    try:
        while True:
            batch = [await queue.get()]
            while len(batch) < max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            await handle(batch)
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # the connection is gone: nothing to clean up
            pass
