#!/usr/bin/env python3
"""keyledger receipts: the receipts projection's own cost per revocation, alone (no HTTP, no load generator).

    python bench/receipts_cost.py [--caches 10] [--batch 50] [--revocations 10000] [--repeat 3]
    DATABASE_URL=... NATS_URL=... python bench/receipts_cost.py    # external servers (see bench/run.py)

What ``revoke_interleaved.py`` cannot resolve (its runs spread +-4%, and the receipts cost about that much): the
direct cost, CPU time counted per process. A ``ReceiptsProjection`` on a fresh database (schema.sql) and a real
NATS connection (its announcements) is fed what it gets under load: batches of ``--batch`` revocations
(``record``, as the subscriber hands them over), then one receipt from each of ``--caches`` caches naming them
all (as the caches' applied receipts do, merged into one batch as ``_receive_forever`` merges them), which
completes them: one write statement, one announcement each. The same with no cache live (what a revocation costs
this projection anyway: it is announced at once, no row) is measured in the same run, alternately, and the
difference printed: the service's CPU (this process's ``time.process_time``) and the PostgreSQL backend's (its
CPU times, read with psutil: the same host), and the WAL written, per revocation. Not counted here: the caches' work to
send receipts, NATS routing them, the service's NATS client reading them (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Servers  # noqa: E402  (bench/run.py: servers)

from keyledger.config import Topology  # noqa: E402
from keyledger.core.events import EnvelopeHead  # noqa: E402
from keyledger.core.freshness import Receipt  # noqa: E402
from keyledger.projections.receipts import ReceiptsProjection  # noqa: E402
from keyledger.storage.schema import migrate  # noqa: E402


def backend_cpu(pid: int) -> float:
    """User + system CPU seconds of a PostgreSQL backend (on this host)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(projection: ReceiptsProjection, conn: psycopg.AsyncConnection[Any], caches: list[str],
                  batches: int, batch: int, first: int) -> dict[str, float]:
    """Feed ``batches`` batches of revocations from position ``first``; each completed by one receipt per cache."""
    pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]
    lsn = "SELECT pg_current_wal_insert_lsn()"
    (wal0,) = await (await conn.execute(lsn)).fetchone()
    now = dt.datetime.now(dt.timezone.utc)
    completed = projection.completed
    cpu, pg = time.process_time(), backend_cpu(pid)
    position = first
    for _ in range(batches):
        for cache_id in caches:  # their receipts keep them live, as their heartbeats would
            projection._caches[cache_id].heard = time.monotonic()
        positions = range(position, position + 2 * batch, 2)  # other events between them, as in the log
        heads = [EnvelopeHead(id=str(p), type="ApiKeyRevoked", key_id=f"key{p:028d}", version=2, position=p,
                              occurred_at=now) for p in positions]
        await projection.record([None] * batch, heads)
        if caches:
            await projection._receive([Receipt(cache_id=c, service="bench", position=position - 1,
                                               applied=list(positions)) for c in caches])
        position += 2 * batch
    cpu, pg = time.process_time() - cpu, backend_cpu(pid) - pg
    (wal,) = await (await conn.execute(f"SELECT pg_wal_lsn_diff(({lsn}), %s::pg_lsn)", (str(wal0),))).fetchone()
    n = batches * batch
    assert projection.completed - completed == n, "every revocation completes"
    return {"service": cpu / n * 1e6, "postgres": pg / n * 1e6, "wal": float(wal) / n}


async def run(servers: Servers, caches_n: int, batch: int, revocations: int, repeat: int) -> None:
    migrate(servers.db_url)
    nc = await nats.connect(servers.nats_url)
    bus = SimpleNamespace(nc=nc, topology=Topology(prefix=servers.prefix, events_stream=servers.events_stream,
                                                   invalidations_stream=servers.inv_stream))
    projection = ReceiptsProjection(servers.db_url, bus)  # type: ignore[arg-type]
    conn = await psycopg.AsyncConnection.connect(servers.db_url, autocommit=True)
    projection._conn = conn  # what ``run`` does, without its loops: this bench drives the batches itself
    await projection._load(conn)
    projection._loaded.set()
    caches = [f"bench-{i}" for i in range(caches_n)]
    await projection._receive([Receipt(cache_id=c, service="bench", position=0) for c in caches])  # all live
    results: dict[str, list[dict[str, float]]] = {"reporting": [], "none": []}
    position, batches = 1, max(1, revocations // batch)
    for _ in range(repeat):
        for side, live in (("reporting", caches), ("none", [])):
            if not live:  # no cache live: every one was last heard long ago
                for cache_id in caches:
                    projection._caches[cache_id].heard = -1e9
            results[side].append(await measure(projection, conn, live, batches, batch, position))
            position += 2 * batch * batches
    await conn.close()
    await nc.close()
    print(f"receipts projection, {caches_n} caches, batches of {batch}, {batches * batch} revocations per measure, "
          f"{repeat} alternations (medians; per revocation):")
    for what, unit in (("service", "us CPU"), ("postgres", "us CPU"), ("wal", "bytes of WAL")):
        on = statistics.median(r[what] for r in results["reporting"])
        off = statistics.median(r[what] for r in results["none"])
        print(f"  {what:10s} {on:8.2f} with caches, {off:8.2f} with none: {on - off:8.2f} {unit} for the receipts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", type=int, default=10)
    ap.add_argument("--batch", type=int, default=50, help="revocations per batch (~50 under load on machine C)")
    ap.add_argument("--revocations", type=int, default=10_000, help="per measure")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    servers = Servers()
    try:
        asyncio.run(run(servers, args.caches, args.batch, args.revocations, args.repeat))
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
