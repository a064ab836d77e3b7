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

No framework imports here; the service's runtime starts ``InvalidationProjection(bus).run()`` as a task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from msgspec import UNSET

from ..bus import Bus
from ..events import ApiKeyRotated, ApiKeyUpdated, RecordedEvent, decode_envelope
from .consumer import consume, run_forever

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
# ApiKeyUpdated invalidates only when it changes what a verification answers on: expiry, permissions or
# metadata. A rename does not (the cached record keeps the old name until its next re-verification).
UPDATE_FIELDS_THAT_INVALIDATE = ("expires_at", "permissions", "metadata")

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
    """Consumes the event stream, publishes invalidations to the invalidations stream, acks after PubAck."""

    name = NAME

    def __init__(self, bus: Bus, *, publish_timeout: float = 2.0) -> None:
        self.bus = bus
        self.publish_timeout = publish_timeout
        self.published = 0  # invalidations acknowledged by JetStream (duplicates included)
        self.ignored = 0  # events that call for no invalidation
        self.failed = 0  # publishes not acknowledged (the event is redelivered)

    async def run(self) -> None:
        await run_forever(f"{self.name} projection", self._consume)

    async def _consume(self) -> None:
        # A short ack_wait: after a restart the server may already have pushed messages to a subscription that
        # was going away; they come back after ack_wait, and a repeat invalidation is harmless.
        await consume(self.bus, NAME, self._handle_batch, ack_wait=2)

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
        todo: list[tuple[Any, dict[str, Any] | None, str | None]] = []
        for msg in msgs:
            try:
                recorded = decode_envelope(msg.data)
                todo.append((msg, invalidation_for(recorded), recorded.id))
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
                await msg.ack()
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
                await msg.ack()
        if failures:
            self.failed += failures
            error = next(r for r in results if isinstance(r, BaseException))
            log.warning("%d invalidation publish(es) not acknowledged (%s); events will be redelivered",
                        failures, type(error).__name__)
        return failures
