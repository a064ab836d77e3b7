"""The outbox relay: every committed event reaches JetStream, at least once, in position order per batch;
and behind the events, the freshness checkpoints that prove it (``freshness.py``).

Guarantee without two-phase commit: an event's outbox row is committed with the event (trigger in
schema.sql) and deleted only after JetStream acknowledged the publish. So:

* NATS down: publishes fail or time out, rows stay, the relay retries with backoff, and everything goes out
  when NATS is back. A publish nats-py merely buffered while reconnecting proves nothing; only the PubAck
  deletes a row.
* Process killed after the commit: the rows are still there at restart and go out then.
* Killed between the ack and the delete: the event is published again with the same ``Nats-Msg-Id`` (the
  event id): JetStream drops it inside its duplicate window, and consumers deduplicate by (keyId, version).
* An event the broker refuses for its size (``max_payload``, a stream's ``max_msg_size``) is published in a
  reduced form instead (``Envelope.reduced``: ids, version, position, type and the key hashes; no actor, no
  other data), so caches still hear of it and it never blocks the events behind it. The log keeps it whole.

Order: rows are published in position order, one batch at a time, and a batch that fails is retried from
its first unacknowledged row, so nothing is skipped. A key's version n+1 is only appended after version n
committed, so n is always in an earlier batch or earlier in the same one. The publishes of a batch are in
flight together (one ack round trip per batch, not per event); if one fails while a later one of the same
batch was stored, the retry lands after it, so the stream order is "almost always" per-key order. Consumers
must (and ours do) order by the envelope's per-key ``version``, never by arrival.

Only the background leader relays (``leadership.py``); ``fence()`` is checked right before every publish, so a
deposed leader that wakes up publishes nothing more.

Checkpoints never block the relay's loop: a checkpoint is *begun* (probes taken, then the horizon read) and
then *settled* by one look per pass of the loop, sent once no writer that could hold a position <= its
horizon is running and the outbox holds nothing <= it (``core/freshness.py`` has the whole proof).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from nats.errors import MaxPayloadError
from nats.js.errors import APIError, NoStreamResponseError

from .. import tasks
from ..core.events import RecordedEvent, encode_envelope, encode_reduced_envelope, kind
from ..core.freshness import Checkpoint, decode_probe, encode_checkpoint, merge_probes
from ..storage import horizon
from ..storage.connections import long_lived
from ..storage.log import EVENT_COLUMNS, row_to_event
from .bus import Bus, ensure_streams

log = logging.getLogger("keyledger.relay")

# The oldest pending positions come from the outbox's primary-key index, then each event by its own key.
NEXT_BATCH = f"""
SELECT {EVENT_COLUMNS}
FROM (SELECT position FROM outbox ORDER BY position LIMIT %s) o
JOIN events e ON e.position = o.position
ORDER BY e.position
"""
MARK_PUBLISHED = "DELETE FROM outbox WHERE position = ANY(%s)"
# The outbox is a queue: rows live milliseconds. Vacuum it ourselves every few seconds so dead rows never pile
# up, even on servers where autovacuum is off or slow (it is a tiny table: this costs next to nothing).
VACUUM_OUTBOX = "VACUUM (SKIP_LOCKED) outbox"
VACUUM_EVERY_S = 5.0
# JetStream's "message size exceeds maximum allowed" (a stream's max_msg_size).
JS_MESSAGE_TOO_LARGE = 10054
# Under a steady stream of batches, a checkpoint per batch would cost a horizon read, a stream-sequence read and
# two core messages per batch, in the process that also serves HTTP: at most one per this many seconds instead
# (the 250 ms "at least" comes from ``checkpoint_every``). At 20 ms, revoke c=16 ran 13% below the release
# without checkpoints (docs/benchmarks.md); a proof 100 ms younger buys a cache nothing against its 1 s staleness.
CHECKPOINT_MIN_GAP = 0.1


def _too_large(error: BaseException) -> bool:
    return isinstance(error, MaxPayloadError) or (isinstance(error, APIError) and error.err_code == JS_MESSAGE_TOO_LARGE)


def _unfenced() -> None:
    pass


class OutboxRelay:
    def __init__(self, database_url: str, bus: Bus, *, batch_size: int = 500, poll_interval: float = 0.5,
                 publish_timeout: float = 2.0, checkpoint_every: float = 0.25,
                 fence: Callable[[], None] = _unfenced, epoch: Callable[[], int | None] = lambda: None) -> None:
        self.database_url = database_url
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.checkpoint_every = checkpoint_every
        self.fence = fence
        self.epoch = epoch
        self._wake = asyncio.Event()
        self._probes: dict[str, int] = {}
        self.vacuum = True
        # Figures for /ready and /metrics.
        self.published = 0
        self.reduced = 0
        self.checkpoints = 0
        self.last_ack = float("-inf")  # monotonic time of the last JetStream acknowledgement (progress)

    def nudge(self) -> None:
        """Called after a commit in this process, so publication does not wait for the next poll."""
        self._wake.set()

    def on_probe(self, payload: bytes) -> None:
        """A prober's probe arrived (core NATS): answer it with the next checkpoint begun after now."""
        try:
            probe = decode_probe(payload)
        except Exception:
            return
        if len(self._probes) < 100_000 and probe.n > self._probes.get(probe.i, -1):
            self._probes[probe.i] = probe.n

    async def run(self) -> None:
        backoff = 0.05
        while True:
            try:
                # synchronous_commit off for this connection's own writes (outbox deletes, the horizon's own
                # xid): losing one in a crash only republishes events JetStream deduplicates (``Nats-Msg-Id``),
                # or takes a new xid. It keeps the relay's fsyncs from queueing beside the appends' own.
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                                 **long_lived(self.database_url,
                                                                              "-c synchronous_commit=off",
                                                                              name="relay")) as conn:
                    backoff = 0.05
                    await self._relay(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)  # soon after NATS is back (a stream-leader election: 5-8 s)

    async def _relay(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One pass of the loop: publish the next batch FIRST (an event never waits behind checkpoint work),
        then begin a checkpoint if one is due, then take one look at the pending one. Every wait listens for a
        nudge, so a commit in this process is published at once whatever the loop was doing."""
        js = await self.bus.ready()
        loop = asyncio.get_running_loop()
        failures = 0
        vacuum_at = loop.time() + VACUUM_EVERY_S
        pending: tuple[horizon.PendingHorizon, dict[str, int]] | None = None
        checkpoint_due = 0.0
        begun = float("-inf")
        settling = 0  # looks at the pending horizon so far (a long transaction below it: back off)
        sending: asyncio.Future[bool] | None = None  # the checkpoint in flight (one at a time)
        try:
            while True:
                now = loop.time()
                if self.vacuum and now >= vacuum_at:
                    vacuum_at = now + VACUUM_EVERY_S
                    try:
                        await conn.execute(VACUUM_OUTBOX)
                    except psycopg.errors.InsufficientPrivilege:
                        log.info("not the outbox's owner: leaving its vacuuming to autovacuum")
                        self.vacuum = False
                self._wake.clear()
                cur = await conn.execute(NEXT_BATCH, (self.batch_size,))
                rows = await cur.fetchall()
                if rows:
                    if not await self._publish([row_to_event(r) for r in rows], conn, js):
                        failures += 1
                        await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                        continue
                    failures = 0
                    # A checkpoint follows every batch (at most one per CHECKPOINT_MIN_GAP under a steady stream).
                    checkpoint_due = min(checkpoint_due, begun + CHECKPOINT_MIN_GAP)
                now = loop.time()
                if pending is None and now >= checkpoint_due and (sending is None or sending.done()):
                    # Probes first, THEN the horizon: an event committed before a probe arrived is <= the horizon.
                    probes, self._probes = self._probes, {}
                    pending, begun, settling = (await horizon.begin(conn), probes), now, 0
                if pending is not None:
                    oldest = await horizon.settle(conn, pending[0])
                    if oldest is not None and not 0 < oldest <= pending[0].position:
                        # Sent beside the loop: the stream-sequence read is a JetStream round trip that the next
                        # batch must not wait behind (read later, the sequence is only higher: it still covers).
                        sending = asyncio.ensure_future(self._checkpoint(js, pending[0].position, pending[1]))
                        checkpoint_due = loop.time() + self.checkpoint_every
                        pending = None
                        continue
                    if not rows:  # a writer below the horizon is still running, or its row just became visible
                        settling += 1
                        if oldest is None:
                            await self._sleep(min(0.002 * settling, 0.05))
                        continue
                if rows:
                    continue
                await self._sleep(max(0.0, min(self.poll_interval, checkpoint_due - now)))
        finally:
            await tasks.stop([sending])

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once for a nudge (a commit in this process)."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _publish(self, events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any], js: Any) -> bool:
        """Publish one batch; mark the leading run of acknowledged events. True when all were acknowledged."""
        topology = self.bus.topology
        self.fence()
        # Sent in order on one connection; the acks are awaited together. Each publish is nats-py's own coroutine
        # (no wrapper of ours per event); the rare event too large for NATS is handled after the gather.
        subjects = [topology.event_subject(kind(e.type), e.stream_id) for e in events]
        results: list[Any] = await asyncio.gather(
            *(js.publish(subject, encode_envelope(e), timeout=self.publish_timeout, headers={"Nats-Msg-Id": e.id})
              for subject, e in zip(subjects, events)),
            return_exceptions=True,
        )
        for i, result in enumerate(results):
            if isinstance(result, BaseException) and _too_large(result):
                results[i] = await self._publish_reduced(js, subjects[i], events[i])
        # Only the leading run of acknowledged events is marked: the first failure and everything after
        # it stay in the outbox and are retried in order.
        acked = []
        for e, result in zip(events, results):
            if isinstance(result, BaseException):
                break
            acked.append(e.position)
        if acked:
            self.last_ack = time.monotonic()
            await conn.execute(MARK_PUBLISHED, (acked,))
            self.published += len(acked)
        if len(acked) == len(events):
            return True
        error = next(r for r in results if isinstance(r, BaseException))
        log.warning("publish failed (%s); %d events wait in the outbox", type(error).__name__,
                    len(events) - len(acked))
        if isinstance(error, NoStreamResponseError):
            # NATS came back without its JetStream state (new volume, stream deleted): declare the
            # streams again, or every retry fails the same way until the process restarts.
            try:
                await ensure_streams(js, topology, self.bus.streams)
            except Exception as exc:
                log.warning("could not declare the streams: %s: %s", type(exc).__name__, exc)
        return False

    async def _publish_reduced(self, js: Any, subject: str, event: RecordedEvent) -> Any:
        """The broker refused ``event`` whole: publish a reduced form, marked as such, rather than a poison message
        that blocks every event behind it (consumers that need the rest read the log: history, export). Returns
        the ack, or the exception (as ``gather`` would)."""
        log.warning("event %s (position %d) is too large for NATS; publishing its reduced form",
                    event.id, event.position)
        self.reduced += 1
        try:
            return await js.publish(subject, encode_reduced_envelope(event), timeout=self.publish_timeout,
                                    headers={"Nats-Msg-Id": event.id, "Keyledger-Reduced": "true"})
        except Exception as exc:
            return exc

    async def _checkpoint(self, js: Any, position: int, probes: dict[str, int]) -> bool:
        """Every event <= ``position`` is stored in the events stream (the outbox holds none of them), so the
        stream's last sequence, read NOW, is at or above each of theirs, whoever published them (an earlier
        leader, a duplicate's original). The invalidation projection forwards the checkpoint once its consumer
        has acknowledged everything up to that sequence."""
        topology = self.bus.topology
        try:
            info = await asyncio.wait_for(js.stream_info(topology.events_stream), self.publish_timeout)
            stream_seq = info.state.last_seq
        except Exception as exc:
            log.debug("checkpoint: no stream info: %s: %s", type(exc).__name__, exc)
            self._probes = merge_probes(probes, self._probes)  # answered by a later checkpoint
            return False
        self.last_ack = time.monotonic()  # JetStream answered: progress, even when no event is written
        checkpoint = Checkpoint(position=position, probes=probes, stream_seq=stream_seq, epoch=self.epoch() or 0,
                                created_at=dt.datetime.now(dt.timezone.utc))
        self.fence()
        await self.bus.nc.publish(topology.relay_checkpoint_subject, encode_checkpoint(checkpoint))  # type: ignore[union-attr]
        self.checkpoints += 1
        return True
