#!/usr/bin/env python3
"""keyledger cluster benchmark: what losing the node that leads the events stream costs, in the deployment
shape (a 3-node JetStream cluster, R3 streams, two service processes), under a steady revoke load.

    python bench/cluster_bench.py --rounds 10     # PostgreSQL from DATABASE_URL (a fresh database on it,
                                                  # dropped at the end), else embedded; NATS is always a
                                                  # 3-node cluster of its own (keyledger.embedded.NatsCluster)

Setup: ``NatsCluster`` on loopback (stores in a temp dir), a fresh database (bench/run.py's Servers), two
``keyledger serve`` processes (bench/run.py's Service) with ``KEYLEDGER_STREAM_REPLICAS=3``, one secret and one
topology; the keys every round revokes are created beforehand over HTTP. Each round (``--rounds``, 10):

1. the cluster is whole (both streams have a leader and two current replicas), both processes answer ``/ready``
   200; the node that leads the events stream is the one to kill. A fresh ``KeyCache(staleness=1.0)`` connected
   to another node (its NATS URL only) and asking both processes over HTTP is caught up, and the round's keys
   (``--keys-per-round``) are verified valid through it and served from memory (warm);
2. revokes start, one every ``--interval`` (40 ms), alternating between the processes, each a fresh key;
   ``--before`` (1 s) later the leader's node gets ``SIGKILL``;
3. measured from the kill:
   (a) **new leader**: ``STREAM.INFO`` of the events stream (asked of the surviving nodes every 20 ms,
       overlapping requests) first names a leader other than the killed node;
   (b) **relay publishing again**: the outbox row of the first revoke sent after the kill is gone (the relay
       deletes a row only after JetStream's PubAck; polled every 20 ms), and the first invalidation of a revoke
       sent after the kill reaching the cache;
   (c) for every revoke: time from its 200 to the cache refusing the key (polled every 2 ms with
       ``verify_cached``; the refusal is then confirmed with ``verify``, which must answer invalid), and how
       often the cache served the revoked key valid while a freshness proof newer than the revoke's 200 said
       it was trusted (the proof then vouches that the invalidation had arrived: must be 0), or more than
       ``staleness`` after the 200 (must be 0);
4. revokes go on until (a), (b) and the first invalidation are seen, then ``--after`` (1 s) more;
5. (d) once the outbox is empty: every revoke answered 200 must have its event in the log and that event in the
   events stream (``Nats-Msg-Id`` = event id), and an invalidation for its key in the invalidations stream
   (stream ranges of this round; waited for at most ``--timeout``, then counted as missing). Both counts are
   reported, not asserted; so is how often a process gave its background leadership up (its log's WARNING), which
   is what delays the invalidations behind the relay;
6. the killed node is started again (same port and store) and the next round waits until the cluster is whole.

Every wait is bounded (``--timeout``); a wait that runs out fails the run with the processes' log tails.
Processes, the database and the cluster's stores are removed at the end, on errors and Ctrl-C too. Before the
rounds the bench waits until nothing matches ``--quiet-wait`` and the machine is idle enough, and notes the load
average (bench/run.py's wait_until_quiet). Results: stdout, ``bench/results/cluster-latest.json`` and a timestamped
copy. No targets are asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ scripts import each other as modules (see takeover_bench.py)
import run as R  # noqa: E402
import takeover_bench as T  # noqa: E402

say = R.say
Failed = T.Failed
ms, loadavg1 = T.ms, T.loadavg1
RESULTS: Path = R.RESULTS

STALENESS_S = 1.0
LEADER_POLL_S = 0.02
OUTBOX_POLL_S = 0.02
CACHE_POLL_S = 0.002
JS_API_TIMEOUT_S = 1.0
REVOKED = "ApiKeyRevoked"

now = time.monotonic  # the KeyCache's clock too: its proof times compare with ours


@dataclasses.dataclass
class Revoke:
    key_id: str
    key: str
    via: str
    sent: float
    answered: float | None = None
    status: int | None = None
    refused: float | None = None  # first poll at which the cache no longer served it valid
    # verify() once memory stopped answering (evicted, or untrusted and older than the staleness): invalid, as it
    # must be, unless memory answers again inside the staleness window under a proof older than the 200 (allowed).
    confirmed_invalid: bool | None = None
    valid_again_within_staleness: bool = False
    valid_polls: int = 0  # polls answered valid from memory after the 200 (allowed within staleness)
    valid_under_covering_proof: int = 0  # ... while trusted by a proof sent after the 200: a broken promise
    valid_beyond_staleness: int = 0  # ... more than staleness after the 200: a broken bound


def median_max(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_ms": ms(statistics.median(values)), "max_ms": ms(max(values)),
            "min_ms": ms(min(values))}


async def connect(urls: list[str]) -> Any:
    import nats

    async def expected(_exc: Exception) -> None:
        pass  # the killed node drops its clients: nats-py would print every such error

    return await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                              error_cb=expected)


async def whole(js: Any, streams: tuple[str, ...]) -> bool:
    """Every stream has a leader and two current replicas: the cluster can lose a node again."""
    for name in streams:
        try:
            info = await js.stream_info(name)
        except Exception:
            return False
        c = info.cluster
        if c is None or not c.leader or len(c.replicas or []) != 2:
            return False
        if not all(p.current and not p.offline for p in c.replicas):
            return False
    return True


async def bounded(what: str, check: Any, timeout: float, interval: float) -> float:
    """Seconds until ``await check()`` is truthy; ``Failed`` after ``timeout``."""
    t0 = now()
    while not await check():
        if now() - t0 > timeout:
            raise Failed(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)
    return now() - t0


async def stream_range(js: Any, stream: str, after_seq: int) -> list[Any]:
    """The stream's messages after ``after_seq`` (this round's), in order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(max(after_seq + 1, info.state.first_seq), info.state.last_seq + 1):
        try:
            out.append(await js.get_msg(stream, seq))
        except Exception:  # a deleted sequence
            continue
    return out


class Round:
    """One kill: its revokes, the cache watching them, and the measures."""

    def __init__(self, i: int, ctx: Any, keys: list[tuple[str, str]], doomed: str, survivor_url: str) -> None:
        self.i, self.ctx, self.keys, self.doomed = i, ctx, keys, doomed
        self.survivor_url = survivor_url
        self.revokes: list[Revoke] = []
        self.watching: list[Revoke] = []
        self.invalidated_at: dict[str, float] = {}
        self.t_kill: float | None = None
        self.first_after_kill: Revoke | None = None
        self.first_after_kill_seen = asyncio.Event()
        self.stop_revoking = asyncio.Event()
        self.revoking_done = asyncio.Event()
        self.confirmations: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []

    def on_invalidation(self, inv: Any) -> None:
        self.invalidated_at.setdefault(inv.key_id, now())

    async def revoker(self, http: httpx.AsyncClient) -> None:
        """One revoke every ``interval``, each a fresh key, alternating between the processes. One at a time:
        a slow answer delays the next instead of piling up requests (the answer times are in the results)."""
        ctx = self.ctx
        t_next = now()
        try:
            for n, (key_id, key) in enumerate(self.keys):
                if self.stop_revoking.is_set():
                    break
                node = ctx.nodes[n % 2]
                r = Revoke(key_id, key, node.name, now())
                self.revokes.append(r)
                await self.revoke(http, node, r)
                t_next += ctx.args.interval
                await asyncio.sleep(max(0.0, t_next - now()))
        finally:
            self.revoking_done.set()

    async def revoke(self, http: httpx.AsyncClient, node: T.Node, r: Revoke) -> None:
        try:
            resp = await http.post(node.base + "/api/auth/api-key/delete", headers=self.ctx.headers,
                                   content=json.dumps({"keyId": r.key_id}), timeout=self.ctx.args.timeout)
        except httpx.HTTPError as exc:
            self.errors.append(f"{node.name}: {type(exc).__name__}: {exc}")
            return
        r.answered, r.status = now(), resp.status_code
        if r.status != 200:
            self.errors.append(f"{node.name}: {r.status} {resp.text[:200]}")
            return
        self.watching.append(r)
        # Sent after the kill, so committed after it: the relay can only publish it once the stream has a new
        # leader.
        if self.t_kill is not None and r.sent > self.t_kill and self.first_after_kill is None:
            self.first_after_kill = r
            self.first_after_kill_seen.set()

    async def watcher(self, cache: Any) -> None:
        """Every 2 ms, each revoked key not yet refused: does the cache still serve it from memory?"""
        timeout = self.ctx.args.timeout
        while not (self.revoking_done.is_set() and not self.watching):
            for r in list(self.watching):
                res = cache.verify_cached(r.key)
                t = now()
                assert r.answered is not None
                if res is not None and res.valid:
                    r.valid_polls += 1
                    # The proof's instant is when its probe was sent: every event committed before it has been
                    # invalidated here. One sent after this revoke's 200 covers the revoke.
                    if cache.trusted and t - cache.proof_age >= r.answered:
                        r.valid_under_covering_proof += 1
                    if t - r.answered > STALENESS_S:
                        r.valid_beyond_staleness += 1
                    if t - r.answered > timeout:
                        raise Failed(f"round {self.i}: the cache still serves a revoked key valid {timeout:g} s "
                                     "after its 200")
                    continue
                r.refused = t
                self.watching.remove(r)
                task = asyncio.create_task(self.confirm(cache, r))
                self.confirmations.add(task)
                task.add_done_callback(self.confirmations.discard)
            await asyncio.sleep(CACHE_POLL_S)

    async def confirm(self, cache: Any, r: Revoke) -> None:
        """What a request would get once memory no longer answers: verify() (over HTTP) must say invalid."""
        try:
            valid = (await cache.verify(r.key)).valid
            t = now()
            assert r.answered is not None
            allowed = not (cache.trusted and t - cache.proof_age >= r.answered) and t - r.answered <= STALENESS_S
            r.valid_again_within_staleness = valid and allowed
            r.confirmed_invalid = not valid or allowed
        except Exception as exc:
            self.errors.append(f"verify after refusal: {type(exc).__name__}: {exc}")

    async def new_leader(self, js: Any) -> tuple[float, str]:
        """(a): the first STREAM.INFO answer naming a leader other than the killed node. A request sent while
        there is no leader is not answered; a new one goes out every 20 ms regardless, so the answer comes
        within about 20 ms (plus its round trip) of the election."""
        found: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        events_stream = self.ctx.topology.events_stream

        async def ask() -> None:
            try:
                info = await js.stream_info(events_stream)
            except Exception:
                return
            leader = info.cluster.leader if info.cluster else None
            if leader and leader != self.doomed and not found.done():
                found.set_result((now(), leader))

        asks: set[asyncio.Task[None]] = set()
        try:
            while not found.done():
                assert self.t_kill is not None
                if now() - self.t_kill > self.ctx.args.timeout:
                    raise Failed(f"round {self.i}: no new leader of the events stream within "
                                 f"{self.ctx.args.timeout:g} s of the kill")
                task = asyncio.create_task(ask())
                asks.add(task)
                task.add_done_callback(asks.discard)
                await asyncio.wait([found], timeout=LEADER_POLL_S)
            return found.result()
        finally:
            for task in list(asks):
                task.cancel()

    async def relay_again(self, db: Any) -> float:
        """(b): the outbox row of the first revoke sent after the kill is gone, i.e. JetStream acknowledged it."""
        timeout = self.ctx.args.timeout
        await asyncio.wait_for(self.first_after_kill_seen.wait(), timeout)
        r = self.first_after_kill
        assert r is not None
        row = await (await db.execute("SELECT position FROM events WHERE stream_id = %s AND type = %s",
                                      (r.key_id, REVOKED))).fetchone()
        if row is None:
            raise Failed(f"round {self.i}: the revoke answered 200 has no event in the log")
        position = row[0]

        async def gone() -> bool:
            cur = await db.execute("SELECT EXISTS (SELECT 1 FROM outbox WHERE position <= %s)", (position,))
            return not (await cur.fetchone())[0]

        await bounded(f"round {self.i}: the relay publishing the first event after the kill", gone, timeout,
                      OUTBOX_POLL_S)
        return now()


async def one_round(i: int, ctx: Any, keys: list[tuple[str, str]]) -> dict[str, Any]:
    from keyledger.client import KeyCache

    args, cluster, topology = ctx.args, ctx.cluster, ctx.topology
    streams = (topology.events_stream, topology.invalidations_stream)
    whole_s = await bounded(f"round {i}: the cluster whole (both streams: a leader, two current replicas)",
                            lambda: whole(ctx.js, streams), args.timeout, 0.1)

    async def both_ready() -> bool:
        return all(await asyncio.gather(*(T.ready_of(ctx.http, n) for n in ctx.nodes)))

    await bounded(f"round {i}: /ready 200 on both processes", both_ready, args.timeout, 0.1)
    info = await ctx.js.stream_info(topology.events_stream)
    doomed_name = info.cluster.leader
    inv_leader = (await ctx.js.stream_info(topology.invalidations_stream)).cluster.leader
    doomed = cluster.by_name[doomed_name]
    survivors = [n for n in cluster.nodes if n is not doomed]
    rnd = Round(i, ctx, keys, doomed_name, survivors[0].url)

    cache = KeyCache([n.base for n in ctx.nodes], survivors[0].url, topology=topology, staleness=STALENESS_S,
                     on_invalidation=rnd.on_invalidation)
    # A connection of our own to the surviving nodes only, so that asking STREAM.INFO never waits for a
    # reconnect away from the killed one.
    mon = await connect([n.url for n in survivors])
    try:
        await cache.start()
        await bounded(f"round {i}: the cache caught up", lambda: _true(cache.caught_up), args.timeout, 0.02)
        sem = asyncio.Semaphore(8)

        async def warm(key: str) -> bool:
            async with sem:
                return (await cache.verify(key)).valid

        if not all(await asyncio.gather(*(warm(k) for _, k in keys))):
            raise Failed(f"round {i}: a fresh key does not verify valid through the cache")
        cold = sum(1 for _, k in keys if cache.verify_cached(k) is None)
        if cold:
            raise Failed(f"round {i}: {cold} keys are not served from memory after warming")
        mjs = mon.jetstream(timeout=JS_API_TIMEOUT_S)
        seq0 = {s: (await mjs.stream_info(s)).state.last_seq for s in streams}
        load = loadavg1()

        log_from = {n.name: n.service.log_path.stat().st_size for n in ctx.nodes}
        revoker = asyncio.create_task(rnd.revoker(ctx.http))
        watcher = asyncio.create_task(rnd.watcher(cache))
        try:
            await asyncio.sleep(args.before)
            if revoker.done():
                await revoker  # raises what stopped it
                raise Failed(f"round {i}: the keys ran out before the kill (raise --keys-per-round)")
            rnd.t_kill = now()
            await asyncio.to_thread(doomed.kill)
            leader_task = asyncio.create_task(rnd.new_leader(mjs))
            relay_task = asyncio.create_task(rnd.relay_again(ctx.db))
            (t_leader, new_leader), t_relay = await asyncio.gather(leader_task, relay_task)

            async def first_invalidation() -> bool:
                r = rnd.first_after_kill
                return r is not None and r.key_id in rnd.invalidated_at

            await bounded(f"round {i}: the first invalidation after the kill reaching the cache",
                          first_invalidation, args.timeout, 0.005)
            await asyncio.sleep(args.after)
            rnd.stop_revoking.set()
            await asyncio.wait_for(revoker, args.timeout)
            await asyncio.wait_for(watcher, args.timeout)
            if rnd.confirmations:
                await asyncio.wait_for(asyncio.gather(*rnd.confirmations), args.timeout)
        finally:
            for task in (revoker, watcher):
                task.cancel()
        t_kill = rnd.t_kill
        answered = [r for r in rnd.revokes if r.status == 200]
        after_kill = [r for r in answered if r.sent > t_kill]
        firsts = [rnd.invalidated_at[r.key_id] for r in after_kill if r.key_id in rnd.invalidated_at]
        t_first_inv = min(firsts)

        # (d) Nothing lost: log, events stream, invalidations stream.
        async def outbox_empty() -> bool:
            return (await (await ctx.db.execute("SELECT count(*) FROM outbox")).fetchone())[0] == 0

        await bounded(f"round {i}: the outbox drained", outbox_empty, args.timeout, 0.05)
        rows = await (await ctx.db.execute(
            "SELECT stream_id, id::text FROM events WHERE type = %s AND stream_id = ANY(%s)",
            (REVOKED, [r.key_id for r in answered]))).fetchall()
        event_of = dict(rows)
        not_in_log = [r.key_id for r in answered if r.key_id not in event_of]
        t0 = now()
        while True:
            events = await stream_range(mjs, topology.events_stream, seq0[topology.events_stream])
            invs = await stream_range(mjs, topology.invalidations_stream, seq0[topology.invalidations_stream])
            msg_ids = [(m.headers or {}).get("Nats-Msg-Id") for m in events]
            published = set(msg_ids)
            invalidated = set()
            for m in invs:
                try:
                    invalidated.add(json.loads(m.data).get("keyId"))
                except ValueError:
                    pass
            not_in_stream = [k for k, e in event_of.items() if e not in published]
            no_invalidation = [r.key_id for r in answered if r.key_id not in invalidated]
            # The invalidation projection may still be writing: wait (bounded) before counting anything missing.
            if (not not_in_stream and not no_invalidation) or now() - t0 > args.timeout:
                break
            await asyncio.sleep(0.5)
        ours = set(event_of.values())
        mine = [m for m in msg_ids if m in ours]
        duplicates = len(mine) - len(set(mine))

        # Why invalidations may lag the relay: a process that leads but cannot publish gives its background
        # leadership up (leadership.py), and each new term starts its projections' consumers afresh.
        logged = {n.name: n.service.log_path.read_bytes()[log_from[n.name]:] for n in ctx.nodes}
        gave_up = {name: text.count(b"gave up background leadership") for name, text in logged.items()}
        refused = [r.refused - r.answered for r in answered if r.refused is not None and r.answered is not None]
        rec = {
            "round": i, "killed": doomed_name, "invalidations_leader_was": inv_leader, "new_leader": new_leader,
            "new_leader_after_kill_ms": ms(t_leader - t_kill),
            "relay_published_after_kill_ms": ms(t_relay - t_kill),
            "first_invalidation_at_cache_after_kill_ms": ms(t_first_inv - t_kill),
            "first_revoke_after_kill_200_after_kill_ms": ms(rnd.first_after_kill.answered - t_kill),
            "revokes_sent": len(rnd.revokes), "revokes_200": len(answered), "revokes_after_kill": len(after_kill),
            "revoke_errors": rnd.errors[:20], "revoke_error_count": len(rnd.errors),
            "delete_http_max_ms": ms(max(r.answered - r.sent for r in answered)),
            "delete_http_median_ms": ms(statistics.median(r.answered - r.sent for r in answered)),
            "refused_after_200_max_ms": ms(max(refused)), "refused_after_200_median_ms": ms(statistics.median(refused)),
            "refused_after_200_max_after_kill_ms": ms(max((r.refused - r.answered for r in after_kill), default=0.0)),
            "valid_polls_after_200": sum(r.valid_polls for r in answered),
            "served_valid_under_covering_proof": sum(r.valid_under_covering_proof for r in answered),
            "served_valid_beyond_staleness": sum(r.valid_beyond_staleness for r in answered),
            "verify_after_refusal_not_invalid": sum(1 for r in answered if r.confirmed_invalid is False),
            "verify_after_refusal_valid_within_staleness": sum(1 for r in answered if r.valid_again_within_staleness),
            "revokes_lost": len(not_in_log) + len(not_in_stream), "not_in_log": not_in_log[:20],
            "not_in_events_stream": not_in_stream[:20], "invalidations_missing": len(no_invalidation),
            "missing_invalidations": no_invalidation[:20], "events_stream_duplicates": duplicates,
            "leadership_given_up": gave_up, "cache_flushes": cache.flushes, "whole_wait_before_ms": ms(whole_s),
            "loadavg_1min": load,
        }
    finally:
        logging.getLogger("keyledger.client").setLevel(logging.ERROR)  # "NATS disconnected" on close
        await cache.close()
        await mon.close()

    # The killed node comes back on its port and store; the next round waits until it is current again.
    t_restart = now()
    await asyncio.to_thread(doomed.restart)
    back_s = await bounded(f"round {i}: the cluster whole again after restarting {doomed_name}",
                           lambda: whole(ctx.js, streams), args.timeout, 0.1)
    rec["restart_to_whole_ms"] = ms(now() - t_restart)
    say(f"  round {i:>2}: SIGKILL {doomed_name} (events leader; invalidations leader {inv_leader}) | "
        f"new leader {new_leader} after {rec['new_leader_after_kill_ms']:.0f} ms | relay published again after "
        f"{rec['relay_published_after_kill_ms']:.0f} ms, first invalidation at the cache after "
        f"{rec['first_invalidation_at_cache_after_kill_ms']:.0f} ms | {len(answered)} revokes (200), "
        f"{len(after_kill)} after the kill; 200 -> refused max {rec['refused_after_200_max_ms']:.0f} ms | "
        f"served valid under a covering proof {rec['served_valid_under_covering_proof']}, beyond staleness "
        f"{rec['served_valid_beyond_staleness']} | lost {rec['revokes_lost']}, invalidations missing "
        f"{rec['invalidations_missing']} | leadership given up {sum(gave_up.values())}x | whole again "
        f"{ms(back_s):.0f} ms after the restart | load {load}")
    return rec


def ready_now(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def _true(value: bool) -> bool:
    return value


class Context:
    """What every round shares: the cluster, the processes, one HTTP client, one NATS and one DB connection."""

    def __init__(self, args: Any, cluster: Any, nodes: list[T.Node], topology: Any, headers: dict[str, str]) -> None:
        self.args, self.cluster, self.nodes, self.topology, self.headers = args, cluster, nodes, topology, headers
        self.http: Any = None
        self.js: Any = None
        self.db: Any = None


async def measure(ctx: Context, keys: list[tuple[str, str]], db_url: str) -> list[dict[str, Any]]:
    import psycopg

    # The cluster-wide connection (all nodes; it reconnects when its node is the killed one) only checks
    # wholeness between rounds; the measures use connections to the surviving nodes.
    nc = await connect([n.url for n in ctx.cluster.nodes])
    ctx.js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
    ctx.db = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    rounds: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient() as http:
            ctx.http = http
            per = ctx.args.keys_per_round
            for i in range(1, ctx.args.rounds + 1):
                rounds.append(await one_round(i, ctx, keys[(i - 1) * per:i * per]))
    finally:
        await ctx.db.close()
        await nc.close()
    return rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.04, help="seconds between revokes (default 0.04)")
    ap.add_argument("--before", type=float, default=1.0, help="seconds of revokes before the kill (default 1)")
    ap.add_argument("--after", type=float, default=1.0,
                    help="seconds of revokes after the new leader, the relay and the first invalidation were seen")
    ap.add_argument("--keys-per-round", type=int, default=600,
                    help="fresh keys created for each round (default 600: 24 s of revokes at 40 ms; the first "
                         "invalidation after a kill took up to 19 s in 10 rounds; a round whose keys run out stops "
                         "revoking and is measured all the same)")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on every wait, in seconds (default 60)")
    ap.add_argument("--quiet-wait", metavar="PATTERN", default="pytest",
                    help="before the rounds wait until `pgrep -f PATTERN` finds nothing (default: pytest; '' = "
                         "do not wait) and the machine is at most --quiet-cpu %% busy")
    ap.add_argument("--quiet-cpu", type=float, default=25.0,
                    help="as bench/run.py (default 25: three idle nats-servers are not nothing; 0: no check)")
    ap.add_argument("--quiet-timeout", type=float, default=300.0)
    ap.add_argument("--keep-workdir", action="store_true", help="keep the services' and NATS nodes' logs")
    args = ap.parse_args()

    from keyledger.config import Topology
    from keyledger.embedded import NatsCluster

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kl-cluster-"))
    load_start = loadavg1()
    cluster: Any = None
    servers: Any = None
    nodes: list[T.Node] = []
    rc = 1

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # run the clean-up below

    signal.signal(signal.SIGTERM, terminated)
    try:
        t = time.monotonic()
        cluster = NatsCluster(work / "nats")
        say(f"bench: 3-node NATS cluster started in {time.monotonic() - t:.1f} s ({cluster.url})")
        servers = R.Servers(own_nats=cluster.url)
        machine = R.machine_info(servers.pg_version, servers.pg_settings)
        machine["nats"] = asyncio.run(T.nats_version(cluster.nodes[0].url))
        say("keyledger cluster bench (SIGKILL the node leading the events stream, R3 streams, revokes under way)")
        say(f"  machine   {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_mb']:,} MB RAM, "
            f"kernel {machine['kernel']}")
        say(f"  software  PostgreSQL {machine['postgres']} ({servers.mode}), NATS {machine['nats']} x 3, "
            f"Python {machine['python']}")
        say(f"  date      {machine['date']}   load average (1 min) {load_start}")
        extra = {"BETTER_AUTH_SECRET": secrets.token_urlsafe(32), "KEYLEDGER_STREAM_REPLICAS": "3"}
        for name in ("A", "B"):  # one after the other: A migrates the schema and creates the R3 streams
            svc = R.Service(servers, work / f"service-{name}.log", extra)
            nodes.append(T.Node(name, svc))
            ready = svc.wait_ready(timeout=args.timeout)  # /health
            t_ready = time.monotonic()
            # /ready: the R3 streams exist (they need the cluster's meta leader) and revocations propagate.
            while not ready_now(svc.base):
                if time.monotonic() - t_ready > args.timeout:
                    raise Failed(f"service {name}: /ready not 200 within {args.timeout:g} s")
                time.sleep(0.1)
            say(f"  service {name} pid {svc.pid} on {svc.base}, ready after {ready + time.monotonic() - t_ready:.1f} s")
        cookie = nodes[0].service.dev_session()
        seeder = R.Seeder(nodes[0].base, cookie, 4)
        keys = seeder.create(args.rounds * args.keys_per_round, f"{args.rounds} rounds")
        if len(keys) < args.rounds * args.keys_per_round:
            raise Failed("seeding fell short")
        quiet = R.wait_until_quiet(args.quiet_wait, args.quiet_timeout, args.quiet_cpu)
        topology = Topology(prefix=servers.prefix, events_stream=servers.events_stream,
                            invalidations_stream=servers.inv_stream, consumer_prefix=f"bench-{servers.rand}")
        headers = {"Cookie": cookie, "Origin": R.ORIGIN, "Content-Type": "application/json"}
        ctx = Context(args, cluster, nodes, topology, headers)
        say("")
        say(f"rounds (a revoke every {args.interval * 1000:.0f} ms, {args.before:g} s before the kill; STREAM.INFO "
            f"every {LEADER_POLL_S * 1000:.0f} ms, outbox every {OUTBOX_POLL_S * 1000:.0f} ms, the cache every "
            f"{CACHE_POLL_S * 1000:.0f} ms)")
        rounds = asyncio.run(measure(ctx, keys, servers.db_url))

        def col(key: str) -> list[float]:
            return [r[key] / 1000.0 for r in rounds]

        summary = {
            "new_leader_after_kill": median_max(col("new_leader_after_kill_ms")),
            "relay_published_after_kill": median_max(col("relay_published_after_kill_ms")),
            "first_invalidation_at_cache_after_kill": median_max(col("first_invalidation_at_cache_after_kill_ms")),
            "refused_after_200_max_per_round": median_max(col("refused_after_200_max_ms")),
            "restart_to_whole": median_max(col("restart_to_whole_ms")),
            "revokes_200": sum(r["revokes_200"] for r in rounds),
            "revokes_after_kill": sum(r["revokes_after_kill"] for r in rounds),
            "revoke_errors": sum(r["revoke_error_count"] for r in rounds),
            "revokes_lost": sum(r["revokes_lost"] for r in rounds),
            "invalidations_missing": sum(r["invalidations_missing"] for r in rounds),
            "served_valid_under_covering_proof": sum(r["served_valid_under_covering_proof"] for r in rounds),
            "served_valid_beyond_staleness": sum(r["served_valid_beyond_staleness"] for r in rounds),
            "verify_after_refusal_not_invalid": sum(r["verify_after_refusal_not_invalid"] for r in rounds),
            "verify_after_refusal_valid_within_staleness": sum(r["verify_after_refusal_valid_within_staleness"]
                                                               for r in rounds),
            "events_stream_duplicates": sum(r["events_stream_duplicates"] for r in rounds),
        }
        W = 100
        say("")
        say("=" * W)
        say(f"keyledger cluster bench, SIGKILL the events stream leader's node  {machine['date']}  "
            f"{machine['nproc']} CPUs {machine['cpu_model']}  PostgreSQL {machine['postgres']} ({servers.mode}), "
            f"NATS {machine['nats']} x 3")
        say(f"load average (1 min): {quiet['loadavg_1min']} before the rounds, "
            f"{min(r['loadavg_1min'] for r in rounds)}-{max(r['loadavg_1min'] for r in rounds)} during them")
        say("-" * W)
        say(f"{'measure (' + str(len(rounds)) + ' rounds)':<64}{'median':>12}{'max':>12}{'min':>12}")
        for label, key in (("kill -> new events stream leader (STREAM.INFO)", "new_leader_after_kill"),
                           ("kill -> relay published again (first post-kill outbox row acked)",
                            "relay_published_after_kill"),
                           ("kill -> first post-kill invalidation at the cache",
                            "first_invalidation_at_cache_after_kill"),
                           ("revoke 200 -> cache refuses the key (max per round)", "refused_after_200_max_per_round"),
                           ("restart of the killed node -> cluster whole", "restart_to_whole")):
            st = summary[key]
            say(f"{label:<64}" + "".join(f"{st[k]:>9.0f} ms" for k in ("median_ms", "max_ms", "min_ms")))
        say("-" * W)
        say(f"revokes answered 200: {summary['revokes_200']} ({summary['revokes_after_kill']} sent after a kill), "
            f"errors {summary['revoke_errors']}")
        say(f"revokes lost (200 but not in the log or the events stream): {summary['revokes_lost']}; invalidations "
            f"missing: {summary['invalidations_missing']}; duplicates in the events stream: "
            f"{summary['events_stream_duplicates']}")
        say(f"revoked key served valid by the cache: under a proof newer than the 200 "
            f"{summary['served_valid_under_covering_proof']}, beyond the 1 s staleness "
            f"{summary['served_valid_beyond_staleness']}; verify() after memory stopped answering: valid "
            f"{summary['verify_after_refusal_not_invalid']} (beyond the staleness or under a covering proof), valid "
            f"again inside the staleness window {summary['verify_after_refusal_valid_within_staleness']} (allowed)")
        say("=" * W)
        result = {"machine": machine, "mode": servers.mode, "database": servers.dbname,
                  "streams": [servers.events_stream, servers.inv_stream], "loadavg_1min_start": load_start,
                  "quiet": quiet, "rounds": rounds, "summary": summary, "loadavg_1min_end": loadavg1(),
                  "config": {"rounds": args.rounds, "interval_s": args.interval, "before_s": args.before,
                             "after_s": args.after, "keys_per_round": args.keys_per_round, "timeout_s": args.timeout,
                             "staleness_s": STALENESS_S, "leader_poll_s": LEADER_POLL_S,
                             "outbox_poll_s": OUTBOX_POLL_S, "cache_poll_s": CACHE_POLL_S}}
        text = json.dumps(result, indent=2, default=str)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        (RESULTS / "cluster-latest.json").write_text(text)
        (RESULTS / f"cluster-{stamp}.json").write_text(text)
        say(f"results: {RESULTS / 'cluster-latest.json'}")
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
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for n in nodes:
            try:
                n.service.stop()
            except Exception as exc:
                say(f"bench: stopping service {n.name}: {exc}")
        if servers is not None:
            servers.stop()
        if cluster is not None:
            cluster.stop()
        if args.keep_workdir:
            say(f"workdir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
