"""Applying schema.sql to a database that a running service is writing to.

Every process applies the schema at start (``serve``, ``import``, ``dev-session``), so a second process often
migrates while the first appends events. Re-creating a trigger on ``events`` needs a lock that conflicts with
an insert, and an insert locks ``events`` before the position sequence while the script touches them in the
other order: without care the two deadlock, and PostgreSQL may pick the revoke as the victim.

And applying it to a database better-auth (or Rybbit) already owns: their tables and rows stay as they are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
from typing import Any

import psycopg
import pytest

from better_auth_schema import BETTER_AUTH_CORE
from harness import Service, delete_streams, unique_topology, wait_until
from keyledger.http.auth import cookie_value
from keyledger.storage.schema import SCHEMA_PATH, migrate
from servers import DatabaseFactory


def test_a_migration_gives_way_to_an_insert_it_would_deadlock_with(service: Service) -> None:
    url = service.database_url
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["applied"] = migrate(url, force=True)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    with psycopg.connect(url) as writer, psycopg.connect(url, autocommit=True) as watcher:
        writer.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")  # what an INSERT INTO events takes first
        migration = threading.Thread(target=run)
        migration.start()
        wait_until(lambda: watcher.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted").fetchone()[0] > 0,
            timeout=30, what="the migration waiting for events")
        # what the insert's position trigger takes next; the migration already holds the sequence
        writer.execute("SELECT nextval('events_position_seq')")
        writer.rollback()
        migration.join(timeout=30)
    assert outcome == {"applied": True}


def test_migrating_beside_a_busy_service_neither_fails_nor_fails_a_request(service: Service) -> None:
    me = service.session()
    statuses: list[int] = []
    stop = threading.Event()

    def churn() -> None:
        # create + delete: two appends per round, each inserting into events (and taking the sequence)
        while not stop.is_set():
            created = service.post("api-key/create", me, json={})
            statuses.append(created.status_code)
            if created.status_code == 200:
                statuses.append(service.delete(me, created.json()["id"]).status_code)

    workers = [threading.Thread(target=churn) for _ in range(4)]
    for worker in workers:
        worker.start()
    overlapping = []
    try:
        wait_until(lambda: len(statuses) >= 4, timeout=30, what="the churn to be under way")
        for _ in range(8):
            answered = len(statuses)
            # Re-applied each time (force), no deadlock raised, whatever the writers are doing meanwhile...
            assert migrate(service.database_url, force=True) is True
            # ...and the writers kept going: at least one more request answered before the next migration.
            wait_until(lambda: len(statuses) > answered, timeout=30, what="a request after the migration")
            overlapping.append(len(statuses) - answered)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    assert len(overlapping) == 8 and all(n > 0 for n in overlapping)
    assert set(statuses) == {200}, sorted(set(statuses))


def test_an_unchanged_schema_is_not_applied_again(service: Service) -> None:
    migrate(service.database_url)  # records the script's digest if this database was loaded another way
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        before = conn.execute("SELECT applied_at FROM keyledger_schema").fetchone()[0]
    assert migrate(service.database_url) is False
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        row: Any = conn.execute("SELECT sha256, applied_at FROM keyledger_schema").fetchone()
    assert row[1] == before
    assert row[0] == hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# schema.sql applied onto a database that better-auth (or Rybbit) already owns
# ---------------------------------------------------------------------------------------------------------
# better-auth's core tables, as its Postgres migration creates them (no admin plugin: no ban columns), and an
# apikey table of its own.
BETTER_AUTH = BETTER_AUTH_CORE + """
create table "apikey" ("id" text not null primary key, "name" text, "start" text, "prefix" text,
  "key" text not null, "userId" text not null references "user" ("id") on delete cascade,
  "enabled" boolean, "createdAt" timestamptz not null, "updatedAt" timestamptz not null, "metadata" text);
"""
# A Rybbit-shaped database: the same tables with the admin plugin's columns already there (their own defaults
# and types), its organization plugin tables with extra columns, and the application's own tables.
RYBBIT = """
create table "user" ("id" text not null primary key, "name" text not null, "username" text unique,
  "email" text not null unique, "emailVerified" boolean not null, "image" text,
  "createdAt" timestamp default now() not null, "updatedAt" timestamp default now() not null,
  "role" text default 'user' not null, "banned" boolean default false, "banReason" text, "banExpires" timestamp,
  "monthlyEventCount" integer default 0);
create table "session" ("id" text not null primary key, "expiresAt" timestamp not null,
  "token" text not null unique, "createdAt" timestamp not null, "updatedAt" timestamp not null,
  "ipAddress" text, "userAgent" text, "userId" text not null references "user" ("id") on delete cascade,
  "impersonatedBy" text, "activeOrganizationId" text);
create table "organization" ("id" text not null primary key, "name" text not null, "slug" text unique,
  "logo" text, "createdAt" timestamp not null, "metadata" text, "stripeCustomerId" text);
create table "member" ("id" text not null primary key,
  "organizationId" text not null references "organization" ("id") on delete cascade,
  "userId" text not null references "user" ("id") on delete cascade, "role" text not null,
  "createdAt" timestamp not null);
create table "sites" ("site_id" serial primary key, "name" text not null, "domain" text not null,
  "organization_id" text references "organization" ("id"), "created_at" timestamp default now());
"""


def _snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every row of every table the database had before keyledger, and the user table's column types."""
    tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    rows = {t: conn.execute(f'SELECT to_jsonb(x) FROM "{t}" x ORDER BY 1').fetchall() for t in tables}
    columns = dict(conn.execute("SELECT column_name, data_type || coalesce(' default ' || column_default, '') "
                                "FROM information_schema.columns WHERE table_name = 'user'").fetchall())
    return {"rows": rows, "user_columns": columns}


@pytest.mark.parametrize("flavour", ["better-auth", "rybbit"])
def test_schema_applies_onto_an_existing_better_auth_database_without_touching_it(
        db_factory: DatabaseFactory, nats_url: str, flavour: str) -> None:
    url = db_factory.create(f"existing_{flavour}")
    user_id, token, org_id = "existinguser0000000000000000001", "existingsessiontoken000000000001", "org00000000001"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")  # only the application's tables
        conn.execute(BETTER_AUTH if flavour == "better-auth" else RYBBIT)
        conn.execute('INSERT INTO "user" (id, name, email, "emailVerified") VALUES (%s, %s, %s, true)',
                     (user_id, "Existing", "existing@example.com"))
        conn.execute('INSERT INTO session (id, "expiresAt", token, "createdAt", "updatedAt", "userId") '
                     "VALUES ('s1', now() + interval '1 day', %s, now(), now(), %s)", (token, user_id))
        if flavour == "better-auth":
            conn.execute('INSERT INTO apikey (id, key, "userId", enabled, "createdAt", "updatedAt") '
                         "VALUES ('ba-key', 'hash', %s, true, now(), now())", (user_id,))
        else:
            conn.execute("""INSERT INTO organization (id, name, slug, "createdAt") VALUES (%s, 'Acme', 'acme', now())""",
                         (org_id,))
            conn.execute("""INSERT INTO member (id, "organizationId", "userId", role, "createdAt")
                            VALUES ('m1', %s, %s, 'owner', now())""", (org_id, user_id))
            conn.execute("INSERT INTO sites (name, domain, organization_id) VALUES ('site', 'example.com', %s)",
                         (org_id,))
        before = _snapshot(conn)

    assert migrate(url) is True
    assert migrate(url) is False  # recorded: the next start skips it
    assert migrate(url, force=True) is True  # and applying it again is harmless

    with psycopg.connect(url, autocommit=True) as conn:
        after = _snapshot(conn)
        added = set(after["user_columns"]) - set(before["user_columns"])
        for table, rows in before["rows"].items():
            if table == "user" and flavour == "better-auth":  # the admin plugin's nullable columns, added empty
                assert [{k: v for k, v in r[0].items() if k not in added} for r in after["rows"][table]] == \
                    [r[0] for r in rows]
                assert all(r[0][c] is None for r in after["rows"][table] for c in added)
            else:
                assert after["rows"][table] == rows, table
        # Existing columns keep their types and defaults; the ban columns are there either way.
        assert {c: after["user_columns"][c] for c in before["user_columns"]} == before["user_columns"]
        assert {"banned", "banReason", "banExpires"} <= set(after["user_columns"])
        assert added == (set() if flavour == "rybbit" else {"role", "banned", "banReason", "banExpires"})
        for table in ("events", "outbox", "active_api_keys", "organization", "member"):
            assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None, table

    # keyledger serves that database with the sessions better-auth (or Rybbit) already wrote.
    topology = unique_topology(f"existing{flavour}")
    svc = Service(database_url=url, nats_url=nats_url, topology=topology).start()
    try:
        headers = {"cookie": f"better-auth.session_token={cookie_value(token, svc.secret)}", "origin": svc.origin}
        created = svc.post("api-key/create", headers, json={"name": "adopted"})
        assert created.status_code == 200, created.text
        assert created.json()["referenceId"] == user_id
        assert svc.verify(created.json()["key"])["valid"] is True
        if flavour == "rybbit":  # its organization plugin's tables serve org keys as they are
            org_key = svc.post("api-key/create", headers, json={"configId": "org", "organizationId": org_id})
            assert org_key.status_code == 200 and org_key.json()["referenceId"] == org_id, org_key.text
            with psycopg.connect(url, autocommit=True) as conn:  # a ban set by Rybbit's admin plugin is honoured
                conn.execute('UPDATE "user" SET banned = true, "banExpires" = now() + interval \'1 hour\' '
                             "WHERE id = %s", (user_id,))
            assert svc.post("api-key/create", headers, json={}).json()["code"] == "USER_BANNED"
        assert svc.delete(headers, created.json()["id"]).status_code == (401 if flavour == "rybbit" else 200)
    finally:
        svc.stop()
        asyncio.run(delete_streams(nats_url, topology))


def test_receipts_of_the_earlier_layout_are_folded_into_their_revocations(db_factory: DatabaseFactory) -> None:
    """Receipts were once a row per (revocation, cache) in ``revocation_receipts``: migrating moves each into its
    revocation's ``caches`` (cache id -> effective at, or null), times unchanged, and drops the old table. The
    cursor below which every revocation has its row starts at the newest row (that code wrote each before its
    event was acknowledged), not at 0 (a new leader would take every revocation ever made from the log)."""
    url = db_factory.create("receipts_layout")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE receipts_written")
        conn.execute("DROP VIEW receipts")  # (that layout had neither)
        conn.execute("ALTER TABLE revocations DROP COLUMN caches")
        conn.execute("""CREATE TABLE revocation_receipts (position bigint NOT NULL REFERENCES revocations (position)
                        ON DELETE CASCADE, cache_id text NOT NULL, effective_at timestamptz,
                        PRIMARY KEY (position, cache_id))""")
        conn.execute("INSERT INTO revocations (position, key_id, type, revoked_at) VALUES "
                     "(7, 'k7', 'ApiKeyRevoked', '2026-12-01 10:00:00+00'), "
                     "(9, 'k9', 'ApiKeyRevoked', '2026-12-01 10:00:01+00')")
        conn.execute("INSERT INTO revocation_receipts VALUES (7, 'a', '2026-12-01 10:00:00.001234+00'), "
                     "(7, 'b', NULL)")
    assert migrate(url, force=True) is True
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('revocation_receipts')").fetchone()[0] is None
        caches = dict(conn.execute("SELECT position, caches FROM revocations").fetchall())
        assert conn.execute("SELECT position FROM receipts_written").fetchall() == [(9,)]
    assert caches[9] == {}
    assert caches[7].keys() == {"a", "b"} and caches[7]["b"] is None
    assert dt.datetime.fromisoformat(caches[7]["a"]) == dt.datetime(2026, 12, 1, 10, 0, 0, 1234, tzinfo=dt.timezone.utc)


def test_caches_heard_of_before_first_seen_at_was_nullable_load_after_migrating(db_factory: DatabaseFactory) -> None:
    """2ae9159 made ``receipt_caches.first_seen_at`` NOT NULL DEFAULT '-infinity', a value psycopg cannot load into a
    datetime (a new leader reading the live caches failed on it). Migrating turns those into null, which says the
    same (heard of before the column), and drops the constraint and the default; a real first sighting is kept."""
    url = db_factory.create("receipts_first_seen")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE receipt_caches DROP COLUMN first_seen_at")
        conn.execute("ALTER TABLE receipt_caches ADD COLUMN first_seen_at timestamptz NOT NULL DEFAULT '-infinity'")
        conn.execute("INSERT INTO receipt_caches (cache_id, service, position, last_seen_at) VALUES "
                     "('old', 's', 3, '2026-12-06 22:00:00+00')")
        conn.execute("INSERT INTO receipt_caches VALUES ('new', 's', 4, '2026-12-06 22:00:01+00', "
                     "'2026-12-06 21:00:00+00')")
        with pytest.raises(psycopg.DataError):  # the state the migration mends
            conn.execute("SELECT first_seen_at FROM receipt_caches").fetchall()
    assert migrate(url, force=True) is True
    with psycopg.connect(url, autocommit=True) as conn:
        assert dict(conn.execute("SELECT cache_id, first_seen_at FROM receipt_caches").fetchall()) == {
            "old": None, "new": dt.datetime(2026, 12, 6, 21, tzinfo=dt.timezone.utc)}
        assert conn.execute("SELECT is_nullable, column_default FROM information_schema.columns "
                            "WHERE table_name = 'receipt_caches' AND column_name = 'first_seen_at'").fetchone() == (
            "YES", None)
