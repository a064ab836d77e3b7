"""The invalidation projection: turns lifecycle events into cache invalidations on ``<prefix>.cache.invalidate``.

Caches in downstream services (``keyledger.client.KeyCache``) keep verified keys in memory; every event that
can make a cached verification wrong must reach them within milliseconds. The HTTP handlers never publish
invalidations (they must keep working while NATS is down); this projection derives them from the event
stream instead, so an invalidation exists for every committed event that needs one, however late.

Guarantees, and how:

* **None missed.** A durable consumer on the event stream (``consumer.py``); an event message is acked only after
  JetStream acknowledged the invalidation publish (the PubAck proves it is stored in the invalidations
  stream, where a cache that was disconnected finds it). A crash between the two redelivers the event.
* **Duplicates are harmless.** The invalidation is a pure function of the event, published with
  ``Nats-Msg-Id = <event id>:inv``: JetStream drops a repeat inside its duplicate window, and a repeat after
  it is an identical message (same ``position``) whose only effect is a second eviction.
* **Order does not matter.** An invalidation only evicts; the cache re-verifies over HTTP, which answers
  from the current state. An out-of-order or stale invalidation therefore costs a cache miss, never a wrong
  answer. No database is needed.
* **Latency.** Messages are taken in whatever batch has arrived (``consumer.py``): a lone revocation is
  handled the moment it arrives, a burst in one go, with all its publishes in flight together.
* **Never a plaintext key**: events carry only the key hash, and that is all we copy.
* **Freshness checkpoints** (``core/freshness.py``) come from the relay (``<prefix>.relay.checkpoint``), each
  with the events stream's sequence ``S`` that covers the events it vouches for. One is forwarded to
  ``<prefix>.cache.checkpoint`` only once the durable consumer has acknowledged everything up to ``S`` (its ack
  floor): every one of those events has had its invalidation acknowledged by JetStream, whoever handled it (an
  earlier leader, a redelivery). The server is asked only once this process has acked every event up to ``S``
  it was handed (usually one ``consumer_info`` per checkpoint, not a poll). The projection keeps only the
  newest waiting checkpoint (merging the probes it answers), so a stalled event holds back proofs, never piles
  them up.
* **Reduced events** (too large for NATS, see ``relay.py``) always invalidate, conservatively.

No framework imports here; the service's runtime starts ``InvalidationProjection(bus).run()`` as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import UNSET
from nats.js.errors import NoStreamResponseError, NotFoundError

from .. import tasks
from ..background.bus import Bus, ensure_streams
from ..core.events import ApiKeyRotated, ApiKeyUpdated, RecordedEvent, decode_envelope
from ..core.freshness import Checkpoint, decode_checkpoint, encode_checkpoint, merge_probes
from .consumer import consume, run_forever, term_consumer

log = logging.getLogger("keyledger.projections.invalidations")

NAME = "invalidations"

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

_encoder = msgspec.json.Encoder()


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
    """Consumes the event stream, publishes invalidations to the invalidations stream, acks after PubAck;
    forwards freshness checkpoints once everything before them is acknowledged."""

    name = NAME

    def __init__(self, bus: Bus, *, publish_timeout: float = 2.0, fence: Callable[[], None] = _unfenced,
                 epoch: int | None = None) -> None:
        self.bus = bus
        self.publish_timeout = publish_timeout
        self.fence = fence
        self.epoch = epoch  # the leadership term: its own durable consumer (consumer.py)
        self.published = 0  # invalidations acknowledged by JetStream (duplicates included)
        self.ignored = 0  # events that call for no invalidation
        self.failed = 0  # publishes not acknowledged (the event is redelivered)
        self.forwarded = 0  # checkpoints forwarded to caches
        self.last_forwarded = float("-inf")  # monotonic
        self.pending = 0  # the consumer's backlog (num_pending + num_ack_pending) at the last look
        self._held: Checkpoint | None = None  # the newest checkpoint not yet forwarded
        self._held_changed = asyncio.Event()
        # Stream sequences of the events this process was handed and has not acked yet (a nak'd one stays until
        # its redelivery is acked). Only a hint that saves asking the server in vain; the server's ack floor
        # decides (an earlier subscription's deliveries are not in here).
        self._unacked: set[int] = set()
        self._acked = asyncio.Event()

    async def run(self) -> None:
        checkpoints = [asyncio.ensure_future(run_forever(f"{self.name} checkpoints", self._release_forever)),
                       asyncio.ensure_future(self.bus.listen(self.bus.topology.relay_checkpoint_subject, self._hold))]
        try:
            await run_forever(f"{self.name} projection", self._consume)
        finally:
            await tasks.stop(checkpoints)

    async def _consume(self) -> None:
        # A short ack_wait: after a restart the server may already have pushed messages to a subscription that
        # was going away; they come back after ack_wait, and a repeat invalidation is harmless.
        await consume(self.bus, NAME, self._handle_batch, ack_wait=2, epoch=self.epoch)

    async def _handle_batch(self, msgs: list[Any]) -> None:
        failures = await self.handle(msgs)
        if failures:  # NATS struggling: the nak'd events come back after a pause
            await asyncio.sleep(0.1)

    async def handle(self, msgs: list[Any]) -> int:
        """Publish what ``msgs`` call for, concurrently; ack each message whose publish was acknowledged.

        Returns how many publishes failed; their event messages were nak'd and will be redelivered.
        """
        js = await self.bus.ready()
        topology = self.bus.topology
        self.fence()
        todo: list[tuple[Any, dict[str, Any] | None, str | None]] = []
        for msg in msgs:
            self._unacked.add(msg.metadata.sequence.stream)
            try:
                recorded = decode_envelope(msg.data)
                reduced = bool(msg.headers and msg.headers.get("Keyledger-Reduced"))
                todo.append((msg, _fallback(msg.data) if reduced else invalidation_for(recorded), recorded.id))
            except Exception as exc:
                log.error("undecodable event %s (%s); invalidating conservatively", msg.subject, exc)
                todo.append((msg, _fallback(msg.data), _msg_id(msg.data)))
        results = await asyncio.gather(
            *(
                js.publish(
                    topology.invalidation_subject,
                    _encoder.encode(inv),
                    timeout=self.publish_timeout,
                    stream=topology.invalidations_stream,
                    headers={"Nats-Msg-Id": f"{event_id}:inv"} if event_id else None,
                )
                for _, inv, event_id in todo
                if inv is not None
            ),
            return_exceptions=True,
        )
        outcomes = iter(results)
        failures = 0
        for msg, inv, _ in todo:
            if inv is None:
                self.ignored += 1
                await self._ack(msg)
                continue
            result = next(outcomes)
            if isinstance(result, BaseException):
                failures += 1
                try:
                    await msg.nak(delay=0.1)  # redelivered soon, not after ack_wait
                except Exception:  # NATS down: ack_wait redelivers it instead
                    pass
            else:
                self.published += 1
                await self._ack(msg)
        if failures:
            self.failed += failures
            error = next(r for r in results if isinstance(r, BaseException))
            log.warning("%d invalidation publish(es) not acknowledged (%s); events will be redelivered",
                        failures, type(error).__name__)
            # The invalidations stream may be gone (deleted, a wiped server): then a publish times out, or finds
            # no stream. Declare it again, or every retry fails the same way. Caches notice (their cursor no longer
            # fits the stream) and flush.
            if isinstance(error, NoStreamResponseError) or not await self._stream_exists(js):
                with contextlib.suppress(Exception):
                    await ensure_streams(js, topology, self.bus.streams)
        return failures

    async def _ack(self, msg: Any) -> None:
        await msg.ack()
        self._unacked.discard(msg.metadata.sequence.stream)
        self._acked.set()

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
        durable = term_consumer(topology.consumer(NAME), self.epoch)
        looks = 0
        while True:
            if self._held is None:
                self._held_changed.clear()
                await self._held_changed.wait()
                looks = 0
                continue
            checkpoint = self._held
            covered = checkpoint.stream_seq
            if looks == 0 and any(s <= covered for s in self._unacked):
                # An event it covers is still being handled here: wait for our own acks rather than ask the
                # server in vain (bounded: the hint may hold a sequence that will never come back to us).
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
            self._unacked = {s for s in self._unacked if s > covered}  # acknowledged, whoever acked them
            looks = 0
            self.fence()
            await self.bus.nc.publish(topology.checkpoint_subject, encode_checkpoint(checkpoint))  # type: ignore[union-attr]
            self.forwarded += 1
            self.last_forwarded = time.monotonic()
            if self._held is checkpoint:  # (a newer one may have come meanwhile: it waits its turn)
                self._held = None
