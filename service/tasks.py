"""Stopping asyncio tasks for good.

``task.cancel()`` then ``await task`` is not enough with nats-py: its publish swallows a ``CancelledError``
that arrives while it waits on its flush queue (``Client._send_command``), so the cancelled task carries on,
and whoever awaits it waits forever (a test caught a ``KeyCache.close()`` that never returned). ``stop`` cancels
again until every task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

RECANCEL_EVERY_S = 0.1


async def stop(tasks: Iterable[asyncio.Future[object] | None]) -> None:
    """Cancel ``tasks`` (``None`` entries ignored) and return once all have ended, cancelling again every
    ``RECANCEL_EVERY_S`` those that swallowed it. Their results and exceptions are consumed, not raised."""
    pending = {t for t in tasks if t is not None}
    everything = set(pending)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
    for task in everything:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
