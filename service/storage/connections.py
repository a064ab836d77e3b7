"""Connecting to PostgreSQL for the long run: the keyword arguments every long-lived connection is opened with."""

from __future__ import annotations

from typing import Any

from psycopg.conninfo import conninfo_to_dict

# TCP keepalives on both ends of every long-lived PostgreSQL connection, so a peer that vanished without closing
# its socket (power loss, a partition) is noticed in seconds, not after the OS default of two hours:
# * client side (libpq): a service blocked on a dead server gets an error and reconnects;
# * server side (the session's tcp_keepalives_*): PostgreSQL ends the backend of a vanished service host, and
#   with it what its transaction in flight held (a key's row locks, the audit chain's head, a projection's lock).
CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"


def long_lived(database_url: str, *options: str, name: str) -> dict[str, Any]:
    """libpq keyword arguments for a long-lived connection: keepalives on both ends, server settings ``options``
    (``-c name=value``) after any the DATABASE_URL gives itself (kept, not replaced), and ``application_name``
    ``keyledger <name>`` (unless the DATABASE_URL sets one), so that ``pg_stat_activity`` says which part of
    keyledger holds each session."""
    given = conninfo_to_dict(database_url)
    own = str(given.get("options") or "")
    return {**CLIENT_KEEPALIVES, "options": " ".join(o for o in (own, SERVER_KEEPALIVES, *options) if o),
            "application_name": given.get("application_name") or f"keyledger {name}"}
