"""Applying schema.sql: kept apart from the runtime so that commands which only migrate stay light.

Every process applies the schema at start (``serve``, ``import``, ``dev-session``), often while another
process is appending events. Two rules keep that safe:

* **Skip when unchanged.** The script's sha256 is recorded in ``keyledger_schema``; a start whose script is
  the one already applied takes no table lock at all. ``keyledger migrate`` always applies (``force``).
* **Give way to writers.** Re-creating a trigger on ``events`` takes a lock that conflicts with inserts, and
  the script locks the position sequence before ``events`` while an insert locks them the other way round, so
  an insert and a migration can deadlock. PostgreSQL would then abort one of the two, possibly the revoke. A
  migration waits at most ``LOCK_TIMEOUT`` for each lock (well under ``deadlock_timeout``, 1 s by default, so
  it always gives up before the deadlock detector picks a victim), rolls back whole and tries again.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import psycopg
import psycopg.errors

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('keyledger.migrate', 0))"
APPLIED_DIGEST = "SELECT sha256 FROM keyledger_schema"
RECORD_DIGEST = """
INSERT INTO keyledger_schema (sha256) VALUES (%s)
ON CONFLICT (singleton) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()
"""
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '200ms'"
GIVE_UP_AFTER_S = 60.0


def migrate(database_url: str, force: bool = False) -> bool:
    """Apply schema.sql in one transaction unless it is the script applied last (``force`` applies anyway).

    Returns whether it was applied. Concurrent starts serialise on an advisory lock; the second finds the
    digest recorded and skips."""
    script = SCHEMA_PATH.read_bytes()
    digest = hashlib.sha256(script).hexdigest()
    deadline = time.monotonic() + GIVE_UP_AFTER_S
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            try:
                with conn.transaction():
                    conn.execute(MIGRATION_LOCK)
                    if not force and _applied_digest(conn) == digest:
                        return False
                    conn.execute(LOCK_TIMEOUT)
                    conn.execute(script.decode())
                    conn.execute(RECORD_DIGEST, (digest,))
                return True
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
                if time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.05, 0.25))  # let the writers that were in the way finish


def _applied_digest(conn: psycopg.Connection) -> str | None:
    if conn.execute("SELECT to_regclass('keyledger_schema') IS NULL").fetchone()[0]:
        return None
    row = conn.execute(APPLIED_DIGEST).fetchone()
    return row[0] if row else None
