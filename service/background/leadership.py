"""Background leadership: a lease with an epoch, renewed only while the leader makes progress.

One process at a time runs the background work (outbox relay, subscriber projections, audit sealer, expiry
sweeper). The lease lives in ``keyledger_leader`` (schema.sql):

* **Held** by renewing it every ``renew_every`` seconds for ``ttl`` seconds, on the database's clock only (the
  hosts' clocks never have to agree). While ``healthy()`` says its work progresses (the runtime passes
  "JetStream acknowledged something within the last second") the leader renews. Without progress it releases
  the lease if another process *challenged* it within the last second (``challenger()``: the runtime passes
  "JetStream has answered me for 2 s, also since my freshness proof went over a second old"), so a leader cut
  from NATS hands over to a process that reaches it; unchallenged (nobody can do better: a stream-leader
  election, NATS down everywhere) it keeps the lease, and its consumers, and resumes as soon as JetStream does.
* **Lost** when a renewal fails or is skipped: killed (nothing renews), hung (SIGSTOP: nothing renews), cut from
  NATS (not healthy, and challenged) or from the database. Another process takes over as soon as the lease has
  expired, within ``ttl`` + one poll (about 1.75 s by default), drawing the next epoch, if it is ``eligible()``: the
  runtime passes "JetStream answered me within the last second", so while the events stream elects a leader
  (a NATS node lost) the lease is not handed around to processes that cannot publish either.
* **Fenced**: a deposed leader may wake up (SIGCONT) with tasks mid-flight. ``valid()`` is a local check with
  no round trip: the lease counts as held until ``ttl`` after the *start* of the last successful renewal, on
  this process's monotonic clock, which keeps running while a process is stopped; a renewal starts before the
  database stamps it, so the local deadline always falls before the database's. Every worker calls
  ``check()`` right before it publishes, seals or sweeps; the sealer also calls ``keyledger_fence(epoch)``
  inside its transaction, so a seal can never commit for a past epoch. What a deposed publisher could still
  send in the instant between its check and its write is harmless by design: JetStream drops a repeated
  ``Nats-Msg-Id``, consumers apply by (key, version), and a checkpoint only ever proves something true.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from .. import tasks
from ..storage.connections import long_lived

log = logging.getLogger("keyledger.leadership")

# Take the lease if it is free or expired (or ours from a term we lost track of): a new epoch either way.
ACQUIRE = """
INSERT INTO keyledger_leader AS l (holder, epoch, expires_at)
VALUES (%(holder)s, 1, clock_timestamp() + %(ttl)s * interval '1 second')
ON CONFLICT (singleton) DO UPDATE
    SET holder = excluded.holder, epoch = l.epoch + 1, expires_at = excluded.expires_at
    WHERE l.expires_at <= clock_timestamp()
RETURNING epoch
"""
RENEW = """
UPDATE keyledger_leader SET expires_at = clock_timestamp() + %(ttl)s * interval '1 second'
WHERE holder = %(holder)s AND epoch = %(epoch)s AND expires_at > clock_timestamp()
RETURNING epoch
"""
RELEASE = "UPDATE keyledger_leader SET expires_at = '-infinity' WHERE holder = %(holder)s AND epoch = %(epoch)s"
# A process that could do the leader's work (JetStream answers it) but sees no proof that the leader does it
# says so on the lease. The leader, when it makes no progress, gives up only if challenged recently: if no other
# process reaches JetStream either (the events stream electing a leader, NATS down everywhere), handing the lease
# around helps nobody and restarts every projection's consumers each time.
CHALLENGE = "UPDATE keyledger_leader SET challenged_at = clock_timestamp() WHERE expires_at > clock_timestamp()"
CHALLENGED = "SELECT challenged_at > clock_timestamp() - %(within)s * interval '1 second' FROM keyledger_leader"
CHALLENGE_VALID_S = 1.0


class Deposed(Exception):
    """This process's term is over: stop before writing anything."""


class Lease:
    """The lease as one process sees it. ``epoch`` is None while this process does not lead."""

    def __init__(self, database_url: str, *, ttl: float = 1.5, renew_every: float = 0.3, poll: float = 0.25) -> None:
        self.database_url = database_url
        self.ttl = ttl
        self.renew_every = renew_every
        self.poll = poll
        self.epoch: int | None = None
        self._holder = ""
        self._deadline = 0.0  # monotonic; the lease is surely ours before it

    def valid(self) -> bool:
        return self.epoch is not None and time.monotonic() < self._deadline

    def check(self) -> None:
        """Raise ``Deposed`` unless the lease is surely still ours."""
        if not self.valid():
            raise Deposed(f"leadership epoch {self.epoch} is over")

    async def hold(self, lead: Callable[[], Any], *, eligible: Callable[[], bool],
                   healthy: Callable[[], bool], challenger: Callable[[], bool] = lambda: False) -> None:
        """Forever: wait until ``eligible()`` and the lease is free, take it, run ``lead()`` while renewing it,
        and cancel ``lead()`` the moment the lease is lost. While another process leads, challenge it whenever
        ``challenger()`` (this process could do its work and sees it undone). Never returns; cancel it to stop."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, connect_timeout=3,
                                                                 **long_lived(self.database_url, name="lease")
                                                                 ) as conn:
                    # A renewal that hangs must fail before the lease runs out, not block the loop.
                    await conn.execute(f"SET statement_timeout = {int(self.ttl * 1000 / 2)}")
                    while True:
                        if eligible() and await self._acquire(conn):
                            await self._lead(conn, lead, healthy)
                        elif challenger():
                            await conn.execute(CHALLENGE)
                        await asyncio.sleep(self.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(self.poll)

    async def _acquire(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        holder = uuid.uuid4().hex
        started = time.monotonic()
        row = await (await conn.execute(ACQUIRE, {"holder": holder, "ttl": self.ttl})).fetchone()
        if row is None:
            return False
        self._holder, self.epoch, self._deadline = holder, int(row[0]), started + self.ttl
        log.info("leading background work (epoch %d)", self.epoch)
        return True

    async def _lead(self, conn: psycopg.AsyncConnection[Any], lead: Callable[[], Any],
                    healthy: Callable[[], bool]) -> None:
        work = asyncio.ensure_future(lead())
        why = "stopped"
        stalled = False
        try:
            while not work.done():
                await asyncio.wait([work], timeout=self.renew_every)
                if work.done():
                    why = "background work ended"
                    break
                if not healthy():
                    if await (await conn.execute(CHALLENGED, {"within": CHALLENGE_VALID_S})).fetchone() == (True,):
                        why = "no progress (NATS unreachable?), and another process reaches JetStream"
                        break
                    if not stalled:
                        stalled = True
                        log.warning("background work makes no progress, and no other process reaches JetStream "
                                    "either: keeping the lease (epoch %d)", self.epoch)
                else:
                    stalled = False
                started = time.monotonic()
                try:
                    row = await (await conn.execute(RENEW, {"holder": self._holder, "ttl": self.ttl,
                                                            "epoch": self.epoch})).fetchone()
                except psycopg.Error as exc:
                    why = f"renewal failed ({type(exc).__name__})"
                    raise
                if row is None:
                    why = "lease taken over"
                    break
                self._deadline = started + self.ttl
        finally:
            epoch, self.epoch = self.epoch, None
            await tasks.stop([work])
            if why != "lease taken over":  # hand over at once rather than when the lease runs out
                try:
                    await conn.execute(RELEASE, {"holder": self._holder, "epoch": epoch})
                except Exception:
                    pass
            # A shutdown (cancelled: "stopped") is routine; losing the lease any other way is worth a WARNING.
            (log.info if why == "stopped" else log.warning)("gave up background leadership (epoch %s): %s",
                                                             epoch, why)
        if why.startswith("no progress"):
            # Let a process that can reach NATS take over before competing again: candidates look every
            # ``poll``, so one lease period is plenty; a lone process (an overloaded one) is back soon after.
            await asyncio.sleep(self.ttl + self.poll)

