"""``keyledger replay``: rebuild aside and swap, while a real ``keyledger serve`` keeps answering."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import nats
import psycopg
import pytest
from psycopg import sql

from harness import Service, delete_streams, term_consumer_info, unique_topology, wait_until
from keyledger.core import records
from keyledger.ops import replay
from keyledger.storage import store
from keyledger.core.domain import CreateKey
from keyledger.storage.horizon import final_horizon
from keyledger.core.domain import fold
from keyledger.core.events import (ApiKeyCreated, ApiKeyDisabled, ApiKeyEnabled, ApiKeyExpired, ApiKeyRevoked,
                              ApiKeyRotated, ApiKeySecretRetired, ApiKeyUpdated, decode_data, encode_data)
from keyledger.core.records import ROW_COLUMNS, from_row, from_state



@pytest.fixture(scope="module")
def database_url(db_factory: Any) -> str:
    return db_factory.create("replay")


def projection_matches_log(url: str) -> None:
    """active_api_keys, column for column, and projection_tracking, equal a fold of the whole log."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT stream_id, version, type, recorded_at, data::text FROM events "
                            "ORDER BY stream_id, version").fetchall()
        projected = {r[-1]: from_row(r[:-1]) for r in conn.execute(f"SELECT {ROW_COLUMNS}, id FROM active_api_keys")}
        tracked = dict(conn.execute("SELECT stream_id, version FROM projection_tracking "
                                    "WHERE projection = 'active_api_keys'").fetchall())
    streams: dict[str, list[Any]] = {}
    for stream_id, version, event_type, at, data in rows:
        streams.setdefault(stream_id, []).append((version, at, decode_data(event_type, data)))
    expected = {}
    for key_id, events in streams.items():
        state = fold(events, key_id)
        if state and not state.revoked:
            expected[key_id] = from_state(state)
    assert projected == expected
    assert tracked == {k: e[-1][0] for k, e in streams.items()}


def subscriber_settled(service: Service) -> None:
    """Wait until every event is published and the NATS subscriber projection has consumed all of them, so
    it cannot rebuild rows behind the test's back afterwards (it only acts on messages it receives)."""

    async def settled() -> bool:
        nc = await nats.connect(service.nats_url, connect_timeout=2, max_reconnect_attempts=1)
        try:
            js = nc.jetstream(timeout=5)
            info = await term_consumer_info(js, service.topology, "active-api-keys")
            return info.num_pending == 0 and info.num_ack_pending == 0
        except Exception:
            return False
        finally:
            await nc.close()

    def outbox_empty() -> bool:
        with psycopg.connect(service.database_url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0

    wait_until(outbox_empty, timeout=30, what="the outbox drained")
    wait_until(lambda: asyncio.run(settled()), timeout=30, interval=0.1, what="the subscriber to catch up")


def test_replay_after_the_projection_was_wiped_makes_every_answer_right_again(service: Service) -> None:
    me = service.session()
    keys = [service.create_key(me, name=f"k{i}") for i in range(6)]
    service.post("api-key/update", me, json={"keyId": keys[1]["id"], "enabled": False})
    service.delete(me, keys[2]["id"])
    subscriber_settled(service)
    projection_matches_log(service.database_url)
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        # What the projection held (this test's five unrevoked keys, and whatever earlier tests left).
        rows_before = conn.execute("SELECT count(*) FROM active_api_keys").fetchone()[0]
        conn.execute("DELETE FROM active_api_keys")
        conn.execute("DELETE FROM projection_tracking")
    assert service.verify(keys[0]["key"])["valid"] is False  # broken, as expected

    report = replay.replay(service.database_url, progress=False)
    assert report.rows == rows_before and report.keys >= 6
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        mine = {r[0] for r in conn.execute("SELECT id FROM active_api_keys WHERE reference_id = %s",
                                           (me["x-test-user-id"],))}
    assert mine == {k["id"] for i, k in enumerate(keys) if i != 2}

    assert service.verify(keys[0]["key"])["valid"] is True
    assert service.verify(keys[1]["key"])["error"]["code"] == "KEY_DISABLED"
    assert service.verify(keys[2]["key"])["error"]["code"] == "INVALID_API_KEY"
    projection_matches_log(service.database_url)
    # The write path works on the swapped table: the inline projection is at the right version.
    assert service.delete(me, keys[3]["id"]).status_code == 200
    assert service.verify(keys[3]["key"])["valid"] is False
    assert service.post("api-key/update", me, json={"keyId": keys[1]["id"], "enabled": True}).status_code == 200
    assert service.verify(keys[1]["key"])["valid"] is True
    projection_matches_log(service.database_url)
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                            "WHERE indrelid = 'active_api_keys'::regclass")}
        leftovers = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'active_api_keys_re%'").fetchone()
    assert names == {"active_api_keys_pkey", "active_api_keys_key_hash_key", "active_api_keys_owner_idx",
                     "active_api_keys_expiry_idx"}
    assert leftovers == (0,)


def test_replay_while_serving_never_gives_a_wrong_answer(service: Service) -> None:
    me = service.session()
    stable = [service.create_key(me, name=f"stable{i}") for i in range(10)]
    errors: list[str] = []
    done = threading.Event()
    cycles = [0]
    log_lines: list[str] = []
    log_offset = len(service.log_path.read_text(errors="replace")) if service.log_path else 0

    def traffic() -> None:
        i = 0
        while not done.is_set():
            i += 1
            try:
                key = service.create_key(me, name=f"t{i}")
                if service.verify(key["key"])["valid"] is not True:
                    errors.append(f"fresh key {key['id']} not valid")
                deleted = service.delete(me, key["id"])
                if deleted.status_code != 200:
                    errors.append(f"delete of {key['id']} failed: {deleted.status_code} {deleted.text}")
                answer = service.verify(key["key"])
                if answer["valid"] is not False or answer["error"]["code"] != "INVALID_API_KEY":
                    with psycopg.connect(service.database_url, autocommit=True) as conn:
                        trail = conn.execute("SELECT position, version, type, xmin::text FROM events WHERE stream_id = %s "
                                             "ORDER BY version", (key["id"],)).fetchall()
                        tracked = conn.execute("SELECT version FROM projection_tracking WHERE stream_id = %s",
                                               (key["id"],)).fetchall()
                    errors.append(f"revoked key {key['id']} answered valid={answer['valid']}; log {trail}; "
                                  f"tracking {tracked}; replays {log_lines}")
                probe = stable[i % len(stable)]
                if service.verify(probe["key"])["valid"] is not True:
                    errors.append(f"stable key {probe['id']} not valid")
                cycles[0] += 1
            except Exception as exc:  # a 5xx or a timeout is a wrong answer too
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: cycles[0] > 0 or errors, timeout=30, what="the traffic to be under way")
        # At least 4 replays, and at least 40 traffic cycles overlapping them (however slow the machine).
        replays, deadline = 0, time.monotonic() + 120
        while replays < 4 or cycles[0] < 40:
            assert time.monotonic() < deadline, f"only {cycles[0]} cycles in 120 s"
            log_lines.append(replay.replay(service.database_url, progress=False).summary())
            replays += 1
        # and traffic after the last swap too
        after_last = cycles[0]
        wait_until(lambda: cycles[0] >= after_last + 2 or errors, timeout=30, what="traffic after the last replay")
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert replays >= 4 and cycles[0] >= 40
    logged = service.log_path.read_text(errors="replace")[log_offset:] if service.log_path else ""
    assert "DeadlockDetected" not in logged  # the swap gives way to writers; no writer is ever a deadlock's victim
    projection_matches_log(service.database_url)


def test_a_revoke_is_never_the_deadlock_victim_of_a_replays_swap(db_factory: Any, nats_url: str) -> None:
    """Deterministic: the revoke is stopped (by a row lock on the key's superseded secret) after it took its lock
    on superseded_key_secrets and before it asks for active_api_keys, while the replay tries to swap. With the
    database's deadlock_timeout at 100 ms, any cycle would be found by the revoke's own check and PostgreSQL
    could abort the revoke (the bug this reproduces: the swap used to lock active_api_keys first, then wait for
    superseded_key_secrets). The swap now locks in the writers' order and gives way within half the
    deadlock_timeout, so the revoke commits and the replay swaps after it."""
    url = db_factory.create("replay_deadlock")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '100ms'").format(
            sql.Identifier(conn.info.dbname)))
    topology = unique_topology("replaydl")
    service = Service(database_url=url, nats_url=nats_url, topology=topology).start()
    pause = psycopg.connect(url)
    block = psycopg.connect(url)
    outcome: dict[str, Any] = {}

    def run(name: str, call: Any) -> threading.Thread:
        def target() -> None:
            try:
                outcome[name] = call()
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome[name] = exc
        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def waiting(condition: str) -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                                     f"WHERE NOT l.granted AND {condition}").fetchone())

    threads = []
    try:
        me = service.session()
        key = service.create_key(me, name="revoked during a swap")
        rotated = service.post("api-key/rotate", me, json={"keyId": key["id"], "gracePeriodSeconds": 3600})
        assert rotated.status_code == 200, rotated.text  # the key now has a superseded secret's row

        # 1. The replay takes its first horizon, then waits (its tracking sync) behind a lock without an xid.
        pause.execute("LOCK TABLE projection_tracking IN SHARE MODE")
        threads.append(run("replay", lambda: replay.replay(url, progress=False)))
        wait_until(lambda: waiting("l.relation = 'projection_tracking'::regclass AND a.query NOT LIKE 'WITH%%'"),
                   timeout=60, what="the replay past its first horizon")
        # 2. The revoke takes superseded_key_secrets and stops on the row of the key's superseded secret.
        block.execute("SELECT 1 FROM superseded_key_secrets WHERE key_id = %s FOR UPDATE", (key["id"],))
        threads.append(run("revoke", lambda: service.delete(me, key["id"])))
        wait_until(lambda: waiting("a.query LIKE '%%INSERT INTO events%%'"), timeout=30,
                   what="the revoke stopped inside its append")
        # 3. The swap waits for superseded_key_secrets (and gives way, again and again, while the revoke is held).
        pause.rollback()
        wait_until(lambda: waiting("a.query LIKE 'LOCK TABLE %%' AND l.relation = 'superseded_key_secrets'::regclass"),
                   timeout=60, interval=0.005, what="the swap waiting for superseded_key_secrets")
        time.sleep(0.3)  # past the revoke's deadlock check, had there been a cycle
        # 4. The revoke goes on: it asks for active_api_keys, which no swap holds.
        block.rollback()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not isinstance(outcome["replay"], Exception), outcome["replay"]
        revoke = outcome["revoke"]
        assert not isinstance(revoke, Exception), revoke
        assert revoke.status_code == 200, f"delete answered {revoke.status_code} {revoke.text} during the swap"
        assert service.verify(key["key"])["valid"] is False
        projection_matches_log(url)
    finally:
        pause.close()
        block.close()
        for thread in threads:
            thread.join(60)
        service.stop()
        asyncio.run(delete_streams(nats_url, topology))


def test_replay_leaves_other_tables_alone(service: Service) -> None:
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS usage_counters (key_id text PRIMARY KEY, requests bigint)")
        conn.execute("INSERT INTO usage_counters VALUES ('k', 42) ON CONFLICT DO NOTHING")
        conn.execute("INSERT INTO projection_tracking VALUES ('other_projection', 'k', 7) ON CONFLICT DO NOTHING")
    replay.replay(service.database_url, progress=False)
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT requests FROM usage_counters").fetchone() == (42,)
        assert conn.execute("SELECT version FROM projection_tracking WHERE projection = 'other_projection'"
                            ).fetchone() == (7,)


def test_replay_leaves_the_usage_counters_alone(service: Service) -> None:
    """``api_key_usage`` holds what verify counted (remaining uses, the rate-limit window, lastRequest). It is
    not a projection of the log: a replay must neither reset nor lose it, and verify keeps counting from where it
    was (the count restarts only when an event sets ``remaining`` again, and a replay sets nothing)."""
    owner = service.session()["x-test-user-id"]

    async def create(**limits: Any) -> tuple[str, str]:
        key, key_id = records.new_key(None), records.new_key_id()
        async with await psycopg.AsyncConnection.connect(service.database_url, autocommit=True) as conn:
            await store.execute(conn, CreateKey(actor_id=owner, now=dt.datetime.now(dt.timezone.utc), key_id=key_id,
                                                key_hash=records.hash_key(key), start=key[:6], **limits),
                                key_id, {"userId": owner})
        return key_id, key

    limited_id, limited = asyncio.run(create(remaining=5, rate_limit_enabled=True, rate_limit_max=100,
                                             rate_limit_time_window=3_600_000))
    plain_id, plain = asyncio.run(create())
    assert [service.verify(limited)["key"]["remaining"] for _ in range(3)] == [4, 3, 2]
    assert service.verify(plain)["valid"] is True

    def usage() -> dict[str, tuple[Any, ...]]:
        with psycopg.connect(service.database_url, autocommit=True) as conn:
            return {r[0]: tuple(r[1:]) for r in conn.execute(
                "SELECT key_id, remaining, remaining_from, last_refill_at, request_count, last_request "
                "FROM api_key_usage WHERE key_id IN (%s, %s)", (limited_id, plain_id))}

    # The plain key's lastRequest is written by the next flush (within KEYLEDGER_LAST_REQUEST_FLUSH_S).
    before = wait_until(lambda: (u := usage()) and len(u) == 2 and u[plain_id][4] is not None and u, timeout=30,
                        what="both counter rows written")
    assert before[limited_id][0] == 2 and before[limited_id][3] == 3

    with psycopg.connect(service.database_url, autocommit=True) as conn:  # the projection wiped, then rebuilt
        conn.execute("DELETE FROM active_api_keys WHERE id IN (%s, %s)", (limited_id, plain_id))
    replay.replay(service.database_url, progress=False)
    assert usage() == before
    # Verify counts on from where it was: 2 left before the replay, 1 after this use.
    answer = service.verify(limited)
    assert answer["valid"] is True and answer["key"]["remaining"] == 1 and answer["key"]["requestCount"] == 4
    assert service.verify(plain)["valid"] is True


def test_unknown_projection_is_refused() -> None:
    with pytest.raises(ValueError):
        replay.replay("dbname=unused", "nope")


def test_horizon_never_passes_a_writer_holding_the_newest_xid(db_factory: Any) -> None:
    """The cause of revoked keys coming back after a replay: a writer whose xid is the newest one assigned is
    not in a snapshot's xip list (xids >= xmax are left out), so the horizon used to cover its uncommitted event,
    the bulk read missed it, and the swap's tail (positions > horizon) never looked at it again."""
    url = db_factory.create("horizon")
    with psycopg.connect(url, autocommit=True) as reader, psycopg.connect(url) as writer:
        for _ in range(5):  # without the fix this failed whenever no later xid completed in between
            position = writer.execute(
                "INSERT INTO events (id, stream_id, version, type, data) VALUES (gen_random_uuid(), "
                "gen_random_uuid()::text, 1, 'ApiKeyRevoked', '{}') RETURNING position").fetchone()[0]
            horizon = final_horizon(reader, max_wait=0.2)
            assert horizon is None or horizon < position
            writer.commit()
            assert final_horizon(reader, max_wait=2.0) >= position


def test_replayed_rows_equal_what_the_sql_projection_wrote(db_factory: Any) -> None:
    """The set-based fold (replay) and keyledger_project_active_key (the write path) give identical rows in
    both tables, every column, server-only fields, ``expired`` and rotations' superseded secrets included."""
    url = db_factory.create("equal")
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    later = at + dt.timedelta(days=1)
    streams = {
        "a": [ApiKeyCreated(key_hash="ha", reference_id="u", name="a", expires_at=later, remaining=5,
                            permissions={"files": ["read"]}),
              ApiKeyUpdated(key_hash="ha", remaining=3, refill_amount=2, refill_interval=60_000, rate_limit_max=7,
                            rate_limit_enabled=True, permissions={"files": ["read", "write"]}, metadata={"m": 1}),
              ApiKeyExpired(key_hash="ha", expires_at=later)],
        "b": [ApiKeyCreated(key_hash="hb", reference_id="u", expires_at=later),
              ApiKeyExpired(key_hash="hb", expires_at=later),
              ApiKeyUpdated(key_hash="hb", expires_at=None, name="renewed"),
              ApiKeyDisabled(key_hash="hb")],
        "c": [ApiKeyCreated(key_hash="hc", reference_id="u"), ApiKeyRevoked(key_hash="hc")],
        # Two updates setting different fields, then an older field set again: each field is its last setter's.
        "d": [ApiKeyCreated(key_hash="hd", reference_id="u", name="d0", remaining=9, enabled=False),
              ApiKeyUpdated(key_hash="hd", name="d1", rate_limit_max=3),
              ApiKeyEnabled(key_hash="hd"),
              ApiKeyUpdated(key_hash="hd", metadata={"x": [1, 2.50, "é"]}, rate_limit_enabled=True),
              ApiKeyExpired(key_hash="hd", expires_at=later),
              ApiKeyUpdated(key_hash="hd", name=None, remaining=1)],
        # Rotations: the row takes the last secret; superseded secrets stay while in grace, unless retired.
        "e": [ApiKeyCreated(key_hash="he", reference_id="u", start="he"),
              ApiKeyRotated(key_hash="he2", previous_key_hash="he", start="he2", grace_until=later),
              ApiKeyRotated(key_hash="he3", previous_key_hash="he2", start="he3", grace_until=None),
              ApiKeyRotated(key_hash="he4", previous_key_hash="he3", start=None, grace_until=later)],
        "f": [ApiKeyCreated(key_hash="hf", reference_id="u"),
              ApiKeyRotated(key_hash="hf2", previous_key_hash="hf", start="hf2", grace_until=later),
              ApiKeySecretRetired(key_hash="hf", grace_until=later),
              ApiKeyRotated(key_hash="hf3", previous_key_hash="hf2", start="hf3", grace_until=later),
              ApiKeyDisabled(key_hash="hf3")],
        "g": [ApiKeyCreated(key_hash="hg", reference_id="u"),
              ApiKeyRotated(key_hash="hg2", previous_key_hash="hg", start="hg2", grace_until=later),
              ApiKeyRevoked(key_hash="hg2")],
    }
    with psycopg.connect(url, autocommit=True) as conn:
        for key_id, events in streams.items():
            for version, event in enumerate(events, start=1):
                conn.execute(APPEND_ONE, (key_id, version, type(event).__name__, encode_data(event).decode(),
                                          at + dt.timedelta(minutes=version)))
        projected = conn.execute("SELECT * FROM active_api_keys ORDER BY id").fetchall()
        assert [r[0] for r in projected] == ["a", "b", "d", "e", "f"]
        superseded = conn.execute("SELECT * FROM superseded_key_secrets ORDER BY key_hash").fetchall()
        assert [r[0] for r in superseded] == ["he", "he3", "hf2"]
        # Wipe both tables first: the replay must rebuild them, not keep them.
        conn.execute("DELETE FROM active_api_keys")
        conn.execute("DELETE FROM superseded_key_secrets")
        report = replay.replay(url, progress=False)
        assert (report.rows, report.secrets) == (5, 3)
        assert conn.execute("SELECT * FROM active_api_keys ORDER BY id").fetchall() == projected
        assert conn.execute("SELECT * FROM superseded_key_secrets ORDER BY key_hash").fetchall() == superseded

        # Tracking: a row left behind is raised, a missing one added, a stray one (a key the log does not know)
        # dropped; every key ends at its last version, revoked keys included.
        conn.execute("UPDATE projection_tracking SET version = 1 WHERE stream_id = 'd'")
        conn.execute("DELETE FROM projection_tracking WHERE stream_id = 'e'")
        conn.execute("INSERT INTO projection_tracking VALUES ('active_api_keys', 'stray', 4)")
        replay.replay(url, progress=False)
        tracked = dict(conn.execute("SELECT stream_id, version FROM projection_tracking "
                                    "WHERE projection = 'active_api_keys'").fetchall())
        assert tracked == {key_id: len(events) for key_id, events in streams.items()}
        assert conn.execute("SELECT * FROM active_api_keys ORDER BY id").fetchall() == projected


APPEND_ONE = """
WITH e AS (INSERT INTO events (id, stream_id, version, type, data, recorded_at)
           VALUES (gen_random_uuid(), %s, %s, %s, %s::jsonb, %s) RETURNING *)
SELECT keyledger_project_active_key(stream_id, version, type, data, recorded_at) FROM e
"""
