"""The better-auth key record (camelCase JSON), from a folded state or an ``active_api_keys`` row."""

from __future__ import annotations

import datetime as dt
import secrets
import string
import base64
import hashlib
from typing import Any

from .domain import KeyState

_LETTERS = string.ascii_letters
_ID_ALPHABET = string.ascii_letters + string.digits


def new_key(prefix: str | None) -> str:
    """better-auth's format: optional prefix + 64 random letters."""
    return (prefix or "") + "".join(secrets.choice(_LETTERS) for _ in range(64))


def new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(32))


def hash_key(key: str) -> str:
    """better-auth's stored form: ``base64url(sha256(utf8(key)))`` without padding (43 characters)."""
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()).rstrip(b"=").decode()


def iso(value: dt.datetime | None) -> str | None:
    """ISO-8601 with milliseconds and ``Z``, as better-auth (JavaScript's ``toISOString``) prints."""
    if value is None:
        return None
    # isoformat (C) truncates to milliseconds like `microsecond // 1000`, ending in "+00:00": 2.5x strftime's
    # speed, and verify renders up to five of these per request.
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def _record(
    *, id: str, config_id: str, name: str | None, start: str | None, reference_id: str, prefix: str | None,
    refill_interval: int | None, refill_amount: int | None, enabled: bool, rate_limit_enabled: bool,
    rate_limit_time_window: int | None, rate_limit_max: int | None, remaining: int | None,
    expires_at: dt.datetime | None, created_at: dt.datetime, updated_at: dt.datetime,
    permissions: dict[str, Any] | None, metadata: dict[str, Any] | None,
    last_refill_at: dt.datetime | None = None, request_count: int = 0, last_request: dt.datetime | None = None,
) -> dict[str, Any]:
    return {
        "configId": config_id,
        "name": name,
        "start": start,
        "referenceId": reference_id,
        "prefix": prefix,
        "refillInterval": refill_interval,
        "refillAmount": refill_amount,
        "lastRefillAt": iso(last_refill_at),
        "enabled": enabled,
        "rateLimitEnabled": rate_limit_enabled,
        "rateLimitTimeWindow": rate_limit_time_window,
        "rateLimitMax": rate_limit_max,
        "requestCount": request_count,
        "remaining": remaining,
        "lastRequest": iso(last_request),
        "expiresAt": iso(expires_at),
        "createdAt": iso(created_at),
        "updatedAt": iso(updated_at),
        "permissions": permissions,
        "metadata": metadata,
        "id": id,
    }


def from_state(state: KeyState) -> dict[str, Any]:
    return _record(
        id=state.id, config_id=state.config_id, name=state.name, start=state.start,
        reference_id=state.reference_id, prefix=state.prefix, refill_interval=state.refill_interval,
        refill_amount=state.refill_amount, enabled=state.enabled, rate_limit_enabled=state.rate_limit_enabled,
        rate_limit_time_window=state.rate_limit_time_window, rate_limit_max=state.rate_limit_max,
        remaining=state.remaining,
        expires_at=state.expires_at, created_at=state.created_at, updated_at=state.updated_at,
        permissions=state.permissions, metadata=state.metadata,
    )


# Column list for reading records from active_api_keys, in the order from_row expects.
ROW_COLUMNS = (
    "id, config_id, name, start, reference_id, prefix, refill_interval, refill_amount, enabled, "
    "rate_limit_enabled, rate_limit_time_window, rate_limit_max, remaining, expires_at, created_at, "
    "updated_at, permissions, metadata"
)
_ROW_FIELDS = [c.strip() for c in ROW_COLUMNS.split(",")]

# The same record with its live usage counters, for get and list: ``active_api_keys a LEFT JOIN api_key_usage u
# ON u.key_id = a.id``. The counters live in api_key_usage (schema.sql: verify counts there, it writes no
# event); `remaining` there is live only while it counts from the row's current value (remaining_from =
# remaining_version: an event that set `remaining` again restarts the count), else the configured value
# stands. keyledger_verify_key returns its columns in this order too.
_LIVE_REMAINING = ("CASE WHEN a.remaining IS NOT NULL AND u.remaining_from = a.remaining_version "
                   "THEN u.remaining ELSE a.remaining END")
LIVE_COLUMNS = ", ".join(
    [_LIVE_REMAINING if c == "remaining" else f"a.{c}" for c in _ROW_FIELDS]
    + ["CASE WHEN u.remaining_from = a.remaining_version THEN u.last_refill_at END",
       "coalesce(u.request_count, 0)", "u.last_request"]
)
LIVE_FROM = "active_api_keys a LEFT JOIN api_key_usage u ON u.key_id = a.id"
_LIVE_FIELDS = [*_ROW_FIELDS, "last_refill_at", "request_count", "last_request"]


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A record from ROW_COLUMNS (the projection alone: counters at their defaults)."""
    return _record(**dict(zip(_ROW_FIELDS, row)))


def from_live_row(row: Any) -> dict[str, Any]:
    """A record from LIVE_COLUMNS (or keyledger_verify_key's record columns): with the live counters."""
    return _record(**dict(zip(_LIVE_FIELDS, row)))
