#!/usr/bin/env python3
"""keyledger receipts benchmark: delete's 200 -> "revoked everywhere", with N caches reporting.

    python bench/receipts_bench.py [--caches 10] [--revokes 300] [--interval 0.3]
    DATABASE_URL=... NATS_URL=... python bench/receipts_bench.py    # external servers (see bench/run.py)

One ``keyledger serve`` (bench/run.py's Service, on a fresh database and unique stream names), ``--caches``
``KeyCache`` instances in this process, each with its own ``cache_id`` and holding every key. Revocations are sent
one at a time, each ``--interval`` seconds after the previous one was announced; for each, the time from reading
delete's 200 to receiving ``<prefix>.revocation.effective`` for that key (a core-NATS subscription in this process)
is taken on this process's ``time.perf_counter``, and the answer of ``GET /api/auth/api-key/revocation`` is checked
(every cache confirmed). Prints p50, p99 and max.

The default interval, 0.3 s, keeps the revocations within each cache's receipt budget (``KeyCache``: 8 at once,
4 a second): what a revocation sees while keys are revoked at most 4 a second. ``--interval 0`` sends them back to
back, a storm: past the budget's first 8, each cache names what it applied in one receipt every 0.25 s, and the
figure is that wait.

``--breakdown`` also prints where that time goes, from each revocation's row (its ``revokedAt``, the start of the
delete's transaction, and each cache's ``effectiveAt``, on the database's clock) and this process's wall clock at
the 200 and at the announcement (the same host's clock: for servers on this machine only): the delete's
transaction to its 200; its start to the first cache's receipt (the relay, the invalidation and a cache's receipt,
as dated by the projection); the first cache's to the last's; the last to the announcement (the row's write and
the publication).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import nats
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ORIGIN, Servers, Service, receipts_relation  # noqa: E402  (bench/run.py)

from keyledger.client import KeyCache  # noqa: E402
from keyledger.config import Topology  # noqa: E402


async def measure(service: Service, servers: Servers, caches_n: int, revokes: int, interval: float,
                  walls: dict[str, tuple[float, float]]) -> list[float]:
    """The latencies; ``walls``: each key's wall-clock times of the 200 and the announcement (``--breakdown``)."""
    topology = Topology(prefix=servers.prefix, events_stream=servers.events_stream,
                        invalidations_stream=servers.inv_stream)
    cookie = service.dev_session()
    headers = {"cookie": cookie, "origin": ORIGIN, "content-type": "application/json"}
    arrived: dict[str, float] = {}
    arrived_wall: dict[str, float] = {}  # (--breakdown)
    nc = await nats.connect(servers.nats_url)

    async def effective(msg: object) -> None:
        key_id = json.loads(msg.data)["keyId"]  # type: ignore[attr-defined]
        arrived.setdefault(key_id, time.perf_counter())
        arrived_wall.setdefault(key_id, time.time())

    await nc.subscribe(topology.effective_subject, cb=effective)
    caches = [KeyCache(service.base, servers.nats_url, topology=topology, cache_id=f"bench-{i}", service="bench")
              for i in range(caches_n)]
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
        for cache in caches:
            await cache.start()
        deadline = time.monotonic() + 30
        while not all(c.trusted for c in caches):
            if time.monotonic() > deadline:
                raise RuntimeError("caches never trusted")
            await asyncio.sleep(0.05)
        keys = []
        for _ in range(revokes):
            r = await http.post("/api/auth/api-key/create", headers=headers, json={})
            keys.append(r.json())
        for key in keys:
            for cache in caches:
                assert (await cache.verify(key["key"])).valid
        await asyncio.sleep(2.0)  # every cache has reported since (heartbeats): all are live
        for key in keys:
            r = await http.post("/api/auth/api-key/delete", headers=headers, json={"keyId": key["id"]})
            answered, answered_wall = time.perf_counter(), time.time()
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 10
            while key["id"] not in arrived:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no revocation.effective for {key['id']}")
                await asyncio.sleep(0.0005)
            latencies.append(arrived[key["id"]] - answered)
            walls[key["id"]] = (answered_wall, arrived_wall[key["id"]])
            await asyncio.sleep(interval)
        check = await http.get("/api/auth/api-key/revocation", params={"id": keys[-1]["id"]}, headers=headers)
        states = [c["state"] for c in check.json()["caches"]]
        if len(states) < caches_n or set(states) != {"confirmed"}:
            raise RuntimeError(f"last revocation not confirmed by every cache: {states}")
        for cache in caches:
            await cache.close()
    await nc.close()
    return latencies


def breakdown(servers: Servers, walls: dict[str, tuple[float, float]]) -> None:
    """Print where the time went (``--breakdown``): see the module docstring."""
    with psycopg.connect(servers.db_url, autocommit=True) as conn:
        rows = conn.execute(f"SELECT key_id, revoked_at, caches FROM {receipts_relation(conn)}").fetchall()
    parts: dict[str, list[float]] = {"transaction -> 200": [], "transaction -> first receipt": [],
                                     "first -> last receipt": [], "last receipt -> announcement": []}
    for key_id, revoked_at, caches in rows:
        if key_id not in walls or None in caches.values():
            continue
        answered, announced = walls[key_id]
        start = revoked_at.timestamp()
        receipts = sorted(dt.datetime.fromisoformat(at).timestamp() for at in caches.values())
        parts["transaction -> 200"].append(answered - start)
        parts["transaction -> first receipt"].append(receipts[0] - start)
        parts["first -> last receipt"].append(receipts[-1] - receipts[0])
        parts["last receipt -> announcement"].append(announced - receipts[-1])
    for name, values in parts.items():
        ms = sorted(v * 1000 for v in values)
        print(f"  {name:30s} p50 {statistics.median(ms):6.2f}  p90 {ms[int(len(ms) * 0.9)]:6.2f}  "
              f"p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:6.2f} ms  ({len(ms)} revocations)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", type=int, default=10)
    ap.add_argument("--revokes", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.3,
                    help="seconds from one revocation's announcement to the next delete (0: back to back)")
    ap.add_argument("--breakdown", action="store_true", help="also where the time goes (servers on this host)")
    args = ap.parse_args()
    servers = Servers()
    walls: dict[str, tuple[float, float]] = {}
    workdir = Path(servers._tmp if getattr(servers, "_tmp", None) else "/tmp")
    service = Service(servers, workdir / f"receipts-bench-{servers.rand}.log")
    try:
        service.wait_ready(lambda r: r.status_code == 200)
        lat = asyncio.run(measure(service, servers, args.caches, args.revokes, args.interval, walls))
        if args.breakdown:
            breakdown(servers, walls)
    finally:
        service.stop()
        servers.stop()
    lat_ms = sorted(x * 1000 for x in lat)
    p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))]
    print(f"delete's 200 -> revocation.effective with {args.caches} caches, {len(lat_ms)} sequential revocations "
          f"{args.interval:g} s apart: p50 {statistics.median(lat_ms):.2f} ms, p99 {p99:.2f} ms, "
          f"max {lat_ms[-1]:.2f} ms (aim: p99 <= 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
