#!/usr/bin/env python3
"""keyledger takeover benchmark: how long background leadership takes to move off a hung leader, and what a
cache answers for a key revoked during the hang.

    python bench/takeover_bench.py            # embedded PostgreSQL + nats-server (keyledger.embedded)
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 \\
        python bench/takeover_bench.py        # external servers: fresh database kl_bench_<rand>, unique
                                              # JetStream names (both removed at the end)

Servers, ``keyledger serve`` and the session come from bench/run.py (imported, not copied). Two service
processes share one fresh database, one topology and one ``BETTER_AUTH_SECRET``. Once one of them leads
(``keyledger_leader 1.0`` on ``GET /metrics``) and both answer ``/ready`` 200, each round (``--rounds``, 10):

1. an in-process ``KeyCache(staleness=1.0)`` that asks the process that will keep running (same NATS, same
   topology) verifies a fresh key over HTTP, so it holds it cached valid, freshly verified: the longest a
   cached positive may be served without a proof;
2. ``SIGSTOP`` to the leader's process group;
3. **takeover**: ``/metrics`` of the other process polled every 20 ms until it says ``keyledger_leader 1.0``
   (time from the SIGSTOP);
4. at the same time, right after the SIGSTOP: that key revoked through the running process
   (``POST /api/auth/api-key/delete``), then ``cache.verify(key)`` polled every 2 ms; **time from the delete's
   200 until the cache answers invalid**, and why (the invalidation arrived and evicted it, or the entry
   outlived the proof and was re-verified over HTTP). Later the invalidation itself must arrive (from the new
   leader): none is lost;
5. ``SIGCONT``; wait until the resumed process says ``keyledger_leader 0.0`` and ``/ready`` is 200 on both,
   and the next round stops the new leader, ``--settle`` (5 s) after the SIGCONT: the resumed process lost its
   term for lack of progress and sits out 3 x ttl = 4.5 s before competing again (leadership.py), so an
   earlier round would time that back-off instead of a takeover (``--settle 0`` shows it).

``--fault kill`` (default ``stop``: the above) crashes the leader instead: ``SIGKILL`` to its process group in
step 2, steps 3-4 measured the same way from the kill; then, instead of step 5, the killed service is started
again exactly as before (its command line, so the same port, and its environment: database, topology, secret;
a fresh log, ``service-A.round1.log``), and once both answer ``/ready`` 200 and exactly one leads, the next round
kills the current leader, ``--settle`` after the restart (the clean-up stops restarted processes too). Its
results are named for the fault (``takeover-kill-latest.json``), so they never replace the hang's.

All traffic is on loopback; every wait is bounded (``--timeout``) and fails the run with the processes' log
tails. Processes, database and streams are removed at the end, on errors too (a stopped process is continued
first). Before the measured rounds the bench waits until ``pgrep -f pytest`` finds nothing (``--quiet-wait``)
and the machine is idle (``--quiet-cpu``), and notes the load average, as bench/run.py does. Results: stdout, ``bench/results/takeover-latest.json``
(and a timestamped copy). No targets are asserted: this is a measurement (the README says "another process
takes over within about 1.5 s", and a cache never serves a revoked key beyond ``staleness``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent


# bench/run.py is a script, not a package: its directory on the path, then it imports as ``run`` (as the
# receipts and hostile-input benches do): its servers, service, seeder.
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402

say = R.say
RESULTS: Path = R.RESULTS

LEADER = re.compile(rb"^keyledger_leader\s+(\S+)\s*$", re.M)
METRICS_POLL_S = 0.02
CACHE_POLL_S = 0.002
STALENESS_S = 1.0
SIGNAL = {"stop": "SIGSTOP", "kill": "SIGKILL"}  # --fault: what the leader gets
FAULTED = {"stop": "stopped", "kill": "killed"}


class Failed(Exception):
    """A bounded wait ran out, or a process answered something it must not: the run fails, saying which."""


def loadavg1() -> float:
    return round(os.getloadavg()[0], 2)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_ms": ms(statistics.median(values)), "max_ms": ms(max(values)),
            "min_ms": ms(min(values))}


async def nats_version(url: str) -> str:
    import nats

    nc = await nats.connect(url, connect_timeout=3, allow_reconnect=False)
    try:
        v = nc.connected_server_version
        return f"{v.major}.{v.minor}.{v.patch}"
    finally:
        await nc.close()


class Node:
    """One ``keyledger serve`` process (bench/run.py's Service), its label, and whether we stopped it."""

    def __init__(self, name: str, service: Any) -> None:
        self.name, self.service, self.stopped = name, service, False

    def restart(self, log_path: Path) -> None:
        """``--fault kill``: start the killed process again as bench/run.py started it (ServedProcess: its own
        session, output in ``log_path``), with its command line (the same port) and environment (the same
        database, topology, secret and PYTHONPATH). ``service`` is the new process from here on, so the
        clean-up at the end stops it."""
        old = self.service
        old.stop()  # reaps the killed process (SIGKILL to its whole group: nothing of it is left) and closes its log
        # Not R.Service(): that would pick a new port (and secret). Its command line and environment, as they were.
        self.service = R.ServedProcess(list(old.proc.args), old.env, log_path, old.port)
        self.service.what = old.what

    @property
    def base(self) -> str:
        return self.service.base

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.service.pid, sig)  # its own session (ServedProcess): the whole process group
        self.stopped = sig == signal.SIGSTOP


async def leader_of(client: httpx.AsyncClient, node: Node) -> float | None:
    """``keyledger_leader`` from the node's /metrics; None when it does not answer (in time)."""
    try:
        r = await client.get(node.base + "/metrics", timeout=1.0)
    except httpx.HTTPError:
        return None
    m = LEADER.search(r.content) if r.status_code == 200 else None
    return float(m.group(1)) if m else None


async def ready_of(client: httpx.AsyncClient, node: Node) -> bool:
    try:
        return (await client.get(node.base + "/ready", timeout=1.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float, interval: float,
                   nodes: list[Node]) -> float:
    """Seconds until ``await check()`` is truthy, polled every ``interval``; ``Failed`` after ``timeout``."""
    t0 = time.perf_counter()
    while True:
        if await check():
            return time.perf_counter() - t0
        for n in nodes:
            if n.service.proc.poll() is not None:
                raise Failed(f"while waiting for {what}: service {n.name} exited with {n.service.proc.returncode}")
        if time.perf_counter() - t0 > timeout:
            raise Failed(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)


async def steady(client: httpx.AsyncClient, leader: Node, follower: Node, cache: Any, timeout: float) -> float:
    """Bounded wait: ``leader`` leads, ``follower`` does not, both ready, and ``cache`` holds a fresh proof."""
    async def ok() -> bool:
        lv, fv = await asyncio.gather(leader_of(client, leader), leader_of(client, follower))
        if lv != 1.0 or fv != 0.0:
            return False
        return all(await asyncio.gather(ready_of(client, leader), ready_of(client, follower))) and cache.caught_up

    return await wait_for(f"{leader.name} leading, {follower.name} following, both /ready 200, cache caught up",
                          ok, timeout, 0.05, [leader, follower])


class Evictions:
    """``KeyCache`` hook: when each key's invalidation was applied, per cache."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], float] = {}

    def hook(self, cache_name: str) -> Callable[[Any], None]:
        def on_invalidation(inv: Any) -> None:
            self.at.setdefault((cache_name, inv.key_id), time.perf_counter())

        return on_invalidation


async def one_round(i: int, client: httpx.AsyncClient, leader: Node, follower: Node, cache: Any,
                    evictions: Evictions, key_id: str, key: str, headers: dict[str, str], timeout: float,
                    settle: float, fault: str, work: Path) -> tuple[dict[str, Any], Node, Node]:
    """One round; returns its record and who leads and follows for the next one."""
    steady_s = await steady(client, leader, follower, cache, timeout)
    # The cache holds the key valid and freshly verified over HTTP: the longest an entry can outlive a proof.
    res = await cache.verify(key)
    if not res.valid or cache.verify_cached(key) is None:
        raise Failed(f"round {i}: the fresh key does not verify valid through the cache ({res.code})")
    http_before = cache.http_verifications
    load = loadavg1()

    t_stop = time.perf_counter()
    leader.signal(signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
    try:
        async def takeover() -> float:
            async def leads() -> bool:
                return await leader_of(client, follower) == 1.0

            await wait_for(f"{follower.name} taking the lease after {leader.name} was {FAULTED[fault]}", leads,
                           timeout, METRICS_POLL_S, [follower])
            return time.perf_counter() - t_stop

        async def revoke_and_watch() -> dict[str, Any]:
            cached_valid_before = cache.verify_cached(key) is not None
            t_sent = time.perf_counter()
            r = await client.post(follower.base + "/api/auth/api-key/delete", headers=headers,
                                  content=json.dumps({"keyId": key_id}), timeout=5.0)
            t200 = time.perf_counter()
            if r.status_code != 200:
                raise Failed(f"round {i}: delete through {follower.name} answered {r.status_code} {r.text[:200]}")
            valid_answers = 0
            while True:
                answer = await cache.verify(key)
                now = time.perf_counter()
                if not answer.valid:
                    break
                valid_answers += 1
                if now - t200 > timeout:
                    raise Failed(f"round {i}: the cache still answers the revoked key valid {timeout:g} s after "
                                 "the delete's 200")
                await asyncio.sleep(CACHE_POLL_S)
            evicted = evictions.at.get((follower.name, key_id))
            how = "invalidation" if evicted is not None and evicted <= now else "re-verified over HTTP"
            return {"delete_200_after_stop_ms": ms(t200 - t_stop), "delete_http_ms": ms(t200 - t_sent),
                    "cached_valid_before": cached_valid_before, "invalid_after_200_s": now - t200,
                    "why_invalid": how, "code": answer.code, "valid_answers_after_200": valid_answers,
                    "cache_trusted_then": cache.trusted, "proof_age_then_ms": ms(cache.proof_age),
                    "http_verifications": cache.http_verifications - http_before, "t200": t200}

        takeover_s, watched = await asyncio.gather(takeover(), revoke_and_watch())
    finally:
        if fault == "stop":
            leader.signal(signal.SIGCONT)
    t_cont = time.perf_counter()  # the SIGCONT, or (kill) the restart

    if fault == "stop":
        async def stepped_down() -> bool:
            return await leader_of(client, leader) == 0.0

        down_s = await wait_for(f"{leader.name} reporting keyledger_leader 0.0 after SIGCONT", stepped_down,
                                timeout, METRICS_POLL_S, [leader, follower])

        async def both_ready() -> bool:
            return all(await asyncio.gather(ready_of(client, leader), ready_of(client, follower)))

        ready_s = await wait_for("/ready 200 on both after SIGCONT", both_ready, timeout, 0.05, [leader, follower])
        if await leader_of(client, follower) != 1.0:
            raise Failed(f"round {i}: {follower.name} lost the lease after {leader.name} was continued")
        next_leader = follower
        after = {"stepped_down_after_cont_ms": ms(down_s), "both_ready_after_cont_ms": ms(down_s + ready_s),
                 "stopped_for_ms": ms(t_cont - t_stop)}
        back = (f"SIGCONT: {leader.name} leader 0.0 after {ms(down_s):.0f} ms, both ready after "
                f"{ms(down_s + ready_s):.0f} ms")
    else:
        leader.restart(work / f"service-{leader.name}.round{i}.log")
        leading: list[Node] = []

        async def back_and_one_leads() -> bool:
            if not all(await asyncio.gather(ready_of(client, leader), ready_of(client, follower))):
                return False
            values = await asyncio.gather(leader_of(client, leader), leader_of(client, follower))
            leading[:] = [n for n, v in zip((leader, follower), values) if v == 1.0]
            return sorted(values) == [0.0, 1.0]

        back_s = await wait_for(f"{leader.name} restarted: /ready 200 on both and exactly one leading",
                                back_and_one_leads, timeout, 0.05, [leader, follower])
        next_leader = leading[0]  # normally the survivor; the next round kills whichever leads
        after = {"restarted_after_kill_ms": ms(t_cont - t_stop), "restarted_pid": leader.service.pid,
                 "both_ready_one_leading_after_restart_ms": ms(back_s), "leading_after_restart": next_leader.name}
        back = (f"restarted {leader.name}: both ready, {next_leader.name} leading, after {ms(back_s):.0f} ms")

    async def invalidated() -> bool:
        return (follower.name, key_id) in evictions.at

    await wait_for(f"round {i}: the invalidation of the revoked key reaching the cache", invalidated, timeout, 0.01,
                   [leader, follower])
    t200 = watched.pop("t200")
    inv_s = evictions.at[(follower.name, key_id)] - t200
    # The resumed process lost its term for lack of progress: it sits out 3 x ttl (4.5 s) before competing
    # again (leadership.py). Without this pause the next round would time that back-off, not a takeover.
    # A restarted process (--fault kill) has no such back-off: the rounds keep the same pace all the same.
    await asyncio.sleep(max(0.0, settle - (time.perf_counter() - t_cont)))
    out = {"round": i, FAULTED[fault]: leader.name, "new_leader": follower.name, "loadavg_1min": load,
           "steady_wait_ms": ms(steady_s), "takeover_s": takeover_s, **watched,
           "invalidation_after_200_ms": ms(inv_s), **after}
    say(f"  round {i:>2}: {SIGNAL[fault]} {leader.name} -> {follower.name} leads after {takeover_s * 1000:7.1f} ms | "
        f"revoked via {follower.name} ({out['delete_200_after_stop_ms']:.0f} ms after the {fault}): cache answers "
        f"invalid {watched['invalid_after_200_s'] * 1000:6.1f} ms after the 200 ({watched['why_invalid']}, "
        f"{watched['code']}), invalidation arrived after {ms(inv_s):7.1f} ms | {back} | load {load}")
    return out, next_leader, (leader if next_leader is follower else follower)


async def measure(nodes: list[Node], servers: Any, cookie: str, keys: list[tuple[str, str]], args: Any,
                  client_origin: str, work: Path) -> dict[str, Any]:
    from keyledger.client import KeyCache
    from keyledger.config import Topology

    topology = Topology(prefix=servers.prefix, events_stream=servers.events_stream,
                        invalidations_stream=servers.inv_stream)
    evictions = Evictions()
    # One cache per process, each asking that process over HTTP: a round uses the cache of the process that
    # keeps running (a cache asking the hung one would answer KEYLEDGER_UNAVAILABLE, which proves nothing).
    # A restarted process (--fault kill) listens on the same port: its cache keeps asking it.
    caches = {n.name: KeyCache(n.base, servers.nats_url, topology=topology, staleness=STALENESS_S,
                               on_invalidation=evictions.hook(n.name)) for n in nodes}
    headers = {"Cookie": cookie, "Origin": R.ORIGIN, "Content-Type": "application/json"}
    rounds: list[dict[str, Any]] = []
    async with httpx.AsyncClient() as client:
        try:
            for c in caches.values():
                await c.start()
            a, b = nodes

            async def first_leads() -> bool:
                return await leader_of(client, a) == 1.0

            t = await wait_for(f"{a.name} (started first) leading", first_leads, args.timeout, 0.05, nodes)
            say(f"  {a.name} leads ({t:.1f} s after {b.name} was healthy); keyledger.client from {client_origin}")
            leader, follower = a, b
            await steady(client, leader, follower, caches[follower.name], args.timeout)
            quiet = R.wait_until_quiet(args.quiet_wait, args.quiet_timeout, args.quiet_cpu)
            for i in range(1, args.rounds + 1):
                key_id, key = keys[i - 1]
                rec, leader, follower = await one_round(i, client, leader, follower, caches[follower.name], evictions,
                                                        key_id, key, headers, args.timeout, args.settle, args.fault,
                                                        work)
                rounds.append(rec)
        finally:
            for n in nodes:
                if n.stopped:
                    n.signal(signal.SIGCONT)
            logging.getLogger("keyledger.client").setLevel(logging.ERROR)  # "NATS disconnected" on close
            for c in caches.values():
                await c.close()
    return {"quiet": quiet, "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fault", choices=tuple(SIGNAL), default="stop",
                    help="what befalls the leader: stop = SIGSTOP, a hung process, continued after the takeover "
                         "(default); kill = SIGKILL, a crashed one, started again after the takeover")
    ap.add_argument("--timeout", type=float, default=30.0, help="bound on every wait, in seconds (default 30)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds from SIGCONT (--fault kill: from the restart) to the next round (default 5: a "
                         "resumed leader that lost its term for lack of progress sits out 4.5 s; 0 times that "
                         "back-off in every other round)")
    ap.add_argument("--pythonpath", metavar="DIR", default=None,
                    help="run the services (and import the in-process KeyCache) with the `keyledger` package in "
                         "DIR instead of the venv's, as bench/run.py --pythonpath")
    ap.add_argument("--quiet-wait", metavar="PATTERN", default="pytest",
                    help="before the rounds wait until `pgrep -f PATTERN` finds nothing (default: pytest; '' = "
                         "do not wait) and the machine is at most --quiet-cpu %% busy, at most --quiet-timeout "
                         "seconds; the load average is noted")
    ap.add_argument("--quiet-cpu", type=float, default=15.0, help="as bench/run.py (default 15; 0: no check)")
    ap.add_argument("--quiet-timeout", type=float, default=600.0)
    ap.add_argument("--keep-workdir", action="store_true", help="keep the services' logs")
    args = ap.parse_args()
    if args.pythonpath:
        sys.path.insert(0, str(Path(args.pythonpath).resolve()))
    import keyledger.client

    client_origin = keyledger.client.__file__
    R.ensure_wrk()  # not used here, but machine_info reports its version like the other benches
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kl-takeover-"))
    load_start = loadavg1()
    servers = R.Servers()
    nodes: list[Node] = []
    result: dict[str, Any] = {"fault": args.fault, "mode": servers.mode, "database": servers.dbname,
                              "streams": [servers.events_stream, servers.inv_stream], "loadavg_1min_start": load_start}
    rc = 1

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # run the clean-up below (a stopped child must be continued)

    signal.signal(signal.SIGTERM, terminated)
    try:
        machine = R.machine_info(servers.pg_version, servers.pg_settings)
        machine["nats"] = asyncio.run(nats_version(servers.nats_url))
        result["machine"] = machine
        say(f"keyledger takeover bench (--fault {args.fault}: {SIGNAL[args.fault]} the leader)")
        say(f"  machine   {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_mb']:,} MB RAM, "
            f"kernel {machine['kernel']}")
        say(f"  software  PostgreSQL {machine['postgres']}, NATS {machine['nats']}, Python {machine['python']}")
        say(f"  date      {machine['date']}   load average (1 min) {load_start}")
        say(f"  servers   {servers.mode}: database {servers.dbname}, NATS {servers.nats_url}, "
            f"streams {servers.events_stream}/{servers.inv_stream}, prefix {servers.prefix}")
        extra = {"BETTER_AUTH_SECRET": secrets.token_urlsafe(32), **R.pythonpath_env(args.pythonpath)}
        for name in ("A", "B"):  # one after the other: A migrates the schema and takes the lease first
            svc = R.Service(servers, work / f"service-{name}.log", extra)
            nodes.append(Node(name, svc))
            if name == "A":
                origin = R.code_origin(svc.env)
                result["code"] = {"pythonpath": args.pythonpath, **origin, "client": client_origin}
                say(f"  code      keyledger from {origin['file']}")
            say(f"  service {name} pid {svc.pid} on {svc.base}, healthy after {svc.wait_ready():.1f} s")
        cookie = nodes[0].service.dev_session()
        seeder = R.Seeder(nodes[0].base, cookie, 4)
        keys = seeder.create(args.rounds, "one revocation per round")
        if len(keys) < args.rounds:
            raise Failed("seeding fell short")

        say("")
        say(f"takeover rounds ({SIGNAL[args.fault]} the leader"
            + ("" if args.fault == "stop" else ", then start it again") + f"; /metrics polled every "
            f"{METRICS_POLL_S * 1000:.0f} ms; the cache polled every {CACHE_POLL_S * 1000:.0f} ms)")
        out = asyncio.run(measure(nodes, servers, cookie, keys, args, client_origin, work))
        rounds = out["rounds"]
        takeover = [r["takeover_s"] for r in rounds]
        invalid = [r["invalid_after_200_s"] for r in rounds]
        inv = [r["invalidation_after_200_ms"] / 1000.0 for r in rounds]
        summary = {"takeover": stats(takeover), "cache_invalid_after_200": stats(invalid),
                   "invalidation_after_200": stats(inv),
                   "cache_within_staleness": all(v <= STALENESS_S for v in invalid),
                   "why_invalid": {w: sum(1 for r in rounds if r["why_invalid"] == w)
                                   for w in sorted({r["why_invalid"] for r in rounds})}}
        for r in rounds:
            r["takeover_ms"] = ms(r.pop("takeover_s"))
            r["cache_invalid_after_200_ms"] = ms(r.pop("invalid_after_200_s"))

        W = 110
        say("")
        say("=" * W)
        say(f"keyledger takeover bench, --fault {args.fault} ({SIGNAL[args.fault]} the leader)  {machine['date']}  "
            f"{machine['nproc']} CPUs {machine['cpu_model']}  PostgreSQL {machine['postgres']}  "
            f"({servers.mode} servers)")
        say(f"load average (1 min): {out['quiet']['loadavg_1min']} before the rounds, "
            f"{min(r['loadavg_1min'] for r in rounds)}-{max(r['loadavg_1min'] for r in rounds)} during them")
        say("-" * W)
        say(f"{SIGNAL[args.fault]} leader -> other process reports keyledger_leader 1.0 (ms): "
            + ", ".join(f"{r['takeover_ms']:.0f}" for r in rounds))
        say(f"    median {summary['takeover']['median_ms']:.0f} ms, max {summary['takeover']['max_ms']:.0f} ms "
            f"(lease 1.5 s, renewed every 0.3 s, polled every 0.25 s; rounds {args.settle:g} s after the "
            + ("SIGCONT)" if args.fault == "stop" else "restart)"))
        say(f"revoke {'during the hang' if args.fault == 'stop' else 'after the crash'}: delete's 200 -> "
            "KeyCache(staleness=1.0) answers invalid (ms): "
            + ", ".join(f"{r['cache_invalid_after_200_ms']:.0f}" for r in rounds))
        say(f"    median {summary['cache_invalid_after_200']['median_ms']:.0f} ms, max "
            f"{summary['cache_invalid_after_200']['max_ms']:.0f} ms; within the 1 s staleness bound in every round: "
            f"{'yes' if summary['cache_within_staleness'] else 'NO'}; how: "
            + ", ".join(f"{w} {n}" for w, n in summary["why_invalid"].items()))
        say(f"    the invalidation itself arrived (from the new leader) after a median "
            f"{summary['invalidation_after_200']['median_ms']:.0f} ms, max "
            f"{summary['invalidation_after_200']['max_ms']:.0f} ms; none lost")
        say("-" * W)
        say(f"{'measure (--fault ' + args.fault + ', ' + str(len(rounds)) + ' rounds)':<72}{'median':>12}{'max':>12}"
            f"{'min':>12}")
        for label, key in ((f"{'hang' if args.fault == 'stop' else 'crash'} ({SIGNAL[args.fault]}) -> takeover",
                            "takeover"),
                           ("revoked key refused by the cache, after delete's 200", "cache_invalid_after_200"),
                           ("its invalidation published, after delete's 200", "invalidation_after_200")):
            st = summary[key]
            say(f"{label:<72}" + "".join(f"{st[k]:>9.0f} ms" for k in ("median_ms", "max_ms", "min_ms")))
        say("=" * W)
        result.update(quiet=out["quiet"], rounds=rounds, summary=summary, loadavg_1min_end=loadavg1(),
                      config={"fault": args.fault, "rounds": args.rounds, "timeout_s": args.timeout,
                              "settle_s": args.settle,
                              "metrics_poll_s": METRICS_POLL_S,
                              "cache_poll_s": CACHE_POLL_S, "staleness_s": STALENESS_S})
        text = json.dumps(result, indent=2, default=str)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = "takeover" if args.fault == "stop" else f"takeover-{args.fault}"  # the hang keeps its old names
        (RESULTS / f"{name}-latest.json").write_text(text)
        (RESULTS / f"{name}-{stamp}.json").write_text(text)
        say(f"results: {RESULTS / f'{name}-latest.json'}")
        rc = 0
    except KeyboardInterrupt:
        say("bench: interrupted")
        rc = 130
    except Exception as exc:
        say(f"bench: FAILED: {type(exc).__name__}: {exc}")
        for n in nodes:
            say(f"service {n.name} log tail:\n{n.service.log_tail()}")
        rc = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for n in nodes:
            try:
                if n.service.proc.poll() is None:
                    n.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
                n.service.stop()
            except Exception as exc:
                say(f"bench: stopping service {n.name}: {exc}")
        servers.stop()
        if args.keep_workdir:
            say(f"workdir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
