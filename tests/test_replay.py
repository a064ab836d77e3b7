"""``keyledger replay``: rebuild aside and swap, while a real ``keyledger serve`` keeps answering."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import psycopg
import pytest

from harness import Service
from keyledger import replay
from keyledger.horizon import final_horizon
from keyledger.domain import fold
from keyledger.events import (ApiKeyCreated, ApiKeyDisabled, ApiKeyEnabled, ApiKeyExpired, ApiKeyRevoked,
                              ApiKeyRotated, ApiKeySecretRetired, ApiKeyUpdated, decode_data, encode_data)
from keyledger.records import ROW_COLUMNS, from_row, from_state



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


def test_replay_after_the_projection_was_wiped_makes_every_answer_right_again(service: Service) -> None:
    me = service.session()
    keys = [service.create_key(me, name=f"k{i}") for i in range(6)]
    service.post("api-key/update", me, json={"keyId": keys[1]["id"], "enabled": False})
    service.delete(me, keys[2]["id"])
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM active_api_keys")
        conn.execute("DELETE FROM projection_tracking")
    assert service.verify(keys[0]["key"])["valid"] is False  # broken, as expected

    report = replay.replay(service.database_url, progress=False)
    assert report.rows == 5 and report.keys >= 6

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

    def traffic() -> None:
        i = 0
        while not done.is_set():
            i += 1
            try:
                key = service.create_key(me, name=f"t{i}")
                if service.verify(key["key"])["valid"] is not True:
                    errors.append(f"fresh key {key['id']} not valid")
                if service.delete(me, key["id"]).status_code != 200:
                    errors.append(f"delete of {key['id']} failed")
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
        time.sleep(0.3)
        replays, deadline = 0, time.monotonic() + 30
        while replays < 4 or (cycles[0] < 40 and time.monotonic() < deadline):
            log_lines.append(replay.replay(service.database_url, progress=False).summary())
            replays += 1
    finally:
        time.sleep(0.3)
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert cycles[0] > 10
    projection_matches_log(service.database_url)


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
