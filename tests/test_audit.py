"""The audit chain, verify, export and as-of, on real PostgreSQL (and real NATS for the head anchor)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import secrets
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import ROOT, unique_topology, wait_until
from keyledger.ops import audit
from keyledger.storage import store
from keyledger.core.domain import CreateKey, DomainError, RevokeKey, RotateKey, UpdateKey, fold
from keyledger.core.events import ApiKeyImported, decode_data
from keyledger.core.records import ROW_COLUMNS, hash_key

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def with_audit(url: str) -> str:
    return url  # the chain is part of schema.sql


@pytest.fixture(scope="module")
def database_url(db_factory: Any) -> str:
    """The module database (used by the `service` fixture)."""
    return with_audit(db_factory.create("audit"))


@pytest.fixture
def fresh_db(db_factory: Any) -> str:
    return with_audit(db_factory.create("audit_fn"))


# ---------------------------------------------------------------------------------------------------------
# Writing events through the real write path
# ---------------------------------------------------------------------------------------------------------
async def _run(url: str, commands: list[tuple[Any, str]]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for command, key_id in commands:
            try:
                await store.execute(conn, command, key_id, {"userId": command.actor_id})
            except DomainError:
                pass  # a command the domain refuses (revoked key...) records nothing


def append(url: str, commands: list[tuple[Any, str]]) -> None:
    asyncio.run(_run(url, commands))


def create(key_id: str, at: dt.datetime, owner: str = "owner-1", **extra: Any) -> tuple[Any, str]:
    return CreateKey(actor_id=owner, now=at, key_id=key_id, key_hash=hashlib.sha256(key_id.encode()).hexdigest(),
                     start=key_id[:6], **extra), key_id


def some_events(url: str, n_keys: int = 4) -> list[str]:
    keys = [secrets.token_hex(16) for _ in range(n_keys)]
    cmds: list[tuple[Any, str]] = []
    for i, k in enumerate(keys):
        at = T0 + dt.timedelta(minutes=i)
        cmds.append(create(k, at, name=f"k{i}", metadata={"team": "ops", "note": 'quote " back\\slash é'}))
        cmds.append((UpdateKey(actor_id="owner-1", now=at + dt.timedelta(seconds=1), key_id=k, enabled=False), k))
    cmds.append((RevokeKey(actor_id="owner-1", now=T0 + dt.timedelta(hours=1), key_id=keys[0]), keys[0]))
    append(url, cmds)
    return keys


def seal(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        assert audit.try_lead(conn)
        return audit.seal(conn, max_wait=2.0)


def verify(url: str, anchor: tuple[int, str] | None = None) -> audit.Verdict:
    with psycopg.connect(url, autocommit=True) as conn:
        return audit.verify(conn, anchor)


def export_lines(url: str, **filters: Any) -> list[bytes]:
    with psycopg.connect(url, autocommit=True) as conn:
        return list(audit.export(conn, **filters))


def superuser(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
    conn.execute("ALTER TABLE event_chain DISABLE TRIGGER USER")
    return conn


def keyledger_command() -> list[str]:
    """The installed ``keyledger`` entry point (the console script beside this interpreter), as a user runs it;
    ``python -m keyledger.cli`` (the same ``main``) where the script is not installed."""
    script = Path(sys.executable).with_name("keyledger")
    return [str(script)] if script.exists() else [sys.executable, "-m", "keyledger.cli"]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``keyledger <args>`` in a subprocess against ``url`` (audit and replay need no NATS)."""
    env = {"DATABASE_URL": url, "NATS_URL": "nats://unused:4222", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*keyledger_command(), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def cli_bytes(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"DATABASE_URL": url, "NATS_URL": "nats://unused:4222", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*keyledger_command(), *args], capture_output=True, env=env, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# Chain, verify, export
# ---------------------------------------------------------------------------------------------------------
def test_sealed_chain_verifies_and_an_export_is_checkable_without_keyledger(fresh_db: str) -> None:
    keys = some_events(fresh_db)
    assert seal(fresh_db) == 9
    verdict = verify(fresh_db)
    assert verdict.ok and verdict.checked == 9 and verdict.unsealed == 0, verdict.summary()

    lines = export_lines(fresh_db)
    assert len(lines) == 9 and all(line.endswith(b"\n") for line in lines)
    # The auditor's recipe from docs/audit.md, with nothing but hashlib and json.
    prev = "0" * 64
    for line in lines:
        line = line.rstrip(b"\n")
        body, _, _ = line.partition(b',"prevHash":')
        record = json.loads(line)
        assert record["prevHash"] == prev
        assert hashlib.sha256(prev.encode() + body + b"}").hexdigest() == record["hash"]
        prev = record["hash"]
        assert set(record) == {"id", "type", "keyId", "version", "position", "occurredAt", "actor", "data",
                               "prevHash", "hash"}
    assert audit.verify_export(lines) == (9, None)
    head = verdict.head
    assert head is not None and head[1] == prev
    # The export is the envelope: same fields and values as the NATS envelope, data from the log.
    first = json.loads(lines[0])
    assert first["type"] == "ApiKeyCreated" and first["keyId"] == keys[0] and first["version"] == 1
    assert first["data"]["metadata"]["note"] == 'quote " back\\slash é'
    assert first["occurredAt"] == "2026-03-01T12:00:00.000000Z"

    # Filters: --key, --since inclusive, --until exclusive.
    assert [json.loads(x)["keyId"] for x in export_lines(fresh_db, key_id=keys[1])] == [keys[1], keys[1]]
    since = export_lines(fresh_db, since=T0 + dt.timedelta(minutes=1), until=T0 + dt.timedelta(minutes=2))
    assert [json.loads(x)["keyId"] for x in since] == [keys[1], keys[1]]


def test_unsealed_events_are_reported_not_failed_and_cli_exit_codes(fresh_db: str) -> None:
    some_events(fresh_db, 2)
    seal(fresh_db)
    some_events(fresh_db, 1)  # 3 more events (create, disable, revoke), not sealed yet
    verdict = verify(fresh_db)
    assert verdict.ok and verdict.unsealed == 3
    tail = export_lines(fresh_db)[-1]
    assert tail.endswith(b',"prevHash":null,"hash":null}\n')

    ok = cli(fresh_db, "audit", "verify")
    assert ok.returncode == 0 and "OK" in ok.stdout and len(ok.stdout.splitlines()) == 1
    head = cli(fresh_db, "audit", "head")
    assert head.returncode == 0
    position, digest = audit.parse_anchor(head.stdout.strip())
    assert cli(fresh_db, "audit", "verify", "--head", f"{position}:{digest}").returncode == 0
    sealed = cli(fresh_db, "audit", "verify", "--seal")
    assert sealed.returncode == 0 and "0 not sealed" in sealed.stdout


def _positions(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT position FROM events ORDER BY position")]


def test_altered_event_is_caught_even_with_triggers_disabled(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    victim = _positions(fresh_db)[4]
    with superuser(fresh_db) as conn:
        conn.execute("UPDATE events SET data = jsonb_set(data, '{name}', '\"evil\"') WHERE position = %s", (victim,))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == victim and "hash mismatch" in verdict.problem
    result = cli(fresh_db, "audit", "verify")
    assert result.returncode == 1 and f"position {victim}" in result.stderr


@pytest.mark.parametrize("column", ["recorded_at", "metadata", "type", "stream_id"])
def test_any_column_change_is_caught(fresh_db: str, column: str) -> None:
    some_events(fresh_db, 2)
    seal(fresh_db)
    victim = _positions(fresh_db)[1]
    change = {
        "recorded_at": "recorded_at = recorded_at + interval '1 microsecond'",
        "metadata": "metadata = metadata || '{\"ipAddress\": \"10.6.6.6\"}'",
        "type": "type = 'ApiKeyEnabled'",
        "stream_id": "stream_id = stream_id || 'x'",
    }[column]
    with superuser(fresh_db) as conn:
        conn.execute(f"UPDATE events SET {change} WHERE position = %s", (victim,))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == victim


def test_deleted_event_is_caught(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    victim = _positions(fresh_db)[3]
    with superuser(fresh_db) as conn:
        conn.execute("DELETE FROM events WHERE position = %s", (victim,))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == victim and "without event" in verdict.problem


def test_deleted_event_and_its_chain_row_is_caught_by_the_next_link(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    positions = _positions(fresh_db)
    with superuser(fresh_db) as conn:
        conn.execute("DELETE FROM events WHERE position = %s", (positions[3],))
        conn.execute("DELETE FROM event_chain WHERE position = %s", (positions[3],))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == positions[4] and "link" in verdict.problem


def test_event_inserted_out_of_band_below_the_head_is_caught(fresh_db: str) -> None:
    some_events(fresh_db, 2)
    # A rolled-back insert leaves a gap position that the sealer skips for good.
    with psycopg.connect(fresh_db) as conn:
        conn.execute("INSERT INTO events (id, stream_id, version, type, data) VALUES (%s, 'gap', 1, 'ApiKeyRevoked', "
                     "'{\"keyHash\": \"x\"}')", (str(uuid.uuid4()),))
        gap = conn.execute("SELECT max(position) FROM events").fetchone()[0]
        conn.rollback()
    some_events(fresh_db, 1)
    seal(fresh_db)
    assert verify(fresh_db).ok
    with superuser(fresh_db) as conn:
        conn.execute("INSERT INTO events (position, id, stream_id, version, type, data) "
                     "VALUES (%s, %s, 'forged', 1, 'ApiKeyRevoked', '{\"keyHash\": \"x\"}')", (gap, str(uuid.uuid4())))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == gap and "inserted out of band" in verdict.problem


def test_rows_swapped_are_caught(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    positions = _positions(fresh_db)
    a, b = positions[2], positions[6]
    with superuser(fresh_db) as conn:
        # Swap every column but the position between the two rows (ids are unique: go through a temp id).
        conn.execute("CREATE TEMP TABLE swap AS SELECT * FROM events WHERE position IN (%s, %s)", (a, b))
        conn.execute("UPDATE events SET id = gen_random_uuid() WHERE position IN (%s, %s)", (a, b))
        conn.execute("UPDATE events SET stream_id = 'tmp-' || position, version = 1000 + position "
                     "WHERE position IN (%s, %s)", (a, b))
        conn.execute(
            "UPDATE events e SET id = s.id, stream_id = s.stream_id, version = s.version, type = s.type, "
            "data = s.data, metadata = s.metadata, recorded_at = s.recorded_at "
            "FROM swap s WHERE s.position = CASE e.position WHEN %s THEN %s ELSE %s END AND e.position IN (%s, %s)",
            (a, b, a, a, b))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == a


def test_altered_chain_row_is_caught(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    victim = _positions(fresh_db)[5]
    with superuser(fresh_db) as conn:
        conn.execute("UPDATE event_chain SET hash = repeat('a', 64) WHERE position = %s", (victim,))
    verdict = verify(fresh_db)
    assert not verdict.ok and verdict.position == victim


def test_truncated_tail_and_recomputed_chain_are_caught_by_the_published_head(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    anchor = verify(fresh_db).head
    assert anchor is not None
    positions = _positions(fresh_db)
    # 1. Truncate the tail, chain rows included: internally consistent, but the anchor is gone.
    with superuser(fresh_db) as conn:
        conn.execute("DELETE FROM events WHERE position >= %s", (positions[-2],))
        conn.execute("DELETE FROM event_chain WHERE position >= %s", (positions[-2],))
    assert verify(fresh_db).ok
    verdict = verify(fresh_db, anchor)
    assert not verdict.ok and verdict.position == anchor[0]
    result = cli(fresh_db, "audit", "verify", "--head", f"{anchor[0]}:{anchor[1]}")
    assert result.returncode == 1 and f"position {anchor[0]}" in result.stderr


def test_rewritten_log_with_recomputed_chain_is_caught_by_the_anchor(fresh_db: str) -> None:
    some_events(fresh_db)
    seal(fresh_db)
    anchor = verify(fresh_db).head
    with superuser(fresh_db) as conn:
        conn.execute("UPDATE events SET data = jsonb_set(data, '{name}', '\"evil\"') WHERE type = 'ApiKeyCreated'")
        conn.execute("DELETE FROM event_chain")
    seal(fresh_db)  # a full re-seal by someone with write access
    assert verify(fresh_db).ok
    assert not verify(fresh_db, anchor).ok
    assert audit.verify_export(export_lines(fresh_db), anchor)[1] == "hash differs from the anchor"


def test_sealer_waits_for_a_lower_position_that_commits_late(fresh_db: str) -> None:
    some_events(fresh_db, 1)
    seal(fresh_db)
    slow = psycopg.connect(fresh_db)
    try:
        slow.execute("INSERT INTO events (id, stream_id, version, type, data) VALUES (%s, 'late', 1, "
                     "'ApiKeyRevoked', '{\"keyHash\": \"x\"}')", (str(uuid.uuid4()),))
        low = slow.execute("SELECT max(position) FROM events").fetchone()[0]
        some_events(fresh_db, 1)  # higher positions, committed first
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            assert audit.seal(conn, max_wait=0.2) == 0  # the horizon is not final while `slow` runs
        slow.commit()
    finally:
        slow.close()
    assert seal(fresh_db) == 4  # the late one and the three that committed before it
    verdict = verify(fresh_db)
    assert verdict.ok and verdict.checked == 7
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        chained = [r[0] for r in conn.execute("SELECT position FROM event_chain ORDER BY position")]
    assert low in chained and chained == sorted(_positions(fresh_db))


def test_chain_is_append_only_for_the_owner(fresh_db: str) -> None:
    some_events(fresh_db, 1)
    seal(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for statement in ("UPDATE event_chain SET hash = 'x'", "DELETE FROM event_chain", "TRUNCATE event_chain"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_sealer_task_publishes_the_head_on_nats(fresh_db: str, nats_url: str) -> None:
    import nats

    from keyledger.background.bus import Bus

    some_events(fresh_db, 2)
    topology = unique_topology("audithead")

    async def scenario() -> audit.HeadMessage:
        nc = await nats.connect(nats_url)
        sub = await nc.subscribe(audit.head_subject(topology.prefix))
        bus = Bus(nats_url, topology)
        bus.start()
        sealer = audit.AuditSealer(fresh_db, bus, interval=0.05, head_every=0.2)
        task = asyncio.create_task(sealer.run())
        try:
            msg = await sub.next_msg(timeout=10)
            return msgspec.json.decode(msg.data, type=audit.HeadMessage)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await bus.close()
            await nc.close()
            js_streams = Bus(nats_url, topology)  # the Bus created streams; remove them
            from harness import delete_streams
            await delete_streams(nats_url, topology)
            del js_streams

    head = asyncio.run(scenario())
    assert head.position > 0
    assert verify(fresh_db, audit.parse_anchor(head.anchor)).ok


# ---------------------------------------------------------------------------------------------------------
# As-of and the projection, against a reference fold (property-based)
# ---------------------------------------------------------------------------------------------------------
def reference_as_of(rows: list[tuple[Any, ...]], at: dt.datetime) -> dict[str, tuple[Any, ...]]:
    """key id -> (start, deadlines of the superseded secrets still in grace), for the keys active at ``at``."""
    streams: dict[str, list[tuple[int, dt.datetime, Any]]] = {}
    for stream_id, version, event_type, recorded_at, data in rows:
        if recorded_at <= at:
            streams.setdefault(stream_id, []).append((version, recorded_at, decode_data(event_type, data)))
    active = {}
    for key_id, events in streams.items():
        state = fold(sorted(events, key=lambda e: e[0]), key_id)
        if state and not state.revoked and state.enabled and (state.expires_at is None or state.expires_at > at):
            active[key_id] = (state.start, sorted(until for _, until in state.superseded if until > at))
    return active


def _as_of_answer(keys: list[Any]) -> dict[str, tuple[Any, ...]]:
    return {k.key_id: (k.start, [g.grace_until for g in k.superseded]) for k in keys}


command_kinds = st.sampled_from(["disable", "enable", "rename", "expire", "unexpire", "revoke", "rotate",
                                 "rotate_with_grace"])
scenarios = st.lists(st.tuples(st.integers(0, 3), command_kinds, st.integers(1, 3 * 86400)), min_size=1,
                     max_size=25)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=scenarios, n_keys=st.integers(1, 4))
def test_as_of_and_projection_equal_a_fold_of_the_log(db_factory: Any, script: list[Any], n_keys: int) -> None:
    url = with_audit(db_factory.create("audit_prop"))
    try:
        keys = [secrets.token_hex(8) for _ in range(n_keys)]
        at = T0
        cmds: list[tuple[Any, str]] = []
        for i, k in enumerate(keys):
            cmds.append(create(k, at + dt.timedelta(seconds=i), expires_in=86400 if i % 2 else None))
        at += dt.timedelta(seconds=n_keys)
        for which, kind, gap in script:
            at += dt.timedelta(seconds=gap)
            k = keys[which % n_keys]
            change: dict[str, Any] = {
                "disable": {"enabled": False}, "enable": {"enabled": True}, "rename": {"name": f"n{gap}"},
                "expire": {"expires_in": 86400}, "unexpire": {"expires_in": None},
            }.get(kind, {})
            if kind == "revoke":
                command: Any = RevokeKey(actor_id="owner-1", now=at, key_id=k)
            elif kind.startswith("rotate"):
                secret = secrets.token_urlsafe(32)
                command = RotateKey(actor_id="owner-1", now=at, key_id=k, key_hash=hash_key(secret), start=secret[:6],
                                    grace_seconds=gap if kind == "rotate_with_grace" else 0)
            else:
                command = UpdateKey(actor_id="owner-1", now=at, key_id=k, **change)
            cmds.append((command, k))
        append(url, cmds)
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute("SELECT stream_id, version, type, recorded_at, data::text FROM events "
                                "ORDER BY position").fetchall()
            instants = sorted({r[3] for r in rows})
            probes = set(instants) | {t - dt.timedelta(microseconds=1) for t in instants}
            probes |= {t + dt.timedelta(days=1, seconds=1) for t in instants}
            for probe in sorted(probes):
                assert _as_of_answer(audit.as_of(conn, probe)) == reference_as_of(rows, probe), probe
            # The projection equals the fold of the whole log, column for column.
            projected = {r[-1]: r for r in conn.execute(f"SELECT {ROW_COLUMNS}, id FROM active_api_keys")}
        from keyledger.core.records import from_row, from_state

        expected = {}
        for key_id in keys:
            events = [(v, t, decode_data(ty, d)) for s, v, ty, t, d in rows if s == key_id]
            state = fold(events, key_id)
            if state and not state.revoked:
                expected[key_id] = from_state(state)
        assert {k: from_row(r[:-1]) for k, r in projected.items()} == expected
    finally:
        db_factory.drop(url)


def test_as_of_cli_json_and_naive_instants_are_utc(fresh_db: str) -> None:
    keys = some_events(fresh_db, 2)  # both disabled a second after creation; key 0 revoked at T0+1h
    result = cli(fresh_db, "audit", "as-of", "2026-03-01T12:00:00.5", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [x["keyId"] for x in lines] == [keys[0]]
    assert {"keyId", "referenceId", "name", "start"} <= set(lines[0])
    assert lines[0]["referenceId"] == "owner-1" and lines[0]["name"] == "k0" and lines[0]["start"] == keys[0][:6]
    # The same instant written in another zone.
    again = cli(fresh_db, "audit", "as-of", "2026-03-01T13:00:00.5+01:00", "--json")
    assert again.stdout == result.stdout
    assert cli(fresh_db, "audit", "as-of", "2026-03-01T11:59:59", "--json").stdout == ""


def test_as_of_lists_imported_keys_and_secrets_inside_their_rotation_grace(fresh_db: str) -> None:
    rotated, imported = secrets.token_hex(16), secrets.token_hex(16)
    new_secret = secrets.token_urlsafe(32)
    append(fresh_db, [
        create(rotated, T0),
        (RotateKey(actor_id="owner-1", now=T0 + dt.timedelta(seconds=10), key_id=rotated,
                   key_hash=hash_key(new_secret), start=new_secret[:6], grace_seconds=3600), rotated),
    ])
    original = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)

    async def import_one() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn:
            event = ApiKeyImported(key_hash="i" * 43, reference_id="owner-2", start="imprtd", created_at=original)
            await store.append(conn, imported, 0, [event], {"via": "import"}, T0)

    asyncio.run(import_one())
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        during = {k.key_id: k for k in audit.as_of(conn, T0 + dt.timedelta(minutes=1))}
        after = audit.as_of(conn, T0 + dt.timedelta(hours=2))
    assert set(during) == {rotated, imported}
    assert during[imported].created_at == original and during[imported].start == "imprtd"
    key = during[rotated]
    assert key.start == new_secret[:6]
    assert [(g.start, g.grace_until) for g in key.superseded] == [(rotated[:6], T0 + dt.timedelta(seconds=3610))]
    line = json.loads(msgspec.json.encode(key))
    assert line["superseded"] == [{"start": rotated[:6], "graceUntil": "2026-03-01T13:00:10Z"}]
    assert {k.key_id: k.superseded for k in after} == {rotated: [], imported: []}
    assert "superseded" not in json.loads(msgspec.json.encode(after[0]))  # omitted when empty


# ---------------------------------------------------------------------------------------------------------
# Export in bounded memory
# ---------------------------------------------------------------------------------------------------------
def test_export_of_200k_events_streams_in_bounded_memory(fresh_db: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import audit_bench

    audit_bench.seed(fresh_db, 200_000)
    seal(fresh_db)
    probe = (
        "import resource, sys, psycopg\n"
        "from keyledger.ops import audit\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = 0; size = 0\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as conn:\n"
        "    for line in audit.export(conn):\n"
        "        n += 1; size += len(line)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(n, size, (peak - base) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, fresh_db], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n, size, growth_mb = map(int, out.stdout.split())
    assert n == 200_000 and size > 100 * 1024 * 1024  # > 100 MB exported...
    assert growth_mb < 50, f"export grew RSS by {growth_mb} MB"  # ...in a few MB


# ---------------------------------------------------------------------------------------------------------
# Verify and export on several connections: ranges, their boundaries, one snapshot, the same bytes
# ---------------------------------------------------------------------------------------------------------
# The canonical text as first written (a chain of `||`), kept here as the reference the faster concat() form
# must reproduce byte for byte.
REFERENCE_LINE = """
SELECT ('{"id":"' || e.id::text || '","type":' || to_json(e.type)::text || ',"keyId":' || to_json(e.stream_id)::text
        || ',"version":' || e.version::text || ',"position":' || e.position::text || ',"occurredAt":"'
        || to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '","actor":'
        || e.metadata::text || ',"data":' || e.data::text
        || ',"prevHash":' || coalesce('"' || c.prev_hash || '"', 'null') || ',"hash":'
        || coalesce('"' || c.hash || '"', 'null') || '}' || chr(10))
FROM events e LEFT JOIN event_chain c ON c.position = e.position ORDER BY e.position
"""


def test_verify_and_export_across_range_boundaries(fresh_db: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import audit_bench

    audit_bench.seed(fresh_db, 120_000)  # verify cuts [1, 120000] into ranges of 50,000 positions
    some_events(fresh_db, 2)  # and a few through the write path (metadata with quotes, backslash, é)
    seal(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        reference = [r[0].encode() for r in conn.execute(REFERENCE_LINE)]
        one = list(audit.export(conn, jobs=1))
        two = list(audit.export(conn, jobs=2))
        chunked = b"".join(audit.export_chunks(conn, jobs=3))
        verdicts = [audit.verify(conn, jobs=jobs) for jobs in (1, 2, 3)]
    assert len(reference) == 120_005 and one == reference and two == reference
    assert chunked == b"".join(reference)
    assert audit.verify_export(two) == (120_005, None)
    assert all(v.ok and v.checked == 120_005 for v in verdicts), [v.summary() for v in verdicts]
    assert len({v.head for v in verdicts}) == 1

    # The last event of a range deleted with its chain row: the first row of the next range must notice that its
    # prev_hash is not the hash of the row before it (found across the boundary, not assumed).
    with superuser(fresh_db) as conn:
        conn.execute("DELETE FROM events WHERE position = 100000")
        conn.execute("DELETE FROM event_chain WHERE position = 100000")
    for jobs in (1, 2):
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            verdict = audit.verify(conn, jobs=jobs)
        assert not verdict.ok and verdict.position == 100_001 and "link" in verdict.problem, verdict.summary()
    # An event changed in the last range and another in the first: the first one is named.
    with superuser(fresh_db) as conn:
        conn.execute("UPDATE events SET metadata = '{}' WHERE position IN (7, 110000)")
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        verdict = audit.verify(conn, jobs=2)
    assert not verdict.ok and verdict.position == 7 and "hash mismatch" in verdict.problem


def test_export_lines_equal_the_envelope_encoder(fresh_db: str) -> None:
    """Each export line, without its two chain fields, is the NATS envelope of that event (same fields, same
    values), and a --key export is exactly that key's lines."""
    from keyledger.core.events import RecordedEvent, encode_envelope

    keys = some_events(fresh_db, 3)
    seal(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        rows = conn.execute("SELECT id::text, stream_id, version, position, recorded_at, metadata, type, data::text "
                            "FROM events ORDER BY position").fetchall()
        lines = list(audit.export(conn))
        mine = list(audit.export(conn, key_id=keys[1]))
    assert len(lines) == len(rows) == 7
    for line, (eid, stream, version, position, at, meta, etype, data) in zip(lines, rows):
        recorded = RecordedEvent(id=eid, stream_id=stream, version=version, position=position, recorded_at=at,
                                 metadata=meta, event=decode_data(etype, data))
        exported = json.loads(line)
        assert len(exported.pop("hash")) == 64 and len(exported.pop("prevHash")) == 64
        envelope = json.loads(encode_envelope(recorded))
        # The same instant; the export always prints 6 fractional digits (the documented canonical form).
        assert (dt.datetime.fromisoformat(exported.pop("occurredAt"))
                == dt.datetime.fromisoformat(envelope.pop("occurredAt")))
        assert exported == envelope
    assert mine == [x for x in lines if json.loads(x)["keyId"] == keys[1]] and len(mine) == 2



# ---------------------------------------------------------------------------------------------------------
# The command line: export and replay as a user runs them
# ---------------------------------------------------------------------------------------------------------
def test_audit_export_from_the_command_line(fresh_db: str) -> None:
    keys = some_events(fresh_db, 3)
    seal(fresh_db)
    result = cli_bytes(fresh_db, "audit", "export")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines(keepends=True)
    assert lines == export_lines(fresh_db) and len(lines) == 7
    assert audit.verify_export(lines) == (7, None)
    assert all(key.encode() not in result.stderr for key in keys)

    one = cli_bytes(fresh_db, "audit", "export", "--key", keys[1])
    assert one.returncode == 0 and [json.loads(x)["keyId"] for x in one.stdout.splitlines()] == [keys[1]] * 2
    window = cli_bytes(fresh_db, "audit", "export", "--since", "2026-03-01T12:01:00",  # no zone: UTC
                       "--until", "2026-03-01T13:02:00+01:00")  # exclusive
    assert window.returncode == 0
    assert [json.loads(x)["keyId"] for x in window.stdout.splitlines()] == [keys[1], keys[1]]
    for bad in (["--since", "yesterday"], ["--until", "2026-13-45"]):
        refused = cli(fresh_db, "audit", "export", *bad)
        assert refused.returncode == 2 and refused.stdout == "", bad
        assert len(refused.stderr.strip().splitlines()) >= 1 and "Traceback" not in refused.stderr


def test_replay_from_the_command_line(fresh_db: str) -> None:
    some_events(fresh_db, 3)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        before = conn.execute("SELECT * FROM active_api_keys ORDER BY id").fetchall()
        assert len(before) == 2  # three keys, one revoked
        conn.execute("DELETE FROM active_api_keys")
    result = cli(fresh_db, "replay", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("replay active_api_keys:") and "2 rows" in result.stderr
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM active_api_keys ORDER BY id").fetchall() == before
    unknown = cli(fresh_db, "replay", "--projection", "nope")
    assert unknown.returncode == 2 and "unknown projection 'nope'" in unknown.stderr


# ---------------------------------------------------------------------------------------------------------
# One sealer, whoever competes for it
# ---------------------------------------------------------------------------------------------------------
def test_only_one_sealer_holds_the_lock_and_a_racing_second_cannot_fork_the_chain(fresh_db: str) -> None:
    some_events(fresh_db, 4)  # 9 events
    with psycopg.connect(fresh_db, autocommit=True) as a, psycopg.connect(fresh_db, autocommit=True) as b:
        assert audit.try_lead(a) is True
        assert audit.try_lead(b) is False  # the lock is taken: b is not the sealer
        # `audit verify --seal` seals only when it gets the lock: with a holding it, it seals nothing.
        busy = cli(fresh_db, "audit", "verify", "--seal")
        assert busy.returncode == 0 and "9 not sealed yet" in busy.stdout, busy.stdout + busy.stderr
        assert audit.seal(a) == 9
        a.close()  # the sealer goes away; its lock goes once its backend has ended (asynchronously)
        wait_until(lambda: audit.try_lead(b), timeout=30, interval=0.01, what="the lock free for the next sealer")

    # A deposed sealer that still runs (it passed its lock check before losing it) racing the new one over the
    # same positions: both send the same batch (seal's one statement hashes and inserts); the chain's primary key
    # lets one batch in.
    some_events(fresh_db, 2)  # 5 more events
    blocker = psycopg.connect(fresh_db)
    blocker.execute("LOCK TABLE event_chain IN SHARE MODE")  # both writes wait here, their chains computed
    outcomes: dict[str, Any] = {}

    def sealer(name: str) -> None:
        try:
            with psycopg.connect(fresh_db, autocommit=True) as conn:
                outcomes[name] = audit.seal(conn, max_wait=10)
        except Exception as exc:  # noqa: BLE001 - the loser's error is the point
            outcomes[name] = exc

    threads = [threading.Thread(target=sealer, args=(n,)) for n in ("one", "two")]
    try:
        for t in threads:
            t.start()
        with psycopg.connect(fresh_db, autocommit=True) as watch:
            # (the statement's start: pg_stat_activity keeps only its first 1 kB)
            wait_until(lambda: watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                             "AND left(query, 40) = left(%s, 40)",
                                             (audit.SEAL_BATCH,)).fetchone()[0] == 2,
                       timeout=30, what="both sealers writing the same positions")
    finally:
        blocker.rollback()
        blocker.close()
        for t in threads:
            t.join(30)
    assert sorted(type(v).__name__ for v in outcomes.values()) == ["UniqueViolation", "int"], outcomes
    assert [v for v in outcomes.values() if isinstance(v, int)] == [5]
    verdict = verify(fresh_db)
    assert verdict.ok and verdict.checked == 14 and verdict.unsealed == 0, verdict.summary()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT position) FROM event_chain").fetchone() == (14, 14)


# ---------------------------------------------------------------------------------------------------------
# Verify and export read one snapshot while writes (and sealing) go on
# ---------------------------------------------------------------------------------------------------------
def test_verify_and_export_read_one_snapshot_while_the_log_grows_and_is_sealed(
        fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both read on two connections in one exported snapshot. In any one snapshot the sealed events are a prefix
    of the log in position order (the sealer chains in order, up to a horizon nothing can still commit below),
    so an export must show hashes, then only nulls; reading its chunks at different moments would show a
    null-hash line before a sealed one as the sealer moves. Meanwhile events keep being appended."""
    sys.path.insert(0, str(ROOT / "bench"))
    import audit_bench

    # Many small chunks (each read by one of the two connections, at its own moment) instead of five large
    # ones, so the sealer's head crosses chunk boundaries while an export runs.
    monkeypatch.setattr(audit, "EXPORT_CHUNK_POSITIONS", 400)
    audit_bench.seed(fresh_db, 40_000)  # all unsealed
    stop = threading.Event()
    errors: list[BaseException] = []
    appended = [0]

    def writer() -> None:
        try:
            while not stop.is_set():
                some_events(fresh_db, 1)
                appended[0] += 3
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def sealer() -> None:
        try:
            with psycopg.connect(fresh_db, autocommit=True) as conn:
                while not stop.is_set():
                    audit.seal(conn, batch=500, max_wait=1.0)  # small batches: the head moves all the time
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=sealer)]
    for t in threads:
        t.start()
    exports, verdicts = 0, []
    try:
        deadline = time.monotonic() + 120
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            # Start reading once the sealer is under way, so the first exports run while it moves.
            wait_until(lambda: audit.head(conn) is not None or errors, timeout=60, interval=0.001,
                       what="the sealer to start")
            while exports < 6 or appended[0] < 6:
                assert time.monotonic() < deadline and not errors, errors
                lines = list(audit.export(conn, jobs=2))
                positions = [json.loads(x)["position"] for x in lines]
                assert positions == sorted(set(positions))
                sealed = [not x.endswith(b',"prevHash":null,"hash":null}\n') for x in lines]
                prefix = sealed.index(False) if False in sealed else len(sealed)
                assert not any(sealed[prefix:]), f"a sealed line after an unsealed one at {positions[prefix]}"
                assert audit.verify_export(lines[:prefix]) == (prefix, None)
                verdicts.append(audit.verify(conn, jobs=2))
                exports += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert all(v.ok for v in verdicts), [v.summary() for v in verdicts if not v.ok]
    assert len({(v.checked, v.unsealed) for v in verdicts}) > 1  # they saw the log and the chain move
    final = verify(fresh_db)
    assert final.ok and final.checked + final.unsealed == 40_000 + appended[0]
