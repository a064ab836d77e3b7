"""The freshness proof: how a cache (or a service process) knows that every revocation has reached it.

A proof must cover the whole path, not the last hop: log -> outbox -> relay -> events stream -> invalidation
projection -> cache. So the proof travels that path itself, behind the events it vouches for:

1. **Probe.** A prober (each ``KeyCache``, and each keyledger process for its own ``/ready``) publishes
   ``Probe(i=<its id>, n=<counter>)`` on ``<prefix>.cache.probe`` every ``interval`` and remembers, on its own
   monotonic clock, when it sent probe ``n``.
2. **Checkpoint at the log.** The outbox relay (``relay.py``) takes the probes it has received, THEN reads the
   log's safe horizon ``P`` (``horizon.py``: every position <= P is committed or never will be). Any event that
   committed before the relay took a probe had drawn its position before, so it is <= P. The relay waits until
   the outbox holds nothing <= P (every such event stored by JetStream: a row goes only after its PubAck), THEN
   reads the events stream's last sequence ``S``: every event <= P sits at a stream sequence <= S. It sends
   ``Checkpoint(position=P, stream_seq=S)`` to the invalidation projection (``<prefix>.relay.checkpoint``, core
   NATS).
3. **Through the invalidation path.** The invalidation projection forwards it to ``<prefix>.cache.checkpoint``
   only once its durable consumer's ack floor is >= S: every event up to S has had its invalidation
   acknowledged by JetStream (it acks an event only after that), whichever leader handled it, redeliveries
   included.
4. **Echo.** The prober receives the checkpoint after those invalidations (NATS keeps one connection's messages
   in order; the cache's own rules for gaps and reconnects are in ``client.py``). Its own probe number ``n`` in
   the checkpoint proves: every event committed before I sent probe ``n`` has been invalidated here. So the
   proof's age is ``now - sent[n]``, both readings of this process's own monotonic clock: the clocks of other
   hosts never enter it, and a delay anywhere on the path only makes the proof older, never wrong.

The relay checkpoints at least every 250 ms and after each batch it publishes. Both hops are plain core-NATS
messages: a lost one only delays the next proof. Checkpoints are never stored in the events stream. They once
were, rolled up (``Nats-Rollup: sub``) to the newest, and a rollup is a purge: NATS servers (2.9 among them)
moved the stream's consumers past messages of *other* subjects that were not yet delivered or acknowledged, so
events were skipped, their invalidations never sent, and the next checkpoint vouched for them. The events
stream now refuses rollups (``bus.py``), and nothing ever purges it.

This module holds the wire format and the prober's bookkeeping. It imports no framework, driver or client.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Annotated

import msgspec

__all__ = ["Checkpoint", "Probe", "Prober", "Receipt", "decode_checkpoint", "decode_receipt", "encode_checkpoint",
           "encode_receipt", "merge_probes"]


class Probe(msgspec.Struct, frozen=True):
    """``i``: the prober's random id; ``n``: its probe counter."""

    i: str
    n: int


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """"Every event committed in the log up to ``position`` had its invalidation published before this message,
    and so had every event committed before each prober sent the probe number ``probes[prober]``."""

    position: int
    probes: dict[str, int] = {}
    stream_seq: int = 0  # the events stream's last sequence once every event <= position was stored in it
    epoch: int = 0  # the leadership term that made it (for the curious; the proof does not depend on it)
    created_at: dt.datetime | None = None  # wall clock of the relay that made it, informational only


# Anyone who can publish on the receipts subject can send anything: what PostgreSQL could not store (a NUL in
# text, an integer beyond bigint) fails decoding here, so one hostile receipt is dropped alone.
BIGINT_MAX = 2**63 - 1
Text = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]
Position = Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX)]  # 0: nothing proven yet
Applied = Annotated[int, msgspec.Meta(ge=1, le=BIGINT_MAX)]  # an event's position (the log starts at 1)


class Receipt(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What a cache reports on ``<prefix>.cache.receipts``: it has applied the invalidations of every event up to
    ``position`` (proven by a checkpoint), and also those of the events at ``applied`` (invalidations it applied
    since its last receipt, before a checkpoint covers them: each one's key is evicted, and a verify in flight
    cannot put it back). Positions only: no key ids, no hashes."""

    cache_id: Text
    service: Text = ""
    position: Position
    applied: list[Applied] = []  # (a later field: caches that predate it send only ``position``)


_encoder = msgspec.json.Encoder()
_receipt_decoder = msgspec.json.Decoder(Receipt)
_probe_decoder = msgspec.json.Decoder(Probe)
_checkpoint_decoder = msgspec.json.Decoder(Checkpoint)


def encode_probe(probe: Probe) -> bytes:
    return _encoder.encode(probe)


def decode_probe(payload: bytes) -> Probe:
    return _probe_decoder.decode(payload)


def encode_receipt(receipt: Receipt) -> bytes:
    return _encoder.encode(receipt)


def decode_receipt(payload: bytes) -> Receipt:
    return _receipt_decoder.decode(payload)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    return _encoder.encode(checkpoint)


def decode_checkpoint(payload: bytes) -> Checkpoint:
    return _checkpoint_decoder.decode(payload)


def merge_probes(older: dict[str, int], newer: dict[str, int]) -> dict[str, int]:
    """Probes answered by a later checkpoint are answered by it too: keep each prober's highest number."""
    merged = dict(older)
    for prober, n in newer.items():
        if n > merged.get(prober, -1):
            merged[prober] = n
    return merged


class Prober:
    """One prober's side: numbers its probes, remembers when each was sent, turns echoes into a proof time.

    ``session`` is the owner's connection generation: a probe sent before a disconnect proves nothing about
    what was published while disconnected, so an echo only counts if it comes back in the session its probe
    was sent in, and only while ``accept()`` says the owner has no gap it still has to close.
    """

    MAX_OUTSTANDING = 256  # probes remembered; older ones are forgotten (their echo can only be older news)

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.session = 0
        self.proven_at = float("-inf")  # monotonic send time of the newest echoed probe
        self.proven_position: int | None = None  # the log position the newest proof covered
        # The highest checkpoint position received with no gap open, echo or not: every invalidation of an event
        # up to it has arrived here (what a revocation receipt reports).
        self.seen_position: int | None = None
        self.checkpoints = 0
        self._n = 0
        self._sent: dict[int, tuple[float, int]] = {}  # n -> (monotonic send time, session)

    def next_probe(self) -> bytes:
        self._n += 1
        self._sent[self._n] = (time.monotonic(), self.session)
        if len(self._sent) > self.MAX_OUTSTANDING:
            del self._sent[min(self._sent)]
        return encode_probe(Probe(self.id, self._n))

    def new_session(self) -> None:
        """Call on every disconnect (or dropped message): outstanding probes no longer prove anything."""
        self.session += 1

    def on_checkpoint(self, payload: bytes, accept: bool = True) -> bool:
        """Apply a checkpoint; True when it advanced the proof."""
        try:
            checkpoint = decode_checkpoint(payload)
        except msgspec.DecodeError:
            return False
        self.checkpoints += 1
        if accept and checkpoint.position > (self.seen_position or -1):
            self.seen_position = checkpoint.position
        n = checkpoint.probes.get(self.id)
        sent = self._sent.get(n) if n is not None else None
        if sent is None or not accept or sent[1] != self.session:
            return False
        for old in [k for k in self._sent if k <= n]:
            del self._sent[old]
        if sent[0] > self.proven_at:
            self.proven_at = sent[0]
            self.proven_position = checkpoint.position
            return True
        return False

    def age(self) -> float:
        """Seconds since the send time of the newest echoed probe (inf: no proof yet)."""
        return time.monotonic() - self.proven_at
