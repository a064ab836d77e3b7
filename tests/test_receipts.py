"""Revocation receipts: when did a revoked key stop working in every cache? Real caches (in this process, and
one in a process of its own, the example downstream service, which the test can hang with SIGSTOP), a real
``keyledger serve``, real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats
import psycopg
import pytest
import uvloop
from psycopg import sql
from nats.js.api import AckPolicy, ConsumerConfig

from harness import ROOT, Service, delete_streams, free_port, metric, unique_topology, wait_for, wait_until
from keyledger.client import KeyCache
from keyledger.background.bus import Bus
from keyledger.core.events import (ApiKeyRevoked, ApiKeyRotated, EnvelopeHead, RecordedEvent, decode_envelope_head,
                                   encode_envelope, encode_reduced_envelope)
from keyledger.core.records import hash_key
from keyledger.projections.receipts import (BATCH, GONE_AFTER_S, LATEST, REVOKING, WRITE, DbClock, HeardCache,
                                            ReceiptsProjection, _revocation)
from keyledger.projections.receipts import read as read_receipt


def receipt(svc: Service, headers: dict[str, str], key_id: str) -> httpx.Response:
    return svc.get("api-key/revocation", headers, params={"id": key_id})


async def receipt_when(svc: Service, headers: dict[str, str], key_id: str, wanted: Any, *,
                       within: float) -> dict[str, Any]:
    """The key's receipt once ``wanted(answer)`` holds (failing with the last answer after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        answer = (await asyncio.to_thread(receipt, svc, headers, key_id)).json()
        if wanted(answer):
            return answer
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.05)


async def effective_everywhere(svc: Service, headers: dict[str, str], key_id: str, *, within: float) -> dict[str, Any]:
    """The key's receipt once ``effectiveEverywhereAt`` is set."""
    return await receipt_when(svc, headers, key_id, lambda a: a.get("effectiveEverywhereAt"), within=within)


def at(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


@pytest.fixture
def deployment(db_factory: Any, nats_url: str, tmp_path: Path) -> Iterator[Service]:
    topology = unique_topology("receipts")
    svc = Service(database_url=db_factory.create("receipts"), nats_url=nats_url, topology=topology,
                  log_path=tmp_path / "k.log").start()
    wait_until(lambda: httpx.get(f"{svc.url}/ready", timeout=5).status_code == 200, timeout=20, what="ready")
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


@pytest.fixture
def process_cache(deployment: Service, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "KEYLEDGER_SUBJECT_PREFIX": deployment.topology.prefix,
           "KEYLEDGER_INVALIDATIONS_STREAM": deployment.topology.invalidations_stream}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "downstream.py"), "--keyledger-url", deployment.url, "--nats-url",
         deployment.nats_url, "--port", str(free_port()), "--cache-id", "proc-cache", "--service", "reports"],
        env=env, cwd=ROOT, stdout=open(tmp_path / "downstream.log", "wb"), stderr=subprocess.STDOUT)
    yield proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(10)


def live_caches(svc: Service) -> set[str]:
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT cache_id FROM receipt_caches"
                                           " WHERE last_seen_at > clock_timestamp() - interval '5 seconds'")}


def test_every_cache_confirms_and_the_revocation_completes_everywhere(
        deployment: Service, process_cache: subprocess.Popen[bytes]) -> None:
    svc = deployment
    me = svc.session()
    announced: list[bytes] = []

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(svc.nats_url)

        async def heard(msg: Any) -> None:
            announced.append(msg.data)

        await nc.subscribe(svc.topology.effective_subject, cb=heard)
        caches = [KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id=f"mem-{i}", service="api")
                  for i in range(3)]
        try:
            for cache in caches:
                await cache.start()
            await wait_for(lambda: {"mem-0", "mem-1", "mem-2", "proc-cache"} <= live_caches(svc), 20,
                           "every cache reporting")
            key = await asyncio.to_thread(svc.create_key, me)
            for cache in caches:
                assert (await cache.verify(key["key"])).valid
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            for cache in caches:
                await wait_for(lambda c=cache: c.verify_cached(key["key"]) is None, 5, "eviction")
            return await effective_everywhere(svc, me, key["id"], within=10)
        finally:
            for cache in caches:
                await cache.close()
            await nc.close()

    answer = asyncio.run(scenario())
    assert answer["type"] == "ApiKeyRevoked"
    states = {c["cacheId"]: c for c in answer["caches"]}
    assert {"mem-0", "mem-1", "mem-2", "proc-cache"} <= set(states)
    assert states["proc-cache"]["service"] == "reports" and states["mem-0"]["service"] == "api"
    revoked = at(answer["revokedAt"])
    with psycopg.connect(svc.database_url, autocommit=True) as conn:  # (the database's clock, after the answer)
        (answered,) = conn.execute("SELECT clock_timestamp()").fetchone()
    for cache in states.values():
        assert cache["state"] == "confirmed"
        assert revoked <= at(cache["effectiveAt"]) <= at(answer["effectiveEverywhereAt"]) <= answered
    wait_until(lambda: any(answer["keyId"].encode() in m for m in announced), timeout=5,
               what="the revocation.effective announcement")
    history = svc.get("api-key/history", me, params={"id": answer["keyId"]}).json()
    assert history["revocation"]["effectiveEverywhereAt"] == answer["effectiveEverywhereAt"]
    # The command line says the same (an operator's or auditor's view, straight from the database).
    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "keyledger.cli", *args], env=svc.env(), cwd=ROOT, check=True,
                              capture_output=True, text=True, timeout=60).stdout
    by_cli = json.loads(cli("receipts", answer["keyId"], "--json"))
    assert {k: v for k, v in by_cli.items() if k != "caches"} == {k: v for k, v in answer.items() if k != "caches"}
    assert {c["cacheId"]: c["effectiveAt"] for c in by_cli["caches"]} == {c: states[c]["effectiveAt"] for c in states}
    assert f"everywhere: {answer['effectiveEverywhereAt']}" in cli("receipts", answer["keyId"])
    assert f"effective everywhere: {answer['effectiveEverywhereAt']}" in cli("history", answer["keyId"])


def test_a_hung_cache_blocks_everywhere_until_it_is_gone(deployment: Service,
                                                         process_cache: subprocess.Popen[bytes]) -> None:
    """While a hung cache keeps a revocation pending, the receipt already shows the caches that confirmed it
    (the projection writes a pending revocation's confirmations within a second); once the hung cache is gone
    the revocation completes, the hung one listed gone."""
    svc = deployment
    me = svc.session()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="awake") as cache:
            await wait_for(lambda: {"proc-cache", "awake"} <= live_caches(svc), 20, "both caches reporting")
            os.kill(process_cache.pid, signal.SIGSTOP)
            key = await asyncio.to_thread(svc.create_key, me)
            assert (await cache.verify(key["key"])).valid
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            # the awake cache's confirmation, written while the revocation is still pending
            pending = await receipt_when(svc, me, key["id"], lambda a: any(
                c["cacheId"] == "awake" and c["state"] == "confirmed" for c in a.get("caches", [])), within=5)
            return pending, await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S + 10)

    pending, answer = asyncio.run(scenario())
    assert pending["effectiveEverywhereAt"] is None, pending
    assert {c["cacheId"]: c["state"] for c in pending["caches"]} == {"awake": "confirmed", "proc-cache": "pending"}
    states = {c["cacheId"]: c for c in answer["caches"]}
    assert states["proc-cache"]["state"] == "gone" and states["proc-cache"]["effectiveAt"] is None
    assert states["awake"]["effectiveAt"] == pending["caches"][0]["effectiveAt"]  # dated once, never again
    assert at(answer["effectiveEverywhereAt"]) > at(states["awake"]["effectiveAt"])  # when the hung one went


def test_receipts_go_on_after_the_projections_database_connection_is_cut(deployment: Service) -> None:
    """The projection's two loops (receipts, sweeper) and its ``record`` of the active-keys subscriber's batches
    share one PostgreSQL connection. Its backend terminated (as a database failover or an idle-session kill
    would): the loops stop and start again on a new connection, reloading their state from the tables, the batch
    that failed is delivered again, and a revocation after the cut completes as before."""
    svc = deployment
    me = svc.session()

    def cut() -> int:
        with psycopg.connect(svc.database_url, autocommit=True) as conn:
            return conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND application_name = 'keyledger receipts'"
                                ).fetchone()[0]

    async def scenario() -> dict[str, Any]:
        async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="steady") as cache:
            await wait_for(lambda: "steady" in live_caches(svc), 20, "the cache reporting")
            assert await asyncio.to_thread(cut) == 1
            key = await asyncio.to_thread(svc.create_key, me)
            assert (await cache.verify(key["key"])).valid
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            return await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S)

    answer = asyncio.run(scenario())
    assert {c["cacheId"]: c["state"] for c in answer["caches"]} == {"steady": "confirmed"}, answer
    assert "receipts projection" in svc.log_tail(400)  # it noticed the cut and retried


def test_a_new_term_deletes_the_events_consumers_receipts_and_invalidations_once_had(deployment: Service) -> None:
    """Receipts, then invalidations, once read the events stream through durable consumers of their own; both now
    take the active-keys subscriber's batches. A deployment upgraded from then still has those consumers, which
    NATS would keep, with an ever-growing backlog: a term's start deletes them, and revocations are recorded as
    before."""
    svc = deployment
    me = svc.session()
    stream = svc.topology.events_stream
    left_over = [svc.topology.consumer("receipts") + "-e1", svc.topology.consumer("invalidations") + "-e1"]

    async def consumers(add: bool = False) -> set[str]:
        nc = await nats.connect(svc.nats_url)
        try:
            js = nc.jetstream()
            for name in left_over if add else []:
                await js.add_consumer(stream, ConsumerConfig(
                    durable_name=name, deliver_subject=f"_KL_DELIVER.{name}", deliver_group=name,
                    ack_policy=AckPolicy.ALL, filter_subject=svc.topology.event_only_subjects))
            return {c.name for c in await js.consumers_info(stream)}
        finally:
            await nc.close()

    svc.stop()
    assert set(left_over) <= asyncio.run(consumers(add=True))
    svc.start()
    wait_until(lambda: httpx.get(f"{svc.url}/ready", timeout=5).status_code == 200, timeout=20, what="ready again")
    wait_until(lambda: not set(left_over) & asyncio.run(consumers()), timeout=10, what="left-overs deleted")
    kinds = {name.rsplit("-e", 1)[0] for name in asyncio.run(consumers())}
    assert kinds == {svc.topology.consumer("active-api-keys")}, kinds
    key = svc.create_key(me)
    assert svc.delete(me, key["id"]).status_code == 200
    answer = wait_until(lambda: (r := receipt(svc, me, key["id"])).status_code == 200 and r.json(), timeout=10,
                        what="the revocation recorded")
    assert answer["type"] == "ApiKeyRevoked" and answer["position"] > 0, answer


def test_a_cache_that_joins_later_is_not_listed_and_strangers_get_404(deployment: Service) -> None:
    svc = deployment
    me, stranger = svc.session(), svc.session()
    key = svc.create_key(me)
    assert svc.delete(me, key["id"]).status_code == 200
    wait_until(lambda: receipt(svc, me, key["id"]).json().get("effectiveEverywhereAt"), timeout=10,
               what="completion")

    async def late() -> None:
        async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="late") as cache:
            await wait_for(lambda: cache.trusted, 15, "the late cache trusted")
            await wait_for(lambda: "late" in live_caches(svc), 10, "the late cache reporting")

    asyncio.run(late())
    assert "late" not in {c["cacheId"] for c in receipt(svc, me, key["id"]).json()["caches"]}
    refused = receipt(svc, stranger, key["id"])
    assert refused.status_code == 404 and refused.json()["code"] == "KEY_NOT_FOUND"
    never = svc.create_key(me)
    not_revoked = receipt(svc, me, never["id"])
    assert not_revoked.status_code == 404 and not_revoked.json()["code"] == "NOT_REVOKED"


def test_a_cache_reports_each_applied_invalidation_at_once(deployment: Service) -> None:
    """The cache's receipt names the revocation's position as soon as it evicted the key, without waiting for a
    checkpoint to cover it (the wire: ``<prefix>.cache.receipts``)."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)

    async def scenario() -> list[dict[str, Any]]:
        nc = await nats.connect(svc.nats_url)
        heard = await receipts_of(nc, svc, "reporter")
        try:
            async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="reporter") as cache:
                await wait_for(lambda: cache.trusted, 15, "the cache trusted")
                assert (await cache.verify(key["key"])).valid
                assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
                await wait_for(lambda: cache.verify_cached(key["key"]) is None, 5, "eviction")
                position = (await asyncio.to_thread(receipt, svc, me, key["id"])).json()["position"]
                await wait_for(lambda: any(position in r.get("applied", []) for r in heard), 5,
                               "a receipt naming the revocation's position")
                return heard
        finally:
            await nc.close()

    heard = asyncio.run(scenario())
    assert all(set(r) <= {"cacheId", "service", "position", "applied"} for r in heard)  # positions only


def test_a_storm_of_revocations_costs_a_cache_no_more_receipts_than_its_budget_and_each_is_confirmed(
        deployment: Service) -> None:
    """A cache allowed 2 receipts at once and 1 a second: ten revocations in a row bring at most that many of its
    receipts onto the wire (the later ones naming several positions), and every revocation is confirmed by it."""
    svc = deployment
    me = svc.session()
    keys = [svc.create_key(me) for _ in range(10)]

    async def scenario() -> tuple[list[dict[str, Any]], float, list[dict[str, Any]]]:
        nc = await nats.connect(svc.nats_url)
        heard = await receipts_of(nc, svc, "frugal")
        try:
            async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="frugal",
                                receipt_rate=1.0, receipt_burst=2) as cache:
                await wait_for(lambda: cache.trusted, 15, "the cache trusted")
                for key in keys:
                    assert (await cache.verify(key["key"])).valid
                await wait_for(lambda: bool(heard), 5, "a heartbeat: the cache is live")
                start, before = time.monotonic(), len(heard)
                for key in keys:
                    assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
                answers = [await effective_everywhere(svc, me, key["id"], within=15) for key in keys]
                took = time.monotonic() - start
                return heard[before:], took, answers
        finally:
            await nc.close()

    sent, took, answers = asyncio.run(scenario())
    assert len(sent) <= 2 + 1.0 * took + 1, (len(sent), took)  # (+1: one sent just before it was counted)
    assert len([r for r in sent if r["applied"]]) < len(keys)  # some named several revocations together
    for answer in answers:
        assert [(c["cacheId"], c["state"]) for c in answer["caches"]] == [("frugal", "confirmed")], answer


async def send_receipts(nc: Any, svc: Service, *receipts: dict[str, Any] | bytes) -> None:
    """Speak the receipts wire by hand: each receipt (a dict sent as JSON, bytes as they are), then a flush."""
    for r in receipts:
        await nc.publish(svc.topology.receipts_subject, r if isinstance(r, bytes) else json.dumps(r).encode())
    await nc.flush()


async def positions_on(nc: Any, subject: str) -> list[int]:
    """The ``position`` of each message on ``subject`` from now on, appended as they arrive."""
    positions: list[int] = []

    async def arrived(msg: Any) -> None:
        positions.append(json.loads(msg.data)["position"])

    await nc.subscribe(subject, cb=arrived)
    return positions


async def receipts_of(nc: Any, svc: Service, cache_id: str) -> list[dict[str, Any]]:
    """The receipts ``cache_id`` sends from now on, appended as they arrive."""
    heard: list[dict[str, Any]] = []

    async def arrived(msg: Any) -> None:
        receipt = json.loads(msg.data)
        if receipt["cacheId"] == cache_id:
            heard.append(receipt)

    await nc.subscribe(svc.topology.receipts_subject, cb=arrived)
    return heard


async def invalidated_positions(nc: Any, svc: Service) -> list[int]:
    """The positions of the invalidations published from now on."""
    return await positions_on(nc, svc.topology.invalidation_subject)


def test_an_applied_receipt_confirms_the_revocation_without_a_checkpoint(deployment: Service) -> None:
    """A cache that speaks the wire format by hand: live by one heartbeat, then it confirms a revocation only by
    naming its position in ``applied``, its proven position never reaching it. keyledger counts it confirmed
    (a cache that never confirmed would be listed "gone" after GONE_AFTER_S, not "confirmed")."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            await send_receipts(nc, svc, {"cacheId": "by-hand", "position": 0, "applied": []})
            await wait_for(lambda: "by-hand" in live_caches(svc), 10, "the hand-made cache live")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            await send_receipts(nc, svc, {"cacheId": "by-hand", "position": 0, "applied": positions})
            return await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S - 2)
        finally:
            await nc.close()

    answer = asyncio.run(scenario())
    states = {c["cacheId"]: c["state"] for c in answer["caches"]}
    assert states["by-hand"] == "confirmed", answer


def test_a_receipt_that_outran_the_revocation_confirms_it_once_it_is_projected(deployment: Service) -> None:
    """A receipt can reach the projection before the revocation's event does (a redelivered event, a cache faster
    than the projection): that cache is confirmed, dated from that receipt, when the event is projected. A cache by
    hand names the log's next positions before the delete, and says nothing more of them; a second one, live,
    names the delete's only after it. The first is confirmed before the second confirms (the revocation held,
    then written pending), and before the revocation itself: dated from its receipt, not from a later one."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        (last,) = conn.execute("SELECT max(position) FROM events").fetchone()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            await send_receipts(nc, svc, {"cacheId": "ahead", "position": 0, "applied": list(range(last + 1,
                                                                                                    last + 21))},
                                {"cacheId": "behind", "position": 0, "applied": []})
            await wait_for(lambda: {"ahead", "behind"} <= live_caches(svc), 10, "both caches live")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            assert last < positions[0] <= last + 20, (last, positions)
            heartbeats = ({"cacheId": c, "position": 0, "applied": []} for c in ("ahead", "behind"))
            await send_receipts(nc, svc, *heartbeats)  # live, neither covering it by this
            states = {"ahead": "confirmed", "behind": "pending"}
            held = await receipt_when(svc, me, key["id"], lambda a: {c["cacheId"]: c["state"] for c in a["caches"]}
                                      == states, within=GONE_AFTER_S - 4)
            await send_receipts(nc, svc, {"cacheId": "behind", "position": 0, "applied": positions})
            return held, await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S - 4)
        finally:
            await nc.close()

    held, answer = asyncio.run(scenario())
    assert held["effectiveEverywhereAt"] is None, held
    caches = {c["cacheId"]: c for c in answer["caches"]}
    assert {c["state"] for c in caches.values()} == {"confirmed"}, answer
    assert at(caches["ahead"]["effectiveAt"]) < at(answer["revokedAt"]) < at(caches["behind"]["effectiveAt"]), answer
    assert answer["effectiveEverywhereAt"] == caches["behind"]["effectiveAt"], answer


def test_metrics_count_the_live_caches_and_what_waits_for_them(deployment: Service) -> None:
    """/metrics (the leader's): the caches live, the receipts taken in, the revocations waiting for a cache's receipt
    and how long the oldest has waited (what an operator alerts on: a cache that stopped confirming makes it grow,
    up to GONE_AFTER_S), and the revocations announced in effect everywhere."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)
    waiting, oldest = "keyledger_revocations_waiting", "keyledger_revocation_oldest_waiting_seconds"
    effective = "keyledger_revocations_effective_total"

    async def scenario() -> None:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            live = metric(svc, "keyledger_receipt_caches_live")
            received = metric(svc, "keyledger_receipts_received_total")
            await send_receipts(nc, svc, *({"cacheId": c, "position": 0, "applied": []} for c in ("one", "two")))
            await wait_for(lambda: metric(svc, "keyledger_receipt_caches_live") == live + 2, 10, "two caches live")
            assert metric(svc, "keyledger_receipts_received_total") >= received + 2
            announced = metric(svc, effective)
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            await send_receipts(nc, svc, {"cacheId": "one", "position": 0, "applied": positions})
            await wait_for(lambda: metric(svc, waiting) == 1 and metric(svc, oldest) > 0.3, 5, "waiting for two")
            assert metric(svc, effective) == announced
            await send_receipts(nc, svc, {"cacheId": "two", "position": 0, "applied": positions})
            await wait_for(lambda: metric(svc, effective) == announced + 1, 5, "announced")
            assert (metric(svc, waiting), metric(svc, oldest)) == (0, 0)
        finally:
            await nc.close()

    asyncio.run(scenario())


# Triggers of the test's own (its database is a clone of its own): every write of a revocation, in order, with
# its table (a row of its own in revocations, or a place in a row of revocation_batches).
NOTE_WRITES = """
CREATE TABLE revocation_writes (n bigserial, tab text NOT NULL, op text NOT NULL, position bigint NOT NULL);
CREATE FUNCTION note_revocation_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'revocations' THEN
        INSERT INTO revocation_writes (tab, op, position) VALUES (TG_TABLE_NAME, TG_OP, NEW.position);
    ELSE
        INSERT INTO revocation_writes (tab, op, position) SELECT TG_TABLE_NAME, TG_OP, unnest(NEW.positions);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER note_writes AFTER INSERT OR UPDATE ON revocations
    FOR EACH ROW EXECUTE FUNCTION note_revocation_write();
CREATE TRIGGER note_writes AFTER INSERT OR UPDATE ON revocation_batches
    FOR EACH ROW EXECUTE FUNCTION note_revocation_write();
"""


def note_writes(svc: Service) -> None:
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        conn.execute(NOTE_WRITES)


def writes(svc: Service) -> list[tuple[str, str, int]]:
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        return conn.execute("SELECT tab, op, position FROM revocation_writes ORDER BY n").fetchall()


def cursor(svc: Service) -> int:
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        return conn.execute("SELECT position FROM receipts_written").fetchone()[0]


async def forwarded_positions(nc: Any, svc: Service) -> list[int]:
    """The positions of the freshness checkpoints forwarded to caches from now on."""
    return await positions_on(nc, svc.topology.checkpoint_subject)


def test_a_revocation_confirmed_within_a_second_is_written_once(deployment: Service) -> None:
    """The projection holds a revocation until its caches confirm it and writes it then, once, in effect
    everywhere: one INSERT of a row of revocation_batches, no UPDATE (it used to be inserted when projected and
    updated when confirmed: two row versions and their WAL per revocation while caches were live). Meanwhile the
    receipt answers from the log, pending on the live caches, never a 404 (the row is not there yet). Then the
    cursor passes it."""
    svc = deployment
    note_writes(svc)
    me = svc.session()
    key = svc.create_key(me)

    async def scenario() -> tuple[httpx.Response, list[tuple[str, int]], dict[str, Any], int]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            await send_receipts(nc, svc, {"cacheId": "slow", "position": 0})
            await wait_for(lambda: "slow" in live_caches(svc), 10, "the hand-made cache live")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            early = await asyncio.to_thread(receipt, svc, me, key["id"])
            await wait_for(lambda: positions, 5, "the invalidation")  # the projection has it in hand by now
            before = await asyncio.to_thread(writes, svc)
            await send_receipts(nc, svc, {"cacheId": "slow", "position": 0, "applied": positions})
            return early, before, await effective_everywhere(svc, me, key["id"], within=5), positions[0]
        finally:
            await nc.close()

    early, before, answer, position = asyncio.run(scenario())
    assert early.status_code == 200, early.text
    assert early.json()["effectiveEverywhereAt"] is None and early.json()["position"] == position
    assert {c["cacheId"]: c["state"] for c in early.json()["caches"]} == {"slow": "pending"}, early.json()
    assert before == [], before  # held, not written, while the cache had not confirmed
    assert {c["cacheId"]: c["state"] for c in answer["caches"]} == {"slow": "confirmed"}, answer
    assert writes(svc) == [("revocation_batches", "INSERT", position)]  # in effect everywhere when written
    wait_until(lambda: cursor(svc) >= position, timeout=10, what="the cursor past the written revocation")


def test_a_revocation_no_cache_held_has_no_row_and_took_effect_everywhere_at_its_commit(
        deployment: Service) -> None:
    """With no cache live, a revocation is in effect everywhere the moment it commits (verify reads the database):
    the receipt says so from the delete's 200 on (``effectiveEverywhereAt`` = ``revokedAt``, no cache listed), and
    so does the announcement, and no row is written for it (a row per revocation cost a deployment without caches
    an insert and its WAL per revoke). A cache that joins later changes nothing."""
    svc = deployment
    note_writes(svc)
    me = svc.session()
    key = svc.create_key(me)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        nc = await nats.connect(svc.nats_url)
        announced: list[dict[str, Any]] = []

        async def heard(msg: Any) -> None:
            announced.append(json.loads(msg.data))

        await nc.subscribe(svc.topology.effective_subject, cb=heard)
        try:
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            first = (await asyncio.to_thread(receipt, svc, me, key["id"])).json()
            await wait_for(lambda: announced, 5, "the revocation.effective announcement")
            await send_receipts(nc, svc, {"cacheId": "late", "position": 0})
            await wait_for(lambda: "late" in live_caches(svc), 10, "a cache live after it")
            return first, announced[0]
        finally:
            await nc.close()

    first, announcement = asyncio.run(scenario())
    assert first["effectiveEverywhereAt"] == first["revokedAt"] and first["caches"] == [], first
    assert announcement["effectiveEverywhereAt"] == first["revokedAt"] and announcement["caches"] == 0, announcement
    assert announcement["keyId"] == key["id"] and announcement["position"] == first["position"]
    later = receipt(svc, me, key["id"]).json()
    assert later["effectiveEverywhereAt"] == first["revokedAt"] and later["caches"] == [], later
    wait_until(lambda: cursor(svc) >= first["position"], timeout=10, what="the cursor past it")
    assert receipt(svc, me, key["id"]).json() == later
    assert writes(svc) == []


def test_a_revocation_held_unwritten_when_the_leader_dies_is_taken_from_the_log(deployment: Service) -> None:
    """A revocation's event is acked while the projection still holds it unwritten (its cache has not confirmed).
    The leader killed (-9) then takes that memory with it: the next term finds the revocation in the log, above
    the cursor and without a row, waits for the cache again, and writes it once the cache confirms. A cache first
    heard of after the revocation, live at the restart too, is not waited for."""
    svc = deployment
    note_writes(svc)
    me = svc.session()
    key = svc.create_key(me)
    slow = {"cacheId": "slow", "position": 0}

    async def until_the_kill() -> tuple[int, float]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        checkpoints = await forwarded_positions(nc, svc)
        try:
            noted = time.monotonic()  # its row in receipt_caches: what the next term reads of its liveness
            await send_receipts(nc, svc, slow)
            await wait_for(lambda: "slow" in live_caches(svc), 10, "the hand-made cache live")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await send_receipts(nc, svc, {"cacheId": "newcomer", "position": 0})
            await wait_for(lambda: positions, 5, "the invalidation")
            # A checkpoint forwarded past it: the consumer's acks cover its event, which will not come again.
            await wait_for(lambda: checkpoints and checkpoints[-1] >= positions[0], 5, "a checkpoint past it")
            await wait_for(lambda: "newcomer" in live_caches(svc), 5, "the newcomer live")
            svc.kill()
            return positions[0], noted
        finally:
            await nc.close()

    position, noted = asyncio.run(until_the_kill())
    assert writes(svc) == [] and cursor(svc) < position  # held unwritten, the cursor short of it, at the kill
    svc.start()

    async def after_the_restart() -> tuple[dict[str, Any], dict[str, Any]] | None:
        nc = await nats.connect(svc.nats_url)
        try:
            await wait_for(lambda: httpx.get(f"{svc.url}/ready", timeout=5).status_code == 200, 20, "ready again")
            if time.monotonic() - noted > GONE_AFTER_S - 1:
                return None  # the new term may have taken the cache for gone
            await send_receipts(nc, svc, slow)
            await asyncio.sleep(1.5)  # a new term's sweeps: a revocation it waits for is written after a second
            pending = (await asyncio.to_thread(receipt, svc, me, key["id"])).json()
            await send_receipts(nc, svc, {**slow, "applied": [position]})
            return pending, await effective_everywhere(svc, me, key["id"], within=5)
        finally:
            await nc.close()

    outcome = asyncio.run(after_the_restart())
    if outcome is None:
        pytest.skip("the restart took longer than a cache stays live: nothing left to check")
    pending, answer = outcome
    assert pending["effectiveEverywhereAt"] is None and pending["position"] == position, pending
    assert {c["cacheId"]: c["state"] for c in pending["caches"]} == {"slow": "pending"}, pending
    assert {c["cacheId"]: c["state"] for c in answer["caches"]} == {"slow": "confirmed"}, answer
    # pending after 1 s, then done: a row of its own
    assert [(t, op) for t, op, p in writes(svc) if p == position] == [("revocations", "INSERT"),
                                                                       ("revocations", "UPDATE")]


def test_a_chatty_cache_is_noted_at_most_once_a_second_and_its_receipts_still_count(deployment: Service) -> None:
    """Under a burst of revocations a cache sends a receipt per burst of invalidations: its row in receipt_caches is
    rewritten at most once a second (liveness is kept in memory), and what its receipts confirm still counts."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)

    db = psycopg.connect(svc.database_url, autocommit=True)  # one connection for the ~250 looks below

    def last_seen() -> dt.datetime | None:
        row = db.execute("SELECT last_seen_at FROM receipt_caches WHERE cache_id = 'chatty'").fetchone()
        return None if row is None else row[0]

    async def scenario() -> tuple[set[dt.datetime], float, dict[str, Any]]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        seen: set[dt.datetime] = set()
        try:
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # ~100 receipts a second for 2.5 s
                await send_receipts(nc, svc, {"cacheId": "chatty", "position": 0, "applied": []})
                if (at := await asyncio.to_thread(last_seen)) is not None:
                    seen.add(at)
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - started
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            await send_receipts(nc, svc, {"cacheId": "chatty", "position": 0, "applied": positions})
            return seen, elapsed, await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S - 2)
        finally:
            await nc.close()

    with db:
        seen, elapsed, answer = asyncio.run(scenario())
    # Noted when first heard, then again once a second while it keeps reporting (every write moves last_seen_at).
    assert 2 <= len(seen) <= elapsed + 2, (len(seen), elapsed)
    assert {c["cacheId"]: c["state"] for c in answer["caches"]} == {"chatty": "confirmed"}, answer


def test_a_quiet_cache_stays_live(deployment: Service) -> None:
    """With nothing revoked for longer than GONE_AFTER_S, a running cache is still live (its heartbeats go on),
    so the next revocation waits for its confirmation instead of calling it gone."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)

    async def scenario() -> None:
        async with KeyCache(svc.url, svc.nats_url, topology=svc.topology, cache_id="quiet"):
            await wait_for(lambda: "quiet" in live_caches(svc), 15, "the cache reporting")
            await asyncio.sleep(GONE_AFTER_S + 2)
            assert "quiet" in live_caches(svc), "a running cache went silent while nothing was revoked"
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: receipt(svc, me, key["id"]).json().get("effectiveEverywhereAt"), 10,
                           "completion")

    asyncio.run(scenario())
    states = {c["cacheId"]: c["state"] for c in receipt(svc, me, key["id"]).json()["caches"]}
    assert states["quiet"] == "confirmed"


def test_a_new_leader_waits_for_the_caches_its_predecessor_heard(deployment: Service) -> None:
    """The projection keeps the live caches in memory (it alone writes them), so a new leadership term must start
    from the table: a cache heard just before the restart, silent since, is still waited for (listed pending),
    not skipped as if no cache existed."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)

    heartbeat = {"cacheId": "before", "position": 0}

    async def live_until_the_restart() -> float:
        nc = await nats.connect(svc.nats_url)
        try:
            await send_receipts(nc, svc, heartbeat)
            await wait_for(lambda: "before" in live_caches(svc), 10, "the hand-made cache live")
            await send_receipts(nc, svc, heartbeat)
            heard = time.monotonic()
            await asyncio.to_thread(svc.stop)  # its heartbeats end with the old term
            return heard
        finally:
            await nc.close()

    heard = asyncio.run(live_until_the_restart())
    svc.start()
    wait_until(lambda: httpx.get(f"{svc.url}/ready", timeout=5).status_code == 200, timeout=20, what="ready again")
    assert svc.delete(me, key["id"]).status_code == 200
    answer = wait_until(lambda: (r := receipt(svc, me, key["id"])).status_code == 200 and r.json(), timeout=10,
                        what="the revocation recorded")
    if time.monotonic() - heard > GONE_AFTER_S - 1:
        pytest.skip("the restart took longer than a cache stays live: nothing left to check")
    states = {c["cacheId"]: c["state"] for c in answer["caches"]}
    assert states.get("before") == "pending" and answer["effectiveEverywhereAt"] is None, answer


def test_hostile_receipts_change_nothing_and_stop_nothing(deployment: Service) -> None:
    """Anyone who can publish on ``<prefix>.cache.receipts`` can send anything there. Malformed, mistyped,
    out-of-range (beyond PostgreSQL's bigint, or not a position), NUL-carrying (PostgreSQL text cannot hold NUL)
    and large (600 kB) receipts are dropped one by one: no row for them, the projection never restarts, and an
    honest cache's receipt sent right behind them, in the same batch, still counts."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)
    hostile: list[bytes] = [
        b"not json", b"[]", b"{}", b'{"cacheId": 7, "position": 1}', b'{"cacheId": "x", "position": "1"}',
        json.dumps({"cacheId": "nul\u0000id", "position": 1}).encode(),
        json.dumps({"cacheId": "svc-nul", "service": "a\u0000b", "position": 1}).encode(),
        json.dumps({"cacheId": "huge", "position": 2**64}).encode(),
        json.dumps({"cacheId": "negative", "position": -1}).encode(),
        json.dumps({"cacheId": "huge-applied", "position": 0, "applied": [2**70]}).encode(),
        json.dumps({"cacheId": "zero-applied", "position": 0, "applied": [0]}).encode(),
        b'{"cacheId": "big", "position": 0, "applied": [' + b"1e999," * 100_000 + b"1]}",
    ]

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            await send_receipts(nc, svc, *hostile, {"cacheId": "honest", "position": 0})
            await wait_for(lambda: "honest" in live_caches(svc), 10, "the honest cache live behind the hostile ones")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            await send_receipts(nc, svc, *hostile, {"cacheId": "honest", "position": 0, "applied": positions})
            return await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S - 2)
        finally:
            await nc.close()

    answer = asyncio.run(scenario())
    assert {c["cacheId"]: c["state"] for c in answer["caches"]} == {"honest": "confirmed"}, answer
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        assert {r[0] for r in conn.execute("SELECT cache_id FROM receipt_caches")} == {"honest"}
    assert "receipts projection" not in svc.log_tail(400), svc.log_tail(40)


def test_cache_ids_that_look_like_array_syntax_are_written_together_and_read_back_as_sent(
        deployment: Service) -> None:
    """Any text without NUL is a valid cache id, and the caches of revocations written together go into one row's
    text[]: quotes, braces, commas, backslashes, the word NULL, the empty id and one over the 200 characters kept
    (cut to 200, in characters not bytes) must come back from the receipt exactly as the caches sent them, all
    confirmed, from that one batch row."""
    svc = deployment
    me = svc.session()
    key = svc.create_key(me)
    ids = ['say "hi"', "{a,b}", "back\\slash\\", "NULL", "", "ε" * 300, "comma, space "]

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(svc.nats_url)
        positions = await invalidated_positions(nc, svc)
        try:
            await send_receipts(nc, svc, *({"cacheId": c, "position": 0} for c in ids))
            await wait_for(lambda: len(live_caches(svc)) == len(ids), 10, "every hand-made cache live")
            assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
            await wait_for(lambda: positions, 5, "the invalidation")
            await send_receipts(nc, svc, *({"cacheId": c, "position": 0, "applied": positions} for c in ids))
            return await effective_everywhere(svc, me, key["id"], within=GONE_AFTER_S - 2)
        finally:
            await nc.close()

    answer = asyncio.run(scenario())
    kept = sorted(c[:200] for c in ids)
    assert sorted((c["cacheId"], c["state"]) for c in answer["caches"]) == [(c, "confirmed") for c in kept], answer
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT caches FROM revocation_batches WHERE %s = ANY(positions)",
                            (answer["position"],)).fetchall()
    assert [sorted(caches) for (caches,) in rows] == [kept], rows


class LoneProjection:
    """A ``ReceiptsProjection`` run alone on a real database and NATS, fed as the active-keys subscriber feeds it
    (``record``, with a delivery batch's envelope heads); the caches speak the receipts wire by hand. ``announced``:
    the positions on ``<prefix>.revocation.effective``, as they come."""

    def __init__(self, url: str, nats_url: str, name: str) -> None:
        self.url, self.nats_url = url, nats_url
        self.topology = unique_topology(name)
        self.now = dt.datetime.now(dt.timezone.utc)

    async def __aenter__(self) -> "LoneProjection":
        self.bus = Bus(self.nats_url, self.topology)
        self.bus.start()
        self.nc = await nats.connect(self.nats_url)
        self.announced = await positions_on(self.nc, self.topology.effective_subject)
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
        await self.nc.close()
        await self.bus.close()
        await delete_streams(self.nats_url, self.topology)

    def start(self) -> None:
        """A term starts: a new projection (what it knows comes from the tables)."""
        self.projection = ReceiptsProjection(self.url, self.bus)
        self.task = asyncio.create_task(self.projection.run())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def record(self, *positions: int) -> None:
        """A delivery batch of revocations at these positions (of keys k<position>)."""
        await self.projection.record([None] * len(positions), [
            EnvelopeHead(id=str(uuid.uuid4()), type="ApiKeyRevoked", key_id=f"k{p}", version=2, position=p,
                         occurred_at=self.now) for p in positions])

    async def send(self, *receipts: dict[str, Any]) -> None:
        await send_receipts(self.nc, SimpleNamespace(topology=self.topology), *receipts)

    async def send_until(self, done: Callable[[], bool], what: str, *receipts: dict[str, Any]) -> None:
        """Send ``receipts`` every 0.1 s until ``done()`` (failing after 5 s), as caches repeat what they proved: a
        projection subscribes once loaded, so what a test sends right after ``start`` may go unheard."""
        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await self.send(*receipts)
            await asyncio.sleep(0.1)

    async def live(self, *caches: str) -> None:
        """Heartbeats from these caches, as they send them, until the projection counts them live."""
        deadline = time.monotonic() + 10
        while self.projection.gauges()[0] < len(caches):
            assert time.monotonic() < deadline, f"{caches} live"
            await self.send(*({"cacheId": c, "position": 0} for c in caches))
            await asyncio.sleep(0.1)

    async def batches(self) -> list[tuple[list[int], list[str], list[list[int]]]]:
        """revocation_batches' rows, in the order written: positions, caches, each one's time (us since 1970)."""
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            return await (await conn.execute("SELECT positions, caches, effective_us FROM revocation_batches"
                                             " ORDER BY id")).fetchall()


def test_a_redelivered_revocation_already_in_effect_everywhere_is_neither_written_nor_announced_again(
        db_factory: Any, nats_url: str) -> None:
    """Revocations every cache confirmed are written together, in one row of revocation_batches, which has no key a
    second write of one would conflict on. So when the consumer delivers such an event again (its ack was lost, or a
    new term's consumer starts below it), the projection must know it settled it: not held again, not written again,
    not announced again, even as the caches name it once more; a new term learns it from the table."""
    url = db_factory.create("receipts_redelivered")
    both = [{"cacheId": c, "position": 0, "applied": [10, 12, 14, 16]} for c in ("a", "b")]

    async def scenario() -> tuple[list[int], list[Any]]:
        async with LoneProjection(url, nats_url, "redelivered") as lone:
            await lone.live("a", "b")
            await lone.record(10, 12)
            await lone.send_until(lambda: sorted(lone.announced) == [10, 12], "both announced",
                                  *({"cacheId": c, "position": 0, "applied": [10, 12]} for c in ("a", "b")))
            await lone.record(12, 10, 14)  # two delivered again, with a new one
            await lone.send_until(lambda: 14 in lone.announced, "the new one announced", *both)
            await lone.stop()  # the term ends; the next one's consumer delivers the three again, and a fourth
            lone.start()
            await lone.record(10, 12, 14, 16)
            await lone.send_until(lambda: 16 in lone.announced, "the fourth announced", *both)
            await asyncio.sleep(0.2)  # (anything announced twice would have come with it)
            return lone.announced, await lone.batches()

    announced, rows = asyncio.run(scenario())
    assert sorted(announced) == [10, 12, 14, 16], announced
    assert [(p, c) for p, c, _ in rows] == [([10, 12], ["a", "b"]), ([14], ["a", "b"]), ([16], ["a", "b"])], rows


def test_a_cache_that_only_proves_positions_confirms_what_waits_for_it_up_to_each(db_factory: Any,
                                                                                  nats_url: str) -> None:
    """A cache whose receipts name nothing in ``applied`` (one that predates it, or whose applied receipt was lost)
    confirms a revocation once its proven position reaches it: each proven position confirms the held revocations
    that wait for it above the position it proved before, up to the new one, and no further. One taken in after the
    cache had proved its position (a late delivery, held out of order) counts as confirmed by that cache at once,
    dated by the receipt that proved it, earlier than the other cache's."""
    url = db_factory.create("receipts_proven")

    async def scenario() -> tuple[list[int], list[int], list[Any]]:
        async with LoneProjection(url, nats_url, "proven") as lone:
            await lone.live("a", "b")
            await lone.record(10, 12, 14)
            await lone.send_until(lambda: sorted(lone.announced) == [10, 12], "10 and 12 announced",
                                  {"cacheId": "a", "position": 0, "applied": [10, 12, 14]},
                                  {"cacheId": "b", "position": 12})
            await asyncio.sleep(0.2)
            first = list(lone.announced)  # 14 waits for b
            await lone.record(11)  # b proved 12 already
            await lone.send_until(lambda: 11 in lone.announced, "11 announced",
                                  {"cacheId": "a", "position": 0, "applied": [11]})
            await lone.send_until(lambda: 14 in lone.announced, "14 announced", {"cacheId": "b", "position": 20})
            return first, lone.announced, await lone.batches()

    first, announced, rows = asyncio.run(scenario())
    assert sorted(first) == [10, 12] and announced[2:] == [11, 14], announced
    assert [(p, c) for p, c, _ in rows] == [([10, 12], ["a", "b"]), ([11], ["a", "b"]), ([14], ["a", "b"])], rows
    (a11, b11), = rows[1][2]
    (a14, b14), = rows[2][2]
    assert b11 < a11 and b11 == rows[0][2][1][1], rows  # 11: b's time is its receipt proving 12
    assert b14 > a14, rows


def test_a_receipt_that_outran_its_revocation_dates_it() -> None:
    """The projection's memory of a cache's receipts (pure, no servers): a revocation projected after receipts
    that covered it is dated from the first one that did, by proving its position or naming it in ``applied``."""
    def t(second: int) -> dt.datetime:
        return dt.datetime(2026, 1, 1, 0, 0, second, tzinfo=dt.timezone.utc)

    cache = HeardCache(heard=0.0)
    cache.prove(5, t(1))
    cache.prove(5, t(2))
    cache.named(9, t(2))
    cache.prove(12, t(3))
    cache.prove(10, t(4))  # a proven position never goes back
    cache.named(11, t(4))  # 11 was proven at t(3) already
    assert [cache.covered_at(p) for p in (3, 5, 9, 7, 11, 12)] == [t(1), t(1), t(2), t(3), t(3), t(3)]
    assert cache.covered_at(13) is None


def test_the_database_clock_is_carried_forward_from_when_it_was_asked_to_the_microsecond() -> None:
    """``DbClock`` (pure, on the service's event loop, uvloop): a reading of the database's clock is pinned to the
    moment its statement was sent and carried forward on the monotonic clock, to the microsecond; not on the
    loop's time (the code before), which counts whole milliseconds under uvloop: every receipt was dated a whole
    number of milliseconds after the reading."""
    read = dt.datetime(2026, 12, 7, 4, 0, 0, tzinfo=dt.timezone.utc)

    async def dated() -> tuple[dt.timedelta, list[dt.timedelta]]:
        clock = DbClock()
        clock.set(clock.now() - 0.75, read)  # read 750 ms ago
        first = clock.at(clock.now()) - read
        clock.set(clock.now(), read)
        later = []
        for _ in range(30):  # 30 receipts, 100 us of work apart
            started = time.monotonic()
            while time.monotonic() - started < 0.0001:
                pass
            later.append(clock.at(clock.now()) - read)
        return first, later

    first, later = uvloop.run(dated())
    assert dt.timedelta(milliseconds=750) <= first < dt.timedelta(milliseconds=850)
    assert later == sorted(later) and dt.timedelta(milliseconds=3) <= later[-1] < dt.timedelta(milliseconds=500)
    assert any(d.microseconds % 1000 for d in later), later


def test_a_revocation_that_reached_nats_reduced_is_still_followed() -> None:
    """An event too large for NATS travels in a reduced form (relay.py): a revocation's still names its position, key
    and time, so the receipts follow it (the code before skipped it, and its receipt, read from the log, would then
    claim it took effect at its commit with no cache listed). A rotation's reduced form has lost its grace: it counts
    as a revocation, conservatively; whole, a rotation with grace does not."""
    at = dt.datetime(2026, 12, 6, 1, 2, 3, 456789, tzinfo=dt.timezone.utc)

    def msg_and_head(event: Any, *, reduced: bool) -> tuple[Any, Any]:
        rec = RecordedEvent(id=str(uuid.uuid4()), stream_id="k" * 32, version=2, position=42, recorded_at=at,
                            metadata={"userAgent": "x" * 500}, event=event)
        payload = (encode_reduced_envelope if reduced else encode_envelope)(rec)
        return SimpleNamespace(data=payload), decode_envelope_head(payload)

    h, h2 = hash_key("a" * 64), hash_key("b" * 64)
    assert _revocation(*msg_and_head(ApiKeyRevoked(key_hash=h), reduced=True)) == (42, "k" * 32, "ApiKeyRevoked", at)
    graced = ApiKeyRotated(key_hash=h, previous_key_hash=h2, grace_until=at + dt.timedelta(hours=1))
    assert _revocation(*msg_and_head(graced, reduced=False)) is None
    assert _revocation(*msg_and_head(graced, reduced=True)) == (42, "k" * 32, "ApiKeyRotated", at)


def test_writing_and_reading_revocations_find_each_by_its_key_however_many_were_completed(
        db_factory: Any) -> None:
    """The partial index of pending revocations keeps an entry for every revocation ever written pending until a
    vacuum (completing one leaves its entry dead), and a bitmap scan of it visits them all: WRITE must not use it, or
    each write costs more than the one before; nor may it, or the read of a key's latest revocation, scan the whole
    table (in a table never analyzed, the planner once joined a batch to a sequential scan of it). After 5,000
    revocations were written pending and completed, writing 50 reads them by primary key, completes exactly those,
    and leaves the ones an earlier term completed alone (not returned)."""
    url = db_factory.create("receipts_write")

    def rows(lo: int, hi: int, *, done: bool) -> str:  # WRITE's parameter: positions lo..hi-1
        return json.dumps([{"position": p, "key_id": f"k{p}", "type": "ApiKeyRevoked",
                            "revoked_at": "2026-12-06T00:00:00Z", "caches": {"c": "2026-12-06T00:00:01Z" if done
                                                                                 else None},
                            "done": done, "everywhere": None} for p in range(lo, hi)])

    def plan(conn: psycopg.Connection[Any], statement: str, *literals: Any) -> str:
        for name in ("key", "types", "days"):
            statement = statement.replace(f"%({name})s", "%s")
        statement = statement.replace("%s", "{}")
        explain = sql.SQL("EXPLAIN (COSTS OFF) " + statement).format(*map(sql.Literal, literals))
        return "\n".join(r[0] for r in conn.execute(explain))

    with psycopg.connect(url, autocommit=True) as conn:
        for lo in range(1, 5001, 500):  # the life of a revocation a slow cache kept waiting: pending, then done
            assert len(conn.execute(WRITE, (rows(lo, lo + 500, done=False),)).fetchall()) == 500
            assert len(conn.execute(WRITE, (rows(lo, lo + 500, done=True),)).fetchall()) == 500
        p = plan(conn, WRITE, rows(5001, 5051, done=True))
        assert "revocations_pending_idx" not in p and "Seq Scan on revocations" not in p, p
        assert "Seq Scan on revocations" not in (p := plan(conn, LATEST, "k42", list(REVOKING), 30)), p
        assert len(conn.execute(WRITE, (rows(4990, 5051, done=True),)).fetchall()) == 50  # 4990-5000: done before
        count = "SELECT count(*) FILTER (WHERE effective_everywhere_at IS NULL), count(*) FROM revocations"
        assert conn.execute(count).fetchone() == (0, 5050)


def test_revocations_written_together_read_back_each_by_its_key_and_the_first_row_holding_one_counts(
        db_factory: Any) -> None:
    """A row of revocation_batches holds several revocations, each cache's time for each (microseconds since 1970):
    the receipt of each key reads its own, in effect everywhere at its last cache's time; the view ``receipts``
    shows the same, a row per revocation. Should one be written twice (a deposed leader's last write racing its
    successor's), the first row counts. However many rows there are, the read finds a key's through the index on
    their spans, never by reading them all."""
    url = db_factory.create("receipts_batches")
    t0 = dt.datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)

    def us(ms: int) -> int:
        return (t0 + dt.timedelta(milliseconds=ms) - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // \
            dt.timedelta(microseconds=1)

    def iso(ms: int) -> str:
        return (t0 + dt.timedelta(milliseconds=ms)).isoformat(timespec="microseconds").replace("+00:00", "Z")

    with psycopg.connect(url, autocommit=True) as conn:
        a, b = (conn.execute("INSERT INTO events (id, stream_id, version, type, data) VALUES (gen_random_uuid(), %s,"
                             " 1, 'ApiKeyRevoked', '{}') RETURNING position", (k,)).fetchone()[0] for k in ("ka", "kb"))
        conn.execute(BATCH, (a, b, [a, b], ["x", "y"], [[us(1), us(3)], [us(2), us(2)]]))
        conn.execute(BATCH, (b, b, [b], ["x", "y"], [[us(9), us(9)]]))  # b again, later

    async def receipts() -> list[dict[str, Any] | None]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return [await read_receipt(conn, k) for k in ("ka", "kb")]

    ra, rb = asyncio.run(receipts())
    assert ra is not None and rb is not None
    assert (ra["position"], ra["effectiveEverywhereAt"]) == (a, iso(3)), ra
    assert [(c["cacheId"], c["effectiveAt"], c["state"]) for c in ra["caches"]] == [("x", iso(1), "confirmed"),
                                                                                    ("y", iso(3), "confirmed")], ra
    assert (rb["position"], rb["effectiveEverywhereAt"]) == (b, iso(2)), rb
    assert [c["effectiveAt"] for c in rb["caches"]] == [iso(2), iso(2)], rb
    with psycopg.connect(url, autocommit=True) as conn:
        view = conn.execute("SELECT position, key_id, effective_everywhere_at, caches FROM receipts ORDER BY position"
                            ).fetchall()
        assert [(p, k, e) for p, k, e, _ in view] == [(a, "ka", t0 + dt.timedelta(milliseconds=3)),
                                                      (b, "kb", t0 + dt.timedelta(milliseconds=2))], view
        assert {c: at(v) for c, v in view[0][3].items()} == {"x": t0 + dt.timedelta(milliseconds=1),
                                                              "y": t0 + dt.timedelta(milliseconds=3)}, view
        # 2,000 more rows, 20 revocations each, as a busy deployment writes them; none analyzed.
        conn.execute("""INSERT INTO revocation_batches (span, positions, caches, effective_us)
                        SELECT int8range(n * 20, n * 20 + 19, '[]'), ARRAY(SELECT generate_series(n * 20, n * 20 + 19)),
                               '{x,y}', array_fill(0::bigint, ARRAY[20, 2])
                        FROM generate_series(1000, 2999) AS n""")
        statement = LATEST.replace("%(key)s", "{}").replace("%(types)s", "{}").replace("%(days)s", "{}")
        explain = sql.SQL("EXPLAIN (COSTS OFF) " + statement).format(*map(sql.Literal, ("kb", list(REVOKING), 30)))
        p = "\n".join(r[0] for r in conn.execute(explain))
        assert "revocation_batches_span_idx" in p and "Seq Scan on revocation_batches" not in p, p
