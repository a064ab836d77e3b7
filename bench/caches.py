#!/usr/bin/env python3
"""N reporting ``KeyCache`` instances in one process, for ``bench/run.py --caches N``.

    KEYLEDGER_SUBJECT_PREFIX=... KEYLEDGER_INVALIDATIONS_STREAM=... NATS_URL=... \\
        python bench/caches.py --base http://127.0.0.1:PORT --caches 10

run.py starts this with the service's environment, so the topology (subject prefix, streams) is the service's,
read with ``Topology.from_env()`` as the service reads it, and ``keyledger`` is imported from the same place
(``--pythonpath``). The caches (``cache_id`` ``bench-cache-<i>``, ``service="bench"``) keep the default
behaviour: they receive every invalidation and report a receipt for what they applied, plus a heartbeat receipt
every second (``--no-receipts``: they report nothing, so a run can weigh the receipts apart from the caches). A
separate process, so they share neither the service's event loop nor the load generator's.

Prints ``CACHES READY`` once every cache holds a freshness proof; on SIGTERM or SIGINT closes them and prints one
line ``CACHES STATS {json}`` (per cache: invalidations applied, flushes, replayed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from keyledger.client import KeyCache
from keyledger.config import Topology


async def main_async(base: str, nats_url: str, n: int, prefix: str, receipts: bool) -> int:
    topology = Topology.from_env()
    caches = [KeyCache(base, nats_url, topology=topology, cache_id=f"{prefix}{i}", service="bench",
                       receipts=receipts) for i in range(n)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for cache in caches:
        await cache.start()
    deadline = time.monotonic() + 60
    while not all(c.trusted for c in caches):
        if stop.is_set():
            break
        if time.monotonic() > deadline:
            print(f"CACHES NOT TRUSTED after 60 s: {sum(c.trusted for c in caches)}/{n}", flush=True)
            break
        await asyncio.sleep(0.05)
    else:
        print(f"CACHES READY {n} caches, topology prefix {topology.prefix!r}, invalidations stream "
              f"{topology.invalidations_stream!r}, pid {os.getpid()}", flush=True)
    await stop.wait()
    stats = {c.cache_id: {"invalidations_applied": c.invalidations_applied, "flushes": c.flushes,
                          "replayed": c.replayed, "trusted": c.trusted} for c in caches}
    for cache in caches:
        await cache.close()
    print("CACHES STATS " + json.dumps(stats), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="keyledger's HTTP base URL")
    ap.add_argument("--nats", default=os.environ.get("NATS_URL"), help="NATS URL (default: $NATS_URL)")
    ap.add_argument("--caches", type=int, required=True)
    ap.add_argument("--id-prefix", default="bench-cache-")
    ap.add_argument("--no-receipts", action="store_true",
                    help="caches that report nothing (receipts=False): the same caches' load without the receipts")
    args = ap.parse_args()
    if not args.nats:
        ap.error("--nats or NATS_URL is needed")
    return asyncio.run(main_async(args.base, args.nats, args.caches, args.id_prefix, not args.no_receipts))


if __name__ == "__main__":
    sys.exit(main())
