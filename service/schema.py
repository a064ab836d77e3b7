"""Applying schema.sql: kept apart from the runtime so that commands which only migrate stay light."""

from __future__ import annotations

from pathlib import Path

import psycopg

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('keyledger.migrate', 0))"


def migrate(database_url: str) -> None:
    """Apply schema.sql in one transaction (every statement is idempotent); concurrent starts serialise."""
    sql = SCHEMA_PATH.read_text()
    with psycopg.connect(database_url, autocommit=False) as conn:
        conn.execute(MIGRATION_LOCK)
        conn.execute(sql)
        conn.commit()
