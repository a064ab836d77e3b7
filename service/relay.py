"""The outbox relay: every committed event reaches JetStream, at least once, in position order per batch.

Guarantee without two-phase commit: an event's outbox row is committed with the event (trigger in
schema.sql) and deleted only after JetStream acknowledged the publish. So:

* NATS down: publishes fail or time out, rows stay, the relay retries with backoff, and everything goes out
  when NATS is back. A publish nats-py merely buffered while reconnecting proves nothing; only the PubAck
  deletes a row.
* Process killed after the commit: the rows are still there at restart and go out then.
* Killed between the ack and the delete: the event is published again with the same ``Nats-Msg-Id`` (the
  event id): JetStream drops it inside its duplicate window, and consumers deduplicate by (keyId, version).

Order: rows are published in position order, one batch at a time, and a batch that fails is retried from
its first unacknowledged row, so nothing is skipped. A key's version n+1 is only appended after version n
committed, so n is always in an earlier batch or earlier in the same one. The publishes of a batch are in
flight together (one ack round trip per batch, not per event); if one fails while a later one of the same
batch was stored, the retry lands after it, so the stream order is "almost always" per-key order. Consumers
must (and ours do) order by the envelope's per-key ``version``, never by arrival. Only one relay publishes
at a time (a Postgres advisory lock), so several service processes never interleave their batches.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from nats.js.errors import NoStreamResponseError

from .bus import Bus, ensure_streams
from .config import PG_KEEPALIVES
from .events import encode_envelope, kind
from .log import EVENT_COLUMNS, row_to_event

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
LEADER_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('keyledger.outbox-relay', 0))"


class OutboxRelay:
    def __init__(self, database_url: str, bus: Bus, *, batch_size: int = 500, poll_interval: float = 0.5,
                 publish_timeout: float = 2.0) -> None:
        self.database_url = database_url
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self._wake = asyncio.Event()
        self.published = 0
        self.vacuum = True

    def nudge(self) -> None:
        """Called after a commit in this process, so publication does not wait for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.05
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                                 **PG_KEEPALIVES) as conn:
                    await self._lead(conn)
                    backoff = 0.05
                    await self._relay(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Session-level advisory lock: held while this connection lives, released if the process dies.
        while not (await (await conn.execute(LEADER_LOCK)).fetchone())[0]:
            await asyncio.sleep(1.0)

    async def _relay(self, conn: psycopg.AsyncConnection[Any]) -> None:
        js = await self.bus.ready()
        topology = self.bus.topology
        failures = 0
        vacuum_at = asyncio.get_running_loop().time() + VACUUM_EVERY_S
        while True:
            if self.vacuum and asyncio.get_running_loop().time() >= vacuum_at:
                vacuum_at = asyncio.get_running_loop().time() + VACUUM_EVERY_S
                try:
                    await conn.execute(VACUUM_OUTBOX)
                except psycopg.errors.InsufficientPrivilege:
                    log.info("not the outbox's owner: leaving its vacuuming to autovacuum")
                    self.vacuum = False
            self._wake.clear()
            cur = await conn.execute(NEXT_BATCH, (self.batch_size,))
            rows = await cur.fetchall()
            if not rows:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                except asyncio.TimeoutError:
                    pass
                continue
            events = [row_to_event(r) for r in rows]
            # Sent in order on one connection; the acks are awaited together.
            results = await asyncio.gather(
                *(
                    js.publish(
                        topology.event_subject(kind(e.type), e.stream_id),
                        encode_envelope(e),
                        timeout=self.publish_timeout,
                        headers={"Nats-Msg-Id": e.id},
                    )
                    for e in events
                ),
                return_exceptions=True,
            )
            # Only the leading run of acknowledged events is marked: the first failure and everything after
            # it stay in the outbox and are retried in order.
            acked = []
            for e, result in zip(events, results):
                if isinstance(result, BaseException):
                    break
                acked.append(e.position)
            if acked:
                await conn.execute(MARK_PUBLISHED, (acked,))
                self.published += len(acked)
            if len(acked) < len(events):
                failures += 1
                error = next(r for r in results if isinstance(r, BaseException))
                log.warning("publish failed (%s); %d events wait in the outbox", type(error).__name__,
                            len(events) - len(acked))
                if isinstance(error, NoStreamResponseError):
                    # NATS came back without its JetStream state (new volume, stream deleted): declare the
                    # streams again, or every retry fails the same way until the process restarts.
                    try:
                        await ensure_streams(js, topology)
                    except Exception as exc:
                        log.warning("could not declare the streams: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
            else:
                failures = 0
