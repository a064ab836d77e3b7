"""What runs inside one ``keyledger serve`` process besides the HTTP handlers, and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from .. import tasks
from ..config import Settings, nats_connect_options
from ..core.freshness import Prober
from ..ops.audit import AuditSealer
from ..projections import consumer
from ..projections.invalidations import NAME as INVALIDATIONS
from ..projections.invalidations import InvalidationProjection
from ..projections.receipts import NAME as RECEIPTS
from ..projections.receipts import ReceiptsProjection
from ..projections.subscriber import ActiveKeysSubscriber
from ..storage.connections import long_lived
from ..storage.usage import LastRequests
from .bus import Bus
from .leadership import Lease
from .relay import OutboxRelay
from .sweeper import ExpirySweeper

log = logging.getLogger("keyledger")

PROBE_EVERY_S = 0.25  # this process's own freshness probes (for /ready and /metrics)
# The leader keeps its lease while JetStream acknowledged something of its relay within this window; the
# relay checkpoints every 250 ms, so a healthy leader is always well inside it.
LEADER_PROGRESS_WINDOW_S = 1.0
LEADER_STARTUP_GRACE_S = 1.0
# A process may take the lead only while JetStream answers it (the events stream's info, asked this often by a
# process that does not lead): while the events stream elects a leader (a node lost), nobody can publish, and a
# lease handed from process to process then only restarts every projection's consumers, again and again
# (measured before: 3-4 terms per lost node, invalidations back a median 14.7 s after the kill).
JETSTREAM_CHECK_EVERY_S = 0.25
JETSTREAM_ANSWERED_WITHIN_S = 1.0
# ... and challenge the leader (leadership.py) when its own freshness proof is older than this (the leader's
# relay checkpoints every 250 ms, so a proof this old means propagation stopped) while JetStream has answered it
# for longer than that: right after an election JetStream answers everyone, and the leader needs a moment to get
# its first acknowledgement (handing over then cost a median 2 s more, per round, in bench/cluster_bench.py).
CHALLENGE_AFTER_S = 1.0
CHALLENGE_AFTER_ANSWERED_FOR_S = 2.0

# jsonb parameters and results through msgspec rather than the stdlib json module: same JSON, less CPU on
# the hot path (event metadata is a jsonb parameter of every append).
set_json_dumps(msgspec.json.encode)
set_json_loads(msgspec.json.decode)


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    """Check a pooled connection before use, without a round trip unless something looks wrong.

    A PostgreSQL restart breaks every idle connection in the pool; unchecked, the next requests would get them
    and answer 503 although the database is back. A full check on every checkout would add a round trip to
    the hot path. But an idle connection has nothing to read unless the server spoke first (a termination
    notice, or the socket closed): so we peek at the socket, and only then run the real check, which fails and
    makes the pool discard the connection.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        await AsyncConnectionPool.check_connection(conn)


class Runtime:
    """One process's share of the service: the HTTP pool, its own freshness prober, and, in exactly one
    process, the background work.

    Several processes (``serve --workers N``, or several hosts) can serve the API at once. The outbox relay,
    the NATS subscribers, the audit sealer and the expiry sweeper run in one of them only: the holder of the
    leadership lease (leadership.py), which moves to another process within about 2 s when the leader is
    killed, hung or cut from NATS. One relay keeps batches in position order; one puller per durable consumer
    keeps the subscribers' batch acknowledgements (AckAll) safe.

    After a commit, a handler nudges the relay so publication does not wait for its next poll: directly when
    the relay runs in this process, otherwise with an empty core-NATS message on ``<prefix>.internal.wake``
    that the leader listens to. The ping carries nothing; losing it only delays publication to the next poll.

    Every process also probes the pipeline (freshness.py) like a cache would: ``freshness.age()`` is how old
    this process's proof is that every committed event has been invalidated everywhere, which ``/ready``
    and ``/metrics`` report. Progress, not connectivity.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = AsyncConnectionPool(
            settings.database_url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            kwargs={"autocommit": True, "connect_timeout": 3,
                    **long_lived(settings.database_url, name="requests")},
            timeout=5.0,
            check=_check_if_idle,
            # psycopg_pool's reconnect backoff doubles up to reconnect_timeout (300 s by default): after a 30 s
            # outage the service stayed 503 for 27 s with the database back. A short timeout ends a failing
            # attempt early; the next request starts a fresh one.
            reconnect_timeout=10.0,
            open=False,
        )
        self.bus = Bus(settings.nats_url, settings.topology, streams=settings.streams,
                       options=nats_connect_options())
        self.lease = Lease(settings.database_url)
        self.relay = OutboxRelay(settings.database_url, self.bus, poll_interval=settings.relay_poll_s,
                                 fence=self.lease.check, epoch=lambda: self.lease.epoch)
        self.invalidations: InvalidationProjection | None = None
        self.receipts: ReceiptsProjection | None = None
        # lastRequest of keys without limits: noted by verify in memory, written in batches (usage.py).
        self.last_requests = LastRequests(self.pool, settings.last_request_flush_s)
        self.freshness = Prober()
        self._flusher: asyncio.Task[Any] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._term_started = float("-inf")
        self._jetstream_answered = float("-inf")  # monotonic; the last time JetStream answered this process
        self._jetstream_answering_since = float("inf")  # ... and since when, without a miss in between
        self._wake_subject = f"{settings.topology.prefix}.internal.wake"

    @property
    def leader(self) -> bool:
        return self.lease.valid()

    def nudge_relay(self) -> None:
        if self.leader:
            self.relay.nudge()
        elif self.bus.connected:  # the relay runs in another process (also when this one never leads)
            asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(self._wake_subject, b"")  # type: ignore[union-attr]

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=15)
        self._flusher = asyncio.create_task(self.last_requests.run(), name="last-request-flusher")
        self.bus.on_disconnect = self.freshness.new_session
        self.bus.start()
        self._tasks.append(asyncio.create_task(self._probe_forever(), name="freshness-prober"))
        if self.settings.run_relay or self.settings.run_projections:
            self._tasks.append(asyncio.create_task(
                self.lease.hold(self._lead, eligible=self._eligible, healthy=self._progressing,
                                challenger=self._challenger),
                name="background-leadership"))
            self._tasks.append(asyncio.create_task(self._check_jetstream_forever(), name="jetstream-check"))

    def _progressing(self) -> bool:
        """The leader keeps its lease only while JetStream acknowledges its work: the relay's checkpoints
        (every 250 ms) are acknowledged even when no event is written. A start-up grace covers the first."""
        if not self.settings.run_relay:
            return self.bus.connected
        last = max(self.relay.last_ack, self._term_started + LEADER_STARTUP_GRACE_S)
        return time.monotonic() - last < LEADER_PROGRESS_WINDOW_S

    def _eligible(self) -> bool:
        """Take the lead only with JetStream answering now: a leader that cannot publish helps nobody."""
        return self.bus.is_ready and time.monotonic() - self._jetstream_answered < JETSTREAM_ANSWERED_WITHIN_S

    def _challenger(self) -> bool:
        """This process could do the leader's work, and sees no proof that it is being done: JetStream answered
        it after its proof had gone stale (an answer to a question asked before the leader's NATS node died does
        not count), and has kept answering for a while (not just back from an election)."""
        return (self._eligible() and self.freshness.age() > CHALLENGE_AFTER_S
                and self._jetstream_answered - self.freshness.proven_at > CHALLENGE_AFTER_S
                and time.monotonic() - self._jetstream_answering_since > CHALLENGE_AFTER_ANSWERED_FOR_S)

    async def _check_jetstream_forever(self) -> None:
        """While this process does not lead: ask for the events stream's info (its stream leader answers)."""
        while True:
            if self.bus.is_ready and not self.leader:
                asked = self.bus.js.stream_info(self.settings.topology.events_stream)  # type: ignore[union-attr]
                try:
                    await asyncio.wait_for(asked, JETSTREAM_ANSWERED_WITHIN_S)
                    self._jetstream_answered = time.monotonic()
                    self._jetstream_answering_since = min(self._jetstream_answering_since, self._jetstream_answered)
                except Exception:  # no stream leader (an election), NATS gone: not eligible
                    self._jetstream_answering_since = float("inf")
            else:
                self._jetstream_answering_since = float("inf")
            await asyncio.sleep(JETSTREAM_CHECK_EVERY_S)

    async def _lead(self) -> None:
        self._term_started = time.monotonic()
        fence = self.lease.check
        workers: list[asyncio.Task[Any]] = []
        if self.settings.run_relay:
            workers.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
            workers.append(asyncio.create_task(self.bus.listen(self.settings.topology.probe_subject,
                                                            self.relay.on_probe), name="probes"))
            sealer = AuditSealer(self.settings.database_url, self.bus, fence=fence,
                                 epoch=lambda: self.lease.epoch)
            workers.append(asyncio.create_task(sealer.run(), name="audit-sealer"))
        if self.settings.run_projections:
            # Invalidations and receipts take their events from the active-keys subscriber's batches: one
            # consumer for all three (subscriber.py), whose acks vouch for the invalidations' checkpoints.
            receipts = self.receipts = ReceiptsProjection(self.settings.database_url, self.bus, fence=fence)
            workers.append(asyncio.create_task(receipts.run(), name="projection-receipts"))
            self.invalidations = InvalidationProjection(self.bus, fence=fence, epoch=self.lease.epoch,
                                                        consumer=ActiveKeysSubscriber.consumer,
                                                        on_forward=[receipts.forwarded])
            workers.append(asyncio.create_task(self.invalidations.run_checkpoints(), name="invalidation-checkpoints"))
            sub = ActiveKeysSubscriber(self.settings.database_url, self.bus, fence=fence, epoch=self.lease.epoch,
                                       followers=[self.invalidations.follow, receipts.record],
                                       on_ack=[self.invalidations.acked])
            workers.append(asyncio.create_task(sub.run(), name="projection-active-keys"))
            workers.append(asyncio.create_task(consumer.retire(self.bus, [RECEIPTS, INVALIDATIONS]),
                                               name="retire-consumers"))
            sweeper = ExpirySweeper(self.settings.database_url, on_recorded=self.relay.nudge, fence=fence)
            workers.append(asyncio.create_task(sweeper.run(), name="expiry-sweeper"))
        workers.append(asyncio.create_task(self.bus.listen(self._wake_subject, lambda _: self.relay.nudge()),
                                           name="relay-wake"))
        try:
            await asyncio.gather(*workers)
        finally:
            await tasks.stop(workers)

    async def _probe_forever(self) -> None:
        """Probe the pipeline every PROBE_EVERY_S and take the checkpoints' echoes (freshness.py)."""
        await self.bus.ready()
        topology = self.settings.topology
        nc = self.bus.nc
        assert nc is not None

        async def on_checkpoint(msg: Any) -> None:
            self.freshness.on_checkpoint(msg.data)

        await nc.subscribe(topology.checkpoint_subject, cb=on_checkpoint)
        while True:
            if self.bus.connected:
                with contextlib.suppress(Exception):
                    await nc.publish(topology.probe_subject, self.freshness.next_probe())
            await asyncio.sleep(PROBE_EVERY_S)

    async def stop(self) -> None:
        await tasks.stop(self._tasks)
        if self._flusher is not None:  # then the last lastRequest times, while the pool is still open
            await tasks.stop([self._flusher])
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.last_requests.flush(), timeout=5.0)
        await self.bus.close()
        await self.pool.close()
