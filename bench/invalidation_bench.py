#!/usr/bin/env python3
"""keyledger invalidation benchmark: how fast a revocation reaches downstream caches, and how fast they serve.

    python bench/invalidation_bench.py        # embedded PostgreSQL + nats-server (keyledger.embedded)
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 \
        python bench/invalidation_bench.py    # external servers: fresh database kl_bench_<rand>, unique
                                              # JetStream names (both removed at the end)

Servers, ``keyledger serve``, session and seeding come from bench/run.py (imported, not copied). Measured:

1. **200 -> invalidation on the bus.** Revocations (``POST /api/auth/api-key/delete``, one fresh key each)
   are sent one at a time (each waits for its invalidation before the next) and then by 16 concurrent
   revokers. ``time.perf_counter()`` is read right after the 200 is read; a core NATS subscription on
   ``<prefix>.cache.invalidate`` in this process timestamps each message on receipt (matched by keyId).
   A second core subscription on ``<prefix>.events.revoked.*`` timestamps the relay's event publish, which
   splits the pipeline into relay (200 -> event on the bus) and projection (event -> invalidation).
2. **200 -> eviction** in a ``KeyCache`` in this process holding a warm entry for every revoked key
   (its ``on_invalidation`` hook, which runs right after the entry was evicted; eviction is checked).
3. **cached verify() calls per second**, in process: ``verify_cached`` and ``await verify`` on a warm entry.
4. **downstream req/s**: ``examples/downstream.py`` (Litestar + KeyAuthMiddleware, uvicorn) loaded by
   ``wrk -t2 -c16 -d10s`` on ``GET /api/data`` with a valid Bearer key; plus revoke -> first 401 from it.

All clocks are this process's ``time.perf_counter`` (CLOCK_MONOTONIC). Results: a table on stdout,
``bench/results/invalidation-latest.json`` (and a timestamped copy). Load average is recorded per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# bench/run.py is a script, not a package: its directory on the path, then it imports as ``run`` (as the
# receipts and hostile-input benches do): its servers, service, seeder.
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402

say = R.say
RESULTS: Path = R.RESULTS

TARGETS = {
    "inv_p99_ms": 5.0,  # 200 -> invalidation received, sequential revocations
    "evict_p99_ms": 5.0,  # 200 -> evicted from KeyCache, sequential revocations
    "verify_cached_per_s": 500_000,
    "verify_await_per_s": 500_000,
    "downstream_rps": 3_300,  # 3x better-auth's 1,099 verify/s on this class of machine
}
PEERS = [  # how long a revoked key may keep working in a peer's caches (their documented figures)
    ("Unkey", "up to 30 s (cache revalidation)"),
    ("Zuplo", "up to 60 s"),
    ("Kong", "up to 5 s (db_update_frequency)"),
    ("Tyk", "up to 10 s"),
    ("better-auth (secondary storage)", "indefinite (until the entry's TTL; no invalidation)"),
]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


def summary(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "min_ms": round(min(ms), 3), "p50_ms": round(pct(ms, 50), 3),
            "p90_ms": round(pct(ms, 90), 3), "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "negative": sum(1 for v in ms if v < 0)}


def fmt(st: dict[str, Any], keys: tuple[str, ...] = ("p50_ms", "p99_ms", "max_ms")) -> str:
    if not st.get("n"):
        return "n/a"
    return "  ".join(f"{k[:-3]} {st[k]:7.2f} ms" for k in keys)


# ------------------------------------------------------------------------------------------------------------
# 1 + 2: revocation -> invalidation -> eviction
# ------------------------------------------------------------------------------------------------------------
class Listener:
    """Core NATS subscriptions (events.revoked.*, cache.invalidate) and a KeyCache, all timestamping arrival."""

    def __init__(self, nats_url: str, base: str, topology: Any) -> None:
        from keyledger.client import KeyCache

        self.nats_url, self.topology = nats_url, topology
        self.event_at: dict[str, float] = {}
        self.inv_at: dict[str, float] = {}
        self.evict_at: dict[str, float] = {}
        self.evicted_ok: dict[str, bool] = {}
        self.key_of: dict[str, str] = {}  # key id -> plaintext key (to check the eviction)
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.duplicates = 0
        self.nc: Any = None
        # max_age None: entries live through the whole run; default staleness (1 s) and sync (0.25 s).
        self.cache = KeyCache(base, nats_url, topology=topology, max_age=None,
                              on_invalidation=self._on_invalidation)

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(self.nats_url, name="kl-inv-bench", connect_timeout=3)
        await self.nc.subscribe(self.topology.invalidation_subject, cb=self._on_inv)
        await self.nc.subscribe(f"{self.topology.prefix}.events.revoked.*", cb=self._on_event)
        await self.nc.flush()
        await self.cache.start()
        t0 = time.monotonic()
        while not self.cache.caught_up:
            if time.monotonic() - t0 > 15:
                raise RuntimeError("KeyCache did not catch up with the invalidations stream within 15 s")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.cache.close()
        if self.nc is not None:
            await self.nc.close()

    async def _on_event(self, msg: Any) -> None:
        now = time.perf_counter()
        key_id = msg.subject.rsplit(".", 1)[-1]
        self.event_at.setdefault(key_id, now)

    async def _on_inv(self, msg: Any) -> None:
        now = time.perf_counter()
        key_id = json.loads(msg.data)["keyId"]
        if key_id in self.inv_at:
            self.duplicates += 1
            return
        self.inv_at[key_id] = now
        self._check_done(key_id)

    def _on_invalidation(self, inv: Any) -> None:  # KeyCache hook: runs right after the eviction
        now = time.perf_counter()
        if inv.key_id in self.evict_at:
            return
        self.evict_at[inv.key_id] = now
        key = self.key_of.get(inv.key_id)
        if key is not None:
            self.evicted_ok[inv.key_id] = self.cache.verify_cached(key) is None
        self._check_done(inv.key_id)

    def _check_done(self, key_id: str) -> None:
        fut = self.waiters.get(key_id)
        if fut is not None and not fut.done() and key_id in self.inv_at and key_id in self.evict_at:
            fut.set_result(None)

    def expect(self, key_id: str) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[key_id] = fut
        self._check_done(key_id)
        return fut

    async def warm(self, keys: list[tuple[str, str]], concurrency: int = 16) -> int:
        """Verify every key over HTTP through the cache (fills it). Returns how many are cached valid."""
        sem = asyncio.Semaphore(concurrency)

        async def one(key_id: str, key: str) -> None:
            async with sem:
                self.key_of[key_id] = key
                res = await self.cache.verify(key)
                if not res.valid:
                    raise RuntimeError(f"seeded key {key_id} does not verify: {res.error}")

        await asyncio.gather(*(one(i, k) for i, k in keys))
        return sum(1 for _, k in keys if self.cache.verify_cached(k) is not None)


class Meter(R.CpuMeter):
    """bench/run.py's CPU meter, with this process (the load generator and listener) as its own group."""

    def _group(self, pid: int, name: str, ppid: int, cmd: str) -> str:
        return "bench" if pid == os.getpid() else super()._group(pid, name, ppid, cmd)


def cpu_text(cpu: dict[str, Any], service: str = "service") -> str:
    top = cpu.get("other_top") or {}
    return (f"{service} {cpu.get('service', 0):.0f}%  postgres {cpu.get('postgres', 0):.0f}%  nats "
            f"{cpu.get('nats', 0):.0f}%  bench {cpu.get('bench', 0):.0f}%  wrk {cpu.get('wrk', 0):.0f}%  "
            f"other {cpu.get('other', 0):.0f}%" + (f" ({', '.join(f'{n} {v:.0f}%' for n, v in top.items())})" if top else ""))


class LoopLag:
    """Overshoot of a 5 ms sleep in this process's loop: how late our own timestamps can be under load."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - t - 0.005)

    def start(self) -> None:
        self.lags.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return summary(self.lags)


async def revoke_pass(client: httpx.AsyncClient, lst: Listener, keys: list[tuple[str, str]],
                      concurrency: int, label: str, wait_timeout: float = 10.0,
                      stop: Any = None, wait_each: bool = True, meter: Any = None) -> dict[str, Any]:
    """Revoke every key; sequential (concurrency 1) waits for each invalidation + eviction before the next.
    ``stop()`` true ends a sequential pass early (the probe under background load stops with the load);
    ``wait_each=False`` sends the next revocation as soon as the previous 200 arrived (still one at a time)."""
    sent: dict[str, float] = {}
    ok_at: dict[str, float] = {}
    errors: list[str] = []
    warm_before = 0
    missing_sequential = 0
    lag = LoopLag()
    load_before = loadavg()
    todo = iter(keys)

    async def revoke(key_id: str, key: str) -> bool:
        nonlocal warm_before
        if lst.cache.verify_cached(key) is not None:
            warm_before += 1
        t0 = time.perf_counter()
        r = await client.post("/api/auth/api-key/delete", content=b'{"keyId":"' + key_id.encode() + b'"}')
        t1 = time.perf_counter()  # the response body is read by then (httpx reads it in post())
        if r.status_code != 200:
            errors.append(f"{r.status_code} {r.text[:200]}")
            return False
        sent[key_id], ok_at[key_id] = t0, t1
        return True

    async def worker() -> None:
        for key_id, key in todo:
            await revoke(key_id, key)

    cpu_before = meter.snapshot() if meter else None
    R.psutil_children_cpu()
    lag.start()
    t_start = time.perf_counter()
    if concurrency == 1:
        for key_id, key in keys:
            if stop is not None and stop():
                break
            fut = lst.expect(key_id)
            if not await revoke(key_id, key):
                continue
            if not wait_each:
                continue
            try:
                await asyncio.wait_for(fut, wait_timeout)
            except asyncio.TimeoutError:
                missing_sequential += 1
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    t_sent = time.perf_counter()
    # wait for the stragglers (concurrent pass), bounded
    deadline = time.perf_counter() + wait_timeout
    while time.perf_counter() < deadline and not all(k in lst.inv_at and k in lst.evict_at for k in ok_at):
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - t_start
    loop_lag = await lag.stop()
    cpu = R.CpuMeter.diff(cpu_before, meter.snapshot(), wall, R.psutil_children_cpu()) if meter else {}

    ids = list(ok_at)
    inv = [lst.inv_at[k] - ok_at[k] for k in ids if k in lst.inv_at]
    evict = [lst.evict_at[k] - ok_at[k] for k in ids if k in lst.evict_at]
    relay = [lst.event_at[k] - ok_at[k] for k in ids if k in lst.event_at]
    proj = [lst.inv_at[k] - lst.event_at[k] for k in ids if k in lst.event_at and k in lst.inv_at]
    hop = [lst.evict_at[k] - lst.inv_at[k] for k in ids if k in lst.evict_at and k in lst.inv_at]
    http = [ok_at[k] - sent[k] for k in ids]
    send_to_inv = [lst.inv_at[k] - sent[k] for k in ids if k in lst.inv_at]
    # trend: first vs last third (in completion order): a growing latency means the pipeline falls behind
    third = max(1, len(ids) // 3)
    trend = {"first_third_p50_ms": summary([lst.inv_at[k] - ok_at[k] for k in ids[:third] if k in lst.inv_at]).get("p50_ms"),
             "last_third_p50_ms": summary([lst.inv_at[k] - ok_at[k] for k in ids[-third:] if k in lst.inv_at]).get("p50_ms")}
    last_inv = max((lst.inv_at[k] for k in ids if k in lst.inv_at), default=None)
    res = {
        "label": label, "concurrency": concurrency, "revocations": len(ids), "errors": len(errors),
        "error_samples": errors[:3], "wall_s": round(wall, 2),
        "revoke_rps": round(len(ids) / (t_sent - t_start), 1) if ids else 0.0,
        "warm_before": warm_before,
        "missing_invalidations": sum(1 for k in ids if k not in lst.inv_at),
        "missing_evictions": sum(1 for k in ids if k not in lst.evict_at),
        "eviction_checked_ok": sum(1 for k in ids if lst.evicted_ok.get(k)),
        "ok_to_invalidation": summary(inv),
        "ok_to_eviction": summary(evict),
        "http_revoke": summary(http),
        "send_to_invalidation": summary(send_to_inv),
        "stage_ok_to_event_on_bus": summary(relay),
        "stage_event_to_invalidation": summary(proj),
        "stage_invalidation_to_eviction": summary(hop),
        "client_loop_lag": loop_lag,
        "trend_ok_to_invalidation": trend,
        "last_invalidation_after_last_200_ms": round((last_inv - max(ok_at.values())) * 1000, 2) if last_inv else None,
        "series_ok_to_invalidation_ms": [round((lst.inv_at[k] - ok_at[k]) * 1000, 3) if k in lst.inv_at else None
                                         for k in ids],
        "loadavg_before": load_before, "loadavg_after": loadavg(), "cpu_pct": cpu,
    }
    say(f"  {label}: {len(ids):,} revocations in {wall:.1f} s ({res['revoke_rps']:,.0f}/s), errors {len(errors)}, "
        f"warm {warm_before}, missing inv {res['missing_invalidations']} / evictions {res['missing_evictions']}, "
        f"load {load_before} -> {res['loadavg_after']}")
    for name, key in (("200 -> invalidation", "ok_to_invalidation"), ("200 -> eviction", "ok_to_eviction"),
                      ("  relay: 200 -> event on bus", "stage_ok_to_event_on_bus"),
                      ("  projection: event -> inv", "stage_event_to_invalidation"),
                      ("  inv -> KeyCache eviction", "stage_invalidation_to_eviction"),
                      ("HTTP revoke (send -> 200)", "http_revoke"),
                      ("client loop lag (5 ms tick)", "client_loop_lag")):
        say(f"    {name:<30} {fmt(res[key], ('p50_ms', 'p90_ms', 'p99_ms', 'max_ms'))}"
            + (f"  ({res[key]['negative']} negative)" if res[key].get("negative") else ""))
    if cpu:
        say(f"    cpu: {cpu_text(cpu)}")
    say(f"    trend 200 -> invalidation p50: first third {trend['first_third_p50_ms']} ms, last third "
        f"{trend['last_third_p50_ms']} ms; last invalidation {res['last_invalidation_after_last_200_ms']} ms after "
        f"the last 200")
    return res


async def probe_under_load(client: httpx.AsyncClient, lst: Listener, probe_keys: list[tuple[str, str]],
                           bg_ids: list[str], cookie: str, base: str, work: Path, conns: int,
                           duration: float, meter: Any = None) -> dict[str, Any]:
    """Sequential probe revocations (clean timestamps: this loop is otherwise idle) while wrk revokes other
    fresh keys with ``conns`` connections in the background (bench/run.py's revoke script)."""
    ids_file = work / "background-ids.txt"
    ids_file.write_text("\n".join(bg_ids) + "\n")
    script = R.lua_script("revoke", work / "background.lua", ids_file, 2, cookie)
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t2", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency", "-s", str(script), base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    reader = asyncio.ensure_future(proc.communicate())
    await asyncio.sleep(0.3)  # let the load ramp up
    res = await revoke_pass(client, lst, probe_keys, 1, f"probe (c=1) under wrk revoke load c={conns}",
                            stop=reader.done, wait_each=False, meter=meter)
    out, _ = await reader
    load_end = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"background wrk failed ({proc.returncode}):\n{out.decode(errors='replace')}")
    bg = R.parse_wrk(out.decode(errors="replace"))
    res["background"] = {k: bg.get(k) for k in ("requests", "seconds", "rps", "p50_ms", "p99_ms", "errors", "exhausted")}
    res["background"]["connections"] = conns
    # the background revocations' invalidations: all of them, and how long after the load ended the last came
    deadline = time.perf_counter() + 30
    target = bg["requests"] - bg["non_2xx"]  # revokes wrk saw succeed (up to `conns` more may have committed)
    while time.perf_counter() < deadline and sum(1 for i in bg_ids if i in lst.inv_at) < target:
        await asyncio.sleep(0.02)
    got = [lst.inv_at[i] for i in bg_ids if i in lst.inv_at]
    res["background"]["invalidations_received"] = len(got)
    res["background"]["last_invalidation_after_load_end_ms"] = round((max(got) - load_end) * 1000, 1) if got else None
    say(f"    background wrk revokes: {bg['rps']:,.0f}/s, p50 {R.fmt_ms(bg['p50_ms'])}, p99 {R.fmt_ms(bg['p99_ms'])}, "
        f"errors {bg['errors']}{', KEYS EXHAUSTED (load ended early)' if bg['exhausted'] else ''}; "
        f"{len(got):,} background invalidations received, the last "
        f"{res['background']['last_invalidation_after_load_end_ms']} ms after wrk exited")
    return res


async def floors(servers: Any, n: int = 300) -> dict[str, Any]:
    """The infrastructure's own round trips on this machine, from this process, for reading the stages:
    a PostgreSQL query (the relay's batch read is one), a core NATS hop, a JetStream publish (delivery to a
    core subscriber, and the PubAck), and the delivery of a stored message to a lingering pull ``fetch(1)``
    (the projection's input hop)."""
    import nats
    import psycopg
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

    out: dict[str, Any] = {}
    async with await psycopg.AsyncConnection.connect(servers.db_url, autocommit=True) as conn:
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            await (await conn.execute("SELECT 1")).fetchone()
            ts.append(time.perf_counter() - t)
        out["pg_select1_rtt"] = summary(ts)
    pub = await nats.connect(servers.nats_url, name="kl-inv-bench-floor-pub")
    sub = await nats.connect(servers.nats_url, name="kl-inv-bench-floor-sub")
    stream, subject = f"{servers.inv_stream}_FLOOR", f"{servers.prefix}.floor"
    js, jsub = pub.jetstream(timeout=5), sub.jetstream(timeout=5)
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))
        got: asyncio.Queue[float] = asyncio.Queue()

        async def cb(msg: Any) -> None:
            got.put_nowait(time.perf_counter())

        await sub.subscribe(subject, cb=cb)
        await sub.flush()
        core, deliver, puback = [], [], []
        for _ in range(n):  # core publish -> core subscriber (the subject is also stored by the stream)
            t = time.perf_counter()
            await pub.publish(subject, b"x")
            core.append(await asyncio.wait_for(got.get(), 5) - t)
        for _ in range(n):  # JetStream publish: delivery to the core subscriber, and the PubAck
            t = time.perf_counter()
            await js.publish(subject, b"x")
            puback.append(time.perf_counter() - t)
            deliver.append(await asyncio.wait_for(got.get(), 5) - t)
        out["nats_core_pub_to_sub"] = summary(core)
        out["js_publish_to_core_sub"] = summary(deliver)
        out["js_publish_puback"] = summary(puback)
        psub = await jsub.pull_subscribe(subject, durable="floor", stream=stream,
                                         config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW,
                                                               ack_policy=AckPolicy.EXPLICIT))
        fetched: list[float] = []

        async def pull() -> None:
            while len(fetched) < n:
                try:
                    msgs = await psub.fetch(1, timeout=1)
                except Exception:
                    continue
                now = time.perf_counter()
                for m in msgs:
                    await m.ack()
                    fetched.append(now)

        task = asyncio.ensure_future(pull())
        pulls = []
        for i in range(n):
            await asyncio.sleep(0.002)  # the pull is lingering when the message arrives
            t = time.perf_counter()
            await pub.publish(subject, b"x")
            while len(fetched) <= i:
                await asyncio.sleep(0)
                if task.done():
                    break
            pulls.append(fetched[i] - t)
            while not got.empty():
                got.get_nowait()
        await asyncio.wait_for(task, 5)
        out["publish_to_pull_fetch1"] = summary(pulls)
    finally:
        try:
            await js.delete_stream(stream)
        except Exception:
            pass
        await pub.close()
        await sub.close()
    for name, st in out.items():
        say(f"    {name:<30} {fmt(st, ('p50_ms', 'p90_ms', 'p99_ms', 'max_ms'))}")
    return out


# ------------------------------------------------------------------------------------------------------------
# 3: cached verify throughput
# ------------------------------------------------------------------------------------------------------------
async def verify_throughput(cache: Any, key: str, seconds: float = 1.0, rounds: int = 5) -> dict[str, Any]:
    """Tight loops of CHUNK calls, yielding to the loop between chunks (untimed) so the cache's proof round
    trip keeps it trusted; every chunk's last answer must be a valid cached one (never an HTTP miss)."""
    chunk = 20_000
    out: dict[str, Any] = {}
    vc = cache.verify_cached
    v = cache.verify
    http_before = cache.http_verifications

    async def sync_loop() -> tuple[float, int]:
        total_t, n = 0.0, 0
        while total_t < seconds:
            t = time.perf_counter()
            for _ in range(chunk):
                r = vc(key)
            total_t += time.perf_counter() - t
            n += chunk
            if r is None or not r.valid:
                raise RuntimeError("verify_cached missed during the throughput test (cache not trusted?)")
            await asyncio.sleep(0.002)
        return total_t, n

    async def await_loop() -> tuple[float, int]:
        total_t, n = 0.0, 0
        while total_t < seconds:
            t = time.perf_counter()
            for _ in range(chunk):
                r = await v(key)
            total_t += time.perf_counter() - t
            n += chunk
            if not r.valid:
                raise RuntimeError("verify answered invalid during the throughput test")
            await asyncio.sleep(0.002)
        return total_t, n

    for name, fn in (("verify_cached", sync_loop), ("await_verify", await_loop)):
        rates = []
        for _ in range(rounds):
            t, n = await fn()
            rates.append(n / t)
        out[name] = {"best_per_s": round(max(rates)), "median_per_s": round(statistics.median(rates)),
                     "worst_per_s": round(min(rates)), "rounds": rounds, "seconds_per_round": seconds,
                     "ns_per_call_best": round(1e9 / max(rates), 1)}
    out["http_verifications_during"] = cache.http_verifications - http_before
    if out["http_verifications_during"]:
        raise RuntimeError("the throughput test went to HTTP: it measured misses")
    return out


# ------------------------------------------------------------------------------------------------------------
# 4: downstream example under wrk
# ------------------------------------------------------------------------------------------------------------
class Downstream(R.ServedProcess):
    what = "downstream"

    def __init__(self, servers: Any, keyledger_base: str, log_path: Path) -> None:
        port = R.free_port()
        env = {**os.environ, "KEYLEDGER_SUBJECT_PREFIX": servers.prefix,
               "KEYLEDGER_INVALIDATIONS_STREAM": servers.inv_stream, "PYTHONPATH": str(ROOT)}
        super().__init__([sys.executable, str(ROOT / "examples" / "downstream.py"), "--keyledger-url",
                          keyledger_base, "--nats-url", servers.nats_url, "--port", str(port)],
                         env, log_path, port, cwd=str(ROOT))

    def wait_caught_up(self, timeout: float = 30.0) -> float:
        return self.wait_ready(lambda r: r.status_code == 200 and r.json().get("cacheCaughtUp"), timeout, 0.05)


def run_wrk(url: str, key: str, threads: int, conns: int, duration: float) -> tuple[dict[str, Any], float]:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency",
           "-H", f"Authorization: Bearer {key}", url]
    R.psutil_children_cpu()  # reset the reaped-children counter
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return R.parse_wrk(proc.stdout), wall


def downstream_phase(servers: Any, service: Any, keys: list[tuple[str, str]], cookie: str, work: Path,
                     duration: float, warmup: float) -> dict[str, Any]:
    ds = Downstream(servers, service.base, work / "downstream.log")
    try:
        ready = ds.wait_caught_up()
        say(f"  downstream pid {ds.pid} on {ds.base}, cache caught up after {ready:.1f} s")
        key_id, key = keys[0]
        r = httpx.get(ds.base + "/api/data", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        if r.status_code != 200:
            raise RuntimeError(f"downstream refused a valid key: {r.status_code} {r.text[:200]}")
        r = httpx.get(ds.base + "/api/data", headers={"Authorization": "Bearer nope"}, timeout=5)
        bad_key_status = r.status_code
        url = ds.base + "/api/data"
        run_wrk(url, key, 2, 16, warmup)
        meter = Meter(ds.pid, servers.dbname, servers.nats_url)
        load_before = loadavg()
        before = meter.snapshot()
        res, wall = run_wrk(url, key, 2, 16, duration)
        cpu = R.CpuMeter.diff(before, meter.snapshot(), wall, R.psutil_children_cpu())
        # the keyledger service shows as other:keyledger/python; name it
        res.update(cpu_pct=cpu, loadavg_before=load_before, loadavg_after=loadavg(), bad_key_status=bad_key_status)
        say(f"  wrk -t2 -c16 -d{duration:g}s GET /api/data: {res['rps']:,.0f} req/s  p50 {R.fmt_ms(res['p50_ms'])}  "
            f"p99 {R.fmt_ms(res['p99_ms'])}  non-2xx {res['non_2xx']}  socket errors {res['socket_errors']}  "
            f"load {load_before} -> {res['loadavg_after']}")
        say(f"      cpu: {cpu_text(cpu, 'downstream')}  (keyledger itself counts as other:keyledger/python)")
        res["revoke_to_401"] = revoke_to_401(service.base, ds.base, keys[1:], cookie)
        st = res["revoke_to_401"]
        say(f"  revoke -> first 401 from the downstream (polled every ~1 ms, {st.get('n', 0)} keys): "
            f"{fmt(st, ('p50_ms', 'p99_ms', 'max_ms'))}")
        return res
    finally:
        ds.stop()


def revoke_to_401(keyledger: str, downstream: str, keys: list[tuple[str, str]], cookie: str) -> dict[str, Any]:
    """For each key: serve it once through the downstream (cached), revoke it, poll until the downstream
    answers 401. Time from the revoke's 200 to the first 401 (an upper bound on the downstream's eviction)."""
    out: list[float] = []
    headers = {"Cookie": cookie, "Origin": R.ORIGIN, "Content-Type": "application/json"}
    with httpx.Client(timeout=5) as c:
        for key_id, key in keys:
            auth = {"Authorization": f"Bearer {key}"}
            if c.get(downstream + "/api/data", headers=auth).status_code != 200:
                continue
            r = c.post(keyledger + "/api/auth/api-key/delete", headers=headers, content=json.dumps({"keyId": key_id}))
            t200 = time.perf_counter()
            if r.status_code != 200:
                continue
            while time.perf_counter() - t200 < 5:
                if c.get(downstream + "/api/data", headers=auth).status_code == 401:
                    out.append(time.perf_counter() - t200)
                    break
                time.sleep(0.001)
    return summary(out)


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
async def in_process(service: Any, servers: Any, cookie: str, seq_keys: list[tuple[str, str]],
                     conc_keys: list[tuple[str, str]], probe_keys: list[tuple[str, str]], bg_ids: list[str],
                     work: Path, verify_key: str, args: Any) -> dict[str, Any]:
    concurrency = args.concurrency
    from keyledger.config import Topology

    topology = Topology(prefix=servers.prefix, events_stream=servers.events_stream,
                        invalidations_stream=servers.inv_stream)
    lst = Listener(servers.nats_url, service.base, topology)
    await lst.start()
    out: dict[str, Any] = {}
    headers = {"Cookie": cookie, "Origin": R.ORIGIN, "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        async with httpx.AsyncClient(base_url=service.base, headers=headers, limits=limits, timeout=10) as client:
            t = time.perf_counter()
            warm = await lst.warm(seq_keys + conc_keys + probe_keys + [("verify-key", verify_key)])
            say(f"  KeyCache warmed: {warm:,} entries cached valid in {time.perf_counter() - t:.1f} s "
                f"(over HTTP, c=16)")
            # a few un-timed revocations: connections, code paths and the projection's pull warm up
            for key_id, key in seq_keys[:20]:
                fut = lst.expect(key_id)
                await client.post("/api/auth/api-key/delete", content=json.dumps({"keyId": key_id}))
                await asyncio.wait_for(fut, 10)
            meter = Meter(service.pid, servers.dbname, servers.nats_url)
            out["sequential"] = await revoke_pass(client, lst, seq_keys[20:], 1, "sequential (c=1)", meter=meter)
            out["concurrent"] = await revoke_pass(client, lst, conc_keys, concurrency, f"concurrent (c={concurrency})",
                                                  meter=meter)
            if probe_keys and bg_ids:
                out["under_load"] = await probe_under_load(client, lst, probe_keys, bg_ids, cookie, service.base,
                                                           work, concurrency - 1, args.load_duration, meter)
        out["duplicate_invalidations"] = lst.duplicates
        # 3: throughput on a warm entry (re-verify it first: it is the freshest one then)
        res = await lst.cache.verify(verify_key)
        if not res.valid or lst.cache.verify_cached(verify_key) is None:
            raise RuntimeError("the throughput key is not cached valid")
        load_before = loadavg()
        out["verify_throughput"] = await verify_throughput(lst.cache, verify_key, args.throughput_seconds)
        out["verify_throughput"]["loadavg_before"] = load_before
        vt = out["verify_throughput"]
        say(f"  verify_cached  best {vt['verify_cached']['best_per_s']:>11,}/s  median "
            f"{vt['verify_cached']['median_per_s']:>11,}/s  ({vt['verify_cached']['ns_per_call_best']} ns/call)")
        say(f"  await verify   best {vt['await_verify']['best_per_s']:>11,}/s  median "
            f"{vt['await_verify']['median_per_s']:>11,}/s  ({vt['await_verify']['ns_per_call_best']} ns/call)")
        say("  infrastructure floors on this machine (from this process, sequential):")
        out["floors"] = await floors(servers)
    finally:
        logging.getLogger("keyledger.client").setLevel(logging.ERROR)  # "NATS disconnected" on close
        await lst.close()
    return out


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequential", type=int, default=1000, help="sequential revocations measured (default 1000)")
    ap.add_argument("--concurrent", type=int, default=2000, help="revocations in the concurrent pass (default 2000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="wrk seconds on the downstream (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds on the downstream")
    ap.add_argument("--throughput-seconds", type=float, default=1.0, help="seconds per verify throughput round")
    ap.add_argument("--revoke-401-samples", type=int, default=50)
    ap.add_argument("--probe-keys", type=int, default=400, help="probe revocations available under load")
    ap.add_argument("--load-keys", type=int, default=4000, help="fresh keys for the background wrk revoke load")
    ap.add_argument("--load-duration", type=float, default=5.0, help="seconds of background revoke load")
    ap.add_argument("--seed-concurrency", type=int, default=16)
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args()

    R.ensure_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kl-invbench-"))
    load_start = loadavg()
    servers = R.Servers()
    service = None
    result: dict[str, Any] = {"mode": servers.mode, "database": servers.dbname,
                              "streams": [servers.events_stream, servers.inv_stream], "loadavg_start": load_start}
    rc = 1
    try:
        machine = R.machine_info(servers.pg_version, servers.pg_settings)
        result["machine"] = machine
        say("keyledger invalidation bench")
        say(f"  machine   {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_mb']:,} MB RAM, "
            f"kernel {machine['kernel']}")
        say(f"  software  PostgreSQL {machine['postgres']}, Python {machine['python']}, {machine['wrk']}")
        say(f"  date      {machine['date']}   load average {load_start} (1/5/15 min)")
        say(f"  servers   {servers.mode}: database {servers.dbname}, NATS {servers.nats_url}, "
            f"streams {servers.events_stream}/{servers.inv_stream}, prefix {servers.prefix}")
        service = R.Service(servers, work / "service.log")
        say(f"  service   pid {service.pid} on {service.base}, healthy after {service.wait_ready():.1f} s")
        cookie = service.dev_session()
        seeder = R.Seeder(service.base, cookie, args.seed_concurrency)
        seq_keys = seeder.create(args.sequential + 20, "sequential revocations (+20 warm-up)")
        conc_keys = seeder.create(args.concurrent, f"concurrent revocations (c={args.concurrency})")
        probe_keys = seeder.create(args.probe_keys, "probe revocations under load") if args.probe_keys else []
        bg_ids = [i for i, _ in seeder.create(args.load_keys, "background wrk revoke load")] if args.load_keys else []
        extra = seeder.create(1 + 1 + args.revoke_401_samples, "throughput + downstream keys")
        if len(seq_keys) < args.sequential + 20 or len(conc_keys) < args.concurrent:
            raise RuntimeError("seeding fell short")

        say("")
        say("revocation -> invalidation -> eviction (in process; perf_counter after the 200 is read)")
        inproc = run_async(in_process(service, servers, cookie, seq_keys, conc_keys, probe_keys, bg_ids, work,
                                      extra[0][1], args))
        say("")
        say("downstream example (examples/downstream.py under uvicorn, KeyAuthMiddleware)")
        downstream = downstream_phase(servers, service, extra[1:], cookie, work, args.duration, args.warmup)

        seq, conc, vt = inproc["sequential"], inproc["concurrent"], inproc["verify_throughput"]
        load = inproc.get("under_load")
        passes = [p for p in (seq, conc, load) if p]
        checks = {
            "inv_p99": (seq["ok_to_invalidation"].get("p99_ms") or 1e9) <= TARGETS["inv_p99_ms"],
            "evict_p99": (seq["ok_to_eviction"].get("p99_ms") or 1e9) <= TARGETS["evict_p99_ms"],
            "none_missing": all(p["missing_invalidations"] == 0 and p["missing_evictions"] == 0 and p["errors"] == 0
                                and p["eviction_checked_ok"] == p["revocations"] for p in passes),
            "verify_cached": vt["verify_cached"]["best_per_s"] >= TARGETS["verify_cached_per_s"],
            "verify_await": vt["await_verify"]["best_per_s"] >= TARGETS["verify_await_per_s"],
            "downstream_rps": downstream["rps"] >= TARGETS["downstream_rps"] and downstream["errors"] == 0,
        }
        v = R.verdict
        W = 128
        say("")
        say("=" * W)
        say(f"keyledger invalidation bench  {machine['date']}  {machine['nproc']} CPUs {machine['cpu_model']}  "
            f"({servers.mode} servers)  load avg start {load_start}, end {loadavg()}")
        say("-" * W)
        say(f"{'measure':<60} {'p50':>9} {'p99':>9} {'max':>9}   target / verdict")
        for p in passes:
            tag = f"c={p['concurrency']}, n={p['revocations']:,}" if p is not load else \
                f"probe, n={p['revocations']:,}, wrk c={p['background']['connections']}"
            for name, key, target in (("200 -> invalidation received", "ok_to_invalidation", "inv_p99"),
                                      ("200 -> KeyCache eviction", "ok_to_eviction", "evict_p99")):
                st = p[key]
                verdict_s = ((f"p99 <= 5 ms: {v(checks[target])}") if p is seq else "(under load; no target)")
                say(f"{name + ' (' + tag + ')':<60} {st['p50_ms']:>6.2f} ms {st['p99_ms']:>6.2f} ms {st['max_ms']:>6.2f} ms"
                    f"   {verdict_s}")
            say(f"{'   of which relay: 200 -> event on bus':<60} {p['stage_ok_to_event_on_bus']['p50_ms']:>6.2f} ms "
                f"{p['stage_ok_to_event_on_bus']['p99_ms']:>6.2f} ms {p['stage_ok_to_event_on_bus']['max_ms']:>6.2f} ms")
            say(f"{'   of which projection: event -> inv':<60} {p['stage_event_to_invalidation']['p50_ms']:>6.2f} ms "
                f"{p['stage_event_to_invalidation']['p99_ms']:>6.2f} ms {p['stage_event_to_invalidation']['max_ms']:>6.2f} ms")
        say(f"{'all invalidated + evicted, none missing':<60} {'':>31}   {v(checks['none_missing'])}"
            f"  (duplicates seen: {inproc['duplicate_invalidations']})")
        say(f"{'verify_cached() calls/s (best of 5)':<60} {vt['verify_cached']['best_per_s']:>31,}   "
            f">= 500,000/s: {v(checks['verify_cached'])}  (median {vt['verify_cached']['median_per_s']:,})")
        say(f"{'await verify() calls/s (best of 5)':<60} {vt['await_verify']['best_per_s']:>31,}   "
            f">= 500,000/s: {v(checks['verify_await'])}  (median {vt['await_verify']['median_per_s']:,})")
        say(f"{'downstream GET /api/data req/s (wrk c=16)':<60} {downstream['rps']:>31,.0f}   "
            f">= 3,300/s: {v(checks['downstream_rps'])}  (p50 {R.fmt_ms(downstream['p50_ms'])}, "
            f"p99 {R.fmt_ms(downstream['p99_ms'])}, non-2xx {downstream['non_2xx']})")
        r401 = downstream["revoke_to_401"]
        if r401.get("n"):
            say(f"{'revoke 200 -> first 401 from downstream':<60} {r401['p50_ms']:>6.2f} ms {r401['p99_ms']:>6.2f} ms "
                f"{r401['max_ms']:>6.2f} ms   (n={r401['n']}, polled ~1 ms; no target)")
        say("-" * W)
        say("peers, time a revoked key may keep working in their caches (documented):")
        for name, what in PEERS:
            say(f"  {name:<34} {what}")
        say(f"  {'keyledger (this run, c=1 p99/max)':<34} {seq['ok_to_eviction']['p99_ms']:.1f} ms / "
            f"{seq['ok_to_eviction']['max_ms']:.1f} ms to eviction; fail-closed after 1 s if invalidations "
            f"cannot be proven")
        say("=" * W)
        all_ok = all(checks.values())
        say(f"overall: {'PASS' if all_ok else 'FAIL: ' + ', '.join(k for k, ok in checks.items() if not ok)}")

        result.update(sequential=seq, concurrent=conc, under_load=load, floors=inproc["floors"],
                      duplicate_invalidations=inproc["duplicate_invalidations"],
                      verify_throughput=vt, downstream=downstream, checks=checks, passed=all_ok, targets=TARGETS,
                      peers=dict(PEERS), loadavg_end=loadavg(),
                      config={k: getattr(args, k) for k in ("sequential", "concurrent", "concurrency", "duration",
                                                            "warmup", "throughput_seconds", "probe_keys",
                                                            "load_keys", "load_duration")})
        text = json.dumps(result, indent=2, default=str)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        (RESULTS / "invalidation-latest.json").write_text(text)
        (RESULTS / f"invalidation-{stamp}.json").write_text(text)
        say(f"results: {RESULTS / 'invalidation-latest.json'}")
        rc = 0 if all_ok else 1
    except KeyboardInterrupt:
        say("bench: interrupted")
        rc = 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        say(f"bench: FAILED: {type(exc).__name__}: {exc}")
        if service is not None:
            say("service log tail:\n" + service.log_tail())
        rc = 2
    finally:
        if service is not None:
            service.stop()
        servers.stop()
        if args.keep_workdir:
            say(f"workdir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
