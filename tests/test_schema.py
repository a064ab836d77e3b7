"""Applying schema.sql to a database that a running service is writing to.

Every process applies the schema at start (``serve``, ``import``, ``dev-session``), so a second process often
migrates while the first appends events. Re-creating a trigger on ``events`` needs a lock that conflicts with
an insert, and an insert locks ``events`` before the position sequence while the script touches them in the
other order: without care the two deadlock, and PostgreSQL may pick the revoke as the victim.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import psycopg

from harness import Service, wait_until
from keyledger.schema import SCHEMA_PATH, migrate


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
            timeout=10, what="the migration waiting for events")
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
    try:
        time.sleep(0.3)
        applied = 0
        for _ in range(8):
            assert migrate(service.database_url, force=True) is True  # re-applied each time, no deadlock raised
            applied += 1
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert applied == 8
    assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))


def test_an_unchanged_schema_is_not_applied_again(service: Service) -> None:
    migrate(service.database_url)  # records the script's digest if this database was loaded another way
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        before = conn.execute("SELECT applied_at FROM keyledger_schema").fetchone()[0]
    assert migrate(service.database_url) is False
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        row: Any = conn.execute("SELECT sha256, applied_at FROM keyledger_schema").fetchone()
    assert row[1] == before
    assert row[0] == hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest()
