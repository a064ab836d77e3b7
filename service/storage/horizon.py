"""The safe horizon of the event log: the highest position below which nothing can still appear.

The gap problem: ``events.position`` is drawn at insert but becomes visible at commit, so a later position can
commit first, and a reader that tails ``position > last`` can skip a row for good. ``schema.sql`` assigns each
writer's xid before its position (trigger ``events_position``), which gives a horizon: read ``L`` = the
sequence's last value, THEN take a snapshot ``S``; every position <= L was drawn by a transaction whose xid
existed before ``S``, so it has either ended or is listed in ``pg_snapshot_xip(S)``. Once none of those is in a
newer snapshot's xip list any more, every position <= L is final: committed and visible, or never to appear.
(This relies on ``events_position_seq`` having CACHE 1, the default: a cached value could be drawn later.)

Two users: the audit sealer (which chains events in position order, ``final_horizon``, blocking) and the
outbox relay (whose freshness checkpoints say "everything up to L has been published", ``begin`` / ``settle``,
which never block the relay's loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

SEQUENCE_LAST_VALUE = "SELECT pg_sequence_last_value('events_position_seq')"
# A snapshot's xip list only holds running xids *below its xmax* (latestCompletedXid + 1): a writer whose xid is
# the newest assigned, with no later xid completed yet, is running but absent from xip (PostgreSQL's
# GetSnapshotData skips xids >= xmax), so reading xip alone let the horizon pass an uncommitted revoke (the
# replay test's resurrected keys). Hence OWN_XID: an autocommitted statement that takes an xid of its own and
# commits. Every writer whose position is <= the sequence value read before it has a smaller xid (positions are
# drawn after the xid, see the events_position trigger), and every snapshot taken after it has xmax > that xid,
# so it lists each such writer still running in its xip.
OWN_XID = "SELECT pg_current_xact_id()::text::bigint"
CURRENT_SNAPSHOT_XIP = (
    "SELECT array_agg(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE x::text::bigint < %s"
)
# "Still running" means: still in a NEW snapshot's xip list. Not pg_xact_status(): a transaction is marked
# committed in the commit log *before* it leaves the proc array, and in between, a new snapshot still treats it
# as running, so its rows are invisible although pg_xact_status already says 'committed' (a replay test caught
# exactly that: a revoke sealed out of the rebuilt table).
STILL_RUNNING = (
    "SELECT array_agg(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x "
    "WHERE x::text::bigint = ANY(%s::bigint[])"
)
# For the relay: still running, and the lowest position not yet published, read in ONE snapshot (one statement),
# so "nobody is running" and "the outbox holds nothing <= L" are facts about the same moment.
SETTLE = """
SELECT (SELECT array_agg(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x
        WHERE x::text::bigint = ANY(%s::bigint[])),
       (SELECT min(position) FROM outbox)
"""


def final_horizon(conn: psycopg.Connection[Any], *, max_wait: float = 5.0, poll: float = 0.002) -> int | None:
    """The highest position L such that every position <= L is final, or None (nothing yet / timed out).

    ``conn`` must be in autocommit mode: the sequence read, the own-xid statement and the snapshot are three
    statements, in that order (a single statement would take its snapshot *before* reading the sequence, and
    the own xid must have committed before the snapshot is taken; see OWN_XID).
    """
    last = conn.execute(SEQUENCE_LAST_VALUE).fetchone()[0]
    if last is None:
        return None
    own = conn.execute(OWN_XID).fetchone()[0]  # its own statement, committed before the snapshot below
    running = conn.execute(CURRENT_SNAPSHOT_XIP, (own,)).fetchone()[0] or []
    deadline = time.monotonic() + max_wait
    while running:
        running = conn.execute(STILL_RUNNING, (running,)).fetchone()[0] or []
        if not running:
            break
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)
    return int(last)


@dataclass
class PendingHorizon:
    """A horizon being established: ``position`` is final once none of ``running`` is running any more."""

    position: int
    running: list[int]


async def begin(conn: psycopg.AsyncConnection[Any]) -> PendingHorizon:
    """Read L and the writers that may still hold positions <= L (three autocommitted statements, in order)."""
    last = (await (await conn.execute(SEQUENCE_LAST_VALUE)).fetchone())[0]
    if last is None:
        return PendingHorizon(0, [])  # nothing was ever appended: any first event gets position >= 1
    own = (await (await conn.execute(OWN_XID)).fetchone())[0]
    running = (await (await conn.execute(CURRENT_SNAPSHOT_XIP, (own,))).fetchone())[0] or []
    return PendingHorizon(int(last), running)


async def settle(conn: psycopg.AsyncConnection[Any], pending: PendingHorizon) -> int | None:
    """One look, no waiting: ``None`` while a writer that may hold a position <= L is running, else the lowest
    position still in the outbox (``0`` when it is empty). Narrows ``pending.running`` as writers end."""
    running, oldest = await (await conn.execute(SETTLE, (pending.running,))).fetchone()
    pending.running = running or []
    if pending.running:
        return None
    return oldest or 0
