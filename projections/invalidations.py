"""The invalidation projection: turns lifecycle events into cache invalidations on ``<prefix>.cache.invalidate``.

Caches in downstream services (``keyledger.client.KeyCache``) keep verified keys in memory; every event that
can make a cached verification wrong must reach them within milliseconds. The HTTP handlers never publish
invalidations (they must keep working while NATS is down); this projection derives them from the event
stream instead, so an invalidation exists for every committed event that needs one, however late.

Guarantees, and how:

* **None missed.** In the service this projection reads the event stream through the active-keys subscriber's
  durable consumer (``subscriber.py``: one consumer for all the projections, so NATS delivers each event to the
  leader once and it acks each batch once). ``follow`` publishes a batch's invalidations and returns only after
  JetStream acknowledged every one (the PubAck proves it is stored in the invalidations stream, where a cache
  that was disconnected finds it); the subscriber acks the batch only after that. A failed publish is retried
  for up to ``RETRY_FOR_S``, then the batch fails and is delivered again. A crash between the two redelivers it.
  (``run`` alone, for tests and tools, gives it a consumer of its own, each message acked after its batch.)
* **Duplicates are harmless.** The invalidation is a pure function of the event, published with
  ``Nats-Msg-Id = <event id>:inv``: JetStream drops a repeat inside its duplicate window, and a repeat after
  it is an identical message (same ``position``) whose only effect is a second eviction.
* **Order does not matter.** An invalidation only evicts; the cache re-verifies over HTTP, which answers
  from the current state. An out-of-order or stale invalidation therefore costs a cache miss, never a wrong
  answer. No database is needed here (the subscriber it follows has one).
* **Latency.** Messages are taken in whatever batch has arrived (``consumer.py``): a lone revocation is
  handled the moment it arrives, a burst in one go, with all its publishes in flight together, beside the
  active-keys subscriber's own write.
* **Never a plaintext key**: events carry only the key hash, and that is all we copy.
* **Freshness checkpoints** (``core/freshness.py``) come from the relay (``<prefix>.relay.checkpoint``), each
  with the events stream's sequence ``S`` that covers the events it vouches for. One is forwarded to
  ``<prefix>.cache.checkpoint`` only once the consumer it reads through has acknowledged everything up to ``S``
  (its ack floor): every one of those events has had its invalidation acknowledged by JetStream, whoever
  handled it (an earlier leader, a redelivery). The server is asked only once the batch in hand here, if it
  begins at or below ``S``, was acked (usually one ``consumer_info`` per checkpoint, not a poll). The projection
  keeps only the newest waiting checkpoint (merging the probes it answers), so a stalled event holds back proofs,
  never piles them up.
* **Reduced events** (too large for NATS, see ``relay.py``) always invalidate, conservatively.

No framework imports here; the service's runtime (``runtime.py``) hands ``follow`` and ``acked`` to the
active-keys subscriber and runs ``run_checkpoints`` as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from msgspec import UNSET
from nats.js.errors import NoStreamResponseError, NotFoundError

from .. import tasks
from ..background.bus import Bus, ensure_streams
from ..core.events import (EVENT_TYPES, ApiKeyRotated, ApiKeyUpdated, EnvelopeHead, RecordedEvent,
                           decode_envelope, decode_envelope_head)
from ..core.freshness import Checkpoint, decode_checkpoint, encode_checkpoint, merge_probes
from .consumer import consume, run_forever, term_consumer

log = logging.getLogger("keyledger.projections.invalidations")

NAME = "invalidations"
# How long ``follow`` retries the publishes JetStream did not acknowledge before failing the batch: less than the
# followed consumer's ack_wait (5 s), so that NATS does not deliver the batch again while it is still in hand.
RETRY_FOR_S = 4.0

# Event type -> invalidation reason, for events that always invalidate. ``ApiKeyEnabled`` is here because a
# cache may hold a short-lived *negative* answer ("disabled") that enabling makes wrong.
# A rotation evicts the *previous* secret at once, grace or not: without grace it has stopped working; with
# grace the cache re-verifies it and learns its deadline (``graceUntil``), which then caps the entry's life.
# ``ApiKeySecretRetired`` (the sweeper, when a grace period ends) evicts the superseded secret everywhere.
REASONS = {
    "ApiKeyRevoked": "revoked",
    "ApiKeyDisabled": "disabled",
    "ApiKeyEnabled": "updated",
    "ApiKeyExpired": "expired",
    "ApiKeyRotated": "rotated",
    "ApiKeySecretRetired": "rotated",
}
# ApiKeyUpdated invalidates only when it changes what a verification answers on: expiry, permissions,
# metadata, or a usage or rate limit (a cache never answers a limited key from memory, but it may hold the key
# from before it had limits). A rename does not (the cached record keeps the old name until re-verified).
UPDATE_FIELDS_THAT_INVALIDATE = ("expires_at", "permissions", "metadata", "remaining", "refill_amount",
                                 "refill_interval", "rate_limit_enabled", "rate_limit_time_window",
                                 "rate_limit_max")
# Known event types that never invalidate: ``follow`` skips them by their head, without decoding the whole
# envelope (a creation or an import burst is mostly these). A type this code does not know is decoded, and
# invalidates conservatively (``_fallback``), as does a reduced envelope of any type.
NEVER_INVALIDATE = frozenset(EVENT_TYPES) - set(REASONS) - {"ApiKeyUpdated"}

_encoder = msgspec.json.Encoder()
Invalidation = tuple[dict[str, Any], "str | None"]  # (message, the event's id for Nats-Msg-Id)


def invalidation_for(recorded: RecordedEvent) -> dict[str, Any] | None:
    """The invalidation message an event calls for, or ``None``. Pure: same event, same message.

    ``occurredAt`` is the event's time in the envelope's own format, so the two can be matched by eye.
    """
    event = recorded.event
    reason = REASONS.get(recorded.type)
    if reason is None and isinstance(event, ApiKeyUpdated):
        if any(getattr(event, f, UNSET) is not UNSET for f in UPDATE_FIELDS_THAT_INVALIDATE):
            reason = "updated"
    if reason is None:
        return None
    return {
        "keyId": recorded.stream_id,
        "keyHash": event.previous_key_hash if isinstance(event, ApiKeyRotated) else event.key_hash,
        "reason": reason,
        "position": recorded.position,
        "occurredAt": _encoder.encode(recorded.recorded_at).decode()[1:-1],
    }


def _unfenced() -> None:
    pass


def _fallback(payload: bytes) -> dict[str, Any] | None:
    """For an envelope we cannot decode (an event type newer than this code): invalidate conservatively.

    Evicting a key that did not need it costs one HTTP verification; not evicting one that did is the bug
    this projection exists to prevent.
    """
    try:
        raw = msgspec.json.decode(payload)
        key_hash = raw["data"]["keyHash"]
        if not isinstance(key_hash, str) or not isinstance(raw["keyId"], str):
            return None
        return {"keyId": raw["keyId"], "keyHash": key_hash, "reason": "updated",
                "position": int(raw["position"]), "occurredAt": str(raw["occurredAt"])}
    except Exception:
        return None


def _msg_id(payload: bytes) -> str | None:
    try:
        return str(msgspec.json.decode(payload)["id"])
    except Exception:
        return None


class InvalidationProjection:
    """Publishes the invalidations that events call for, to the invalidations stream; forwards freshness
    checkpoints once the consumer it reads through has acknowledged everything before them."""

    name = NAME

    def __init__(self, bus: Bus, *, publish_timeout: float = 2.0, fence: Callable[[], None] = _unfenced,
                 epoch: int | None = None, consumer: str = NAME,
                 on_forward: Sequence[Callable[[int], None]] = ()) -> None:
        self.bus = bus
        self.publish_timeout = publish_timeout
        self.fence = fence
        self.epoch = epoch  # the leadership term: its durable consumers are the term's own (consumer.py)
        self.consumer = consumer  # the durable consumer whose ack floor vouches for the checkpoints
        self.on_forward = on_forward  # told each forwarded checkpoint's position (the receipts' cursor)
        self.published = 0  # invalidations acknowledged by JetStream (duplicates included)
        self.ignored = 0  # events that call for no invalidation
        self.failed = 0  # publishes not acknowledged (retried; then the batch is delivered again)
        self.forwarded = 0  # checkpoints forwarded to caches
        self.last_forwarded = float("-inf")  # monotonic
        self.pending = 0  # the consumer's backlog (num_pending + num_ack_pending) at the last look
        self._held: Checkpoint | None = None  # the newest checkpoint not yet forwarded
        self._held_changed = asyncio.Event()
        # The stream sequence of the first event of the batch in hand (handed to ``follow``, not yet acked), or
        # None. Only a hint that saves asking the server in vain; the server's ack floor decides.
        self._in_hand_from: int | None = None
        self._acked = asyncio.Event()

    async def run(self) -> None:
        """Alone, on a durable consumer of its own (tests, tools): each message acked once ``follow`` returned
        for its batch (explicit acks with a short ack_wait, as this consumer always had: after a restart, what the
        server had already pushed to the subscription going away comes back within 2 s)."""
        checkpoints = asyncio.ensure_future(self.run_checkpoints())
        try:
            await run_forever(f"{self.name} projection", self._consume)
        finally:
            await tasks.stop([checkpoints])

    async def run_checkpoints(self) -> None:
        """Hold each relay checkpoint, and forward it once everything it covers is acknowledged."""
        loops = [asyncio.ensure_future(run_forever(f"{self.name} checkpoints", self._release_forever)),
                 asyncio.ensure_future(self.bus.listen(self.bus.topology.relay_checkpoint_subject, self._hold))]
        try:
            await asyncio.gather(*loops)
        finally:
            await tasks.stop(loops)

    async def _consume(self) -> None:
        await consume(self.bus, self.consumer, self._own_batch, ack_wait=2, epoch=self.epoch)

    async def _own_batch(self, msgs: list[Any]) -> None:
        await self.follow(msgs)
        for msg in msgs:
            await msg.ack()
        self.acked()

    async def follow(self, msgs: list[Any], heads: list[EnvelopeHead] | None = None) -> None:
        """Publish what ``msgs`` call for, concurrently, and return once JetStream acknowledged every one; the
        caller acks the batch after that, then calls ``acked``. Publishes that failed are retried (only those)
        for up to RETRY_FOR_S; then this raises and the batch is delivered again. ``heads``: the envelopes' heads
        (decoded by the subscriber; None alone), to skip the events that never invalidate."""
        self._in_hand_from = msgs[0].metadata.sequence.stream if msgs else None  # (one parse per batch)
        try:
            delivered = len(msgs)
            pairs = [(msg, None) for msg in msgs] if heads is None else [
                (msg, head) for msg, head in zip(msgs, heads) if head.reduced or head.type not in NEVER_INVALIDATE]
            todo = [inv for inv in (self._invalidation(msg, head) for msg, head in pairs) if inv is not None]
            self.ignored += delivered - len(todo)
            deadline = time.monotonic() + RETRY_FOR_S
            while todo and (todo := await self._publish(todo)):  # those not acknowledged, again
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(todo)} invalidation(s) not acknowledged for {RETRY_FOR_S:g}s")
                await asyncio.sleep(0.1)  # NATS struggling (a stream-leader election, a restart)
        except BaseException:
            self._in_hand_from = None  # delivered again; the server's ack floor decides meanwhile
            raise

    def acked(self) -> None:
        """The batch ``follow`` had in hand is acknowledged (called by whoever acked it)."""
        self._in_hand_from = None
        self._acked.set()

    def _invalidation(self, msg: Any, head: EnvelopeHead | None) -> Invalidation | None:
        """(invalidation, event id) for an event message (and its head, if decoded already), or None if it calls
        for none. A reduced envelope (relay.py), known by its own ``reduced`` field as the subscriber's filter knows
        it, kept only the key hashes of its data: it invalidates conservatively, undecoded."""
        try:
            head = head if head is not None else decode_envelope_head(msg.data)
            inv = _fallback(msg.data) if head.reduced else invalidation_for(decode_envelope(msg.data))
            return None if inv is None else (inv, head.id)
        except Exception as exc:
            log.error("undecodable event %s (%s); invalidating conservatively", msg.subject, exc)
            inv = _fallback(msg.data)
            return None if inv is None else (inv, _msg_id(msg.data))

    async def _publish(self, todo: list[Invalidation]) -> list[Invalidation]:
        """Publish ``todo`` together; return those JetStream did not acknowledge."""
        js = await self.bus.ready()
        topology = self.bus.topology
        self.fence()
        results = await asyncio.gather(
            *(js.publish(topology.invalidation_subject, _encoder.encode(inv), timeout=self.publish_timeout,
                         stream=topology.invalidations_stream,
                         headers={"Nats-Msg-Id": f"{event_id}:inv"} if event_id else None)
              for inv, event_id in todo),
            return_exceptions=True,
        )
        failed = [item for item, result in zip(todo, results) if isinstance(result, BaseException)]
        self.published += len(todo) - len(failed)
        if failed:
            self.failed += len(failed)
            error = next(r for r in results if isinstance(r, BaseException))
            log.warning("%d invalidation publish(es) not acknowledged (%s); retrying", len(failed),
                        type(error).__name__)
            # The invalidations stream may be gone (deleted, a wiped server): then a publish times out, or finds
            # no stream. Declare it again, or every retry fails the same way. Caches notice (their cursor no longer
            # fits the stream) and flush.
            if isinstance(error, NoStreamResponseError) or not await self._stream_exists(js):
                with contextlib.suppress(Exception):
                    await ensure_streams(js, topology, self.bus.streams)
        return failed

    async def _stream_exists(self, js: Any) -> bool:
        try:
            await js.stream_info(self.bus.topology.invalidations_stream)
            return True
        except NotFoundError:
            return False
        except Exception:
            return True  # cannot tell (NATS struggling): leave it be

    # --------------------------------------------------------------------------------------------------
    # Checkpoints
    # --------------------------------------------------------------------------------------------------
    def _hold(self, payload: bytes) -> None:
        """Keep the newest checkpoint until everything up to its stream sequence is acknowledged. A lost one
        (a crash before forwarding, a dropped core message) only delays the proof to the next checkpoint."""
        try:
            checkpoint = decode_checkpoint(payload)
        except Exception:
            return
        if self._held is not None:
            checkpoint = msgspec.structs.replace(checkpoint, probes=merge_probes(self._held.probes, checkpoint.probes))
        self._held = checkpoint
        self._held_changed.set()

    async def _release_forever(self) -> None:
        js = await self.bus.ready()
        topology = self.bus.topology
        durable = term_consumer(topology.consumer(self.consumer), self.epoch)
        looks = 0
        while True:
            if self._held is None:
                self._held_changed.clear()
                await self._held_changed.wait()
                looks = 0
                continue
            checkpoint = self._held
            covered = checkpoint.stream_seq
            in_hand = self._in_hand_from
            if looks == 0 and in_hand is not None and in_hand <= covered:
                # An event it covers is still being handled here: wait for the batch's ack rather than ask the
                # server in vain (bounded: the batch may fail). A later batch begins after ``covered``.
                self._acked.clear()
                try:
                    await asyncio.wait_for(self._acked.wait(), 0.5)
                except asyncio.TimeoutError:
                    looks = 1  # ask the server from now on
                continue
            info = await js.consumer_info(topology.events_stream, durable, timeout=self.publish_timeout)
            self.pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
            floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
            # Everything up to S acknowledged: the ack floor reached S, or nothing the consumer takes is left
            # undelivered or unacknowledged (the floor of a filtered consumer stops at its last event, below
            # an S that ends on something it does not take).
            if floor < covered and self.pending:
                looks += 1  # an invalidation is not acknowledged yet (or our acks are still on their way to the
                await asyncio.sleep(min(0.005 * looks, 0.1))  # server): look again soon, less often if stuck
                continue
            looks = 0
            self.fence()
            await self.bus.nc.publish(topology.checkpoint_subject, encode_checkpoint(checkpoint))  # type: ignore[union-attr]
            self.forwarded += 1
            self.last_forwarded = time.monotonic()
            for hook in self.on_forward:
                hook(checkpoint.position)
            if self._held is checkpoint:  # (a newer one may have come meanwhile: it waits its turn)
                self._held = None
