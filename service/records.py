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
    value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _record(
    *, id: str, config_id: str, name: str | None, start: str | None, reference_id: str, prefix: str | None,
    refill_interval: int | None, refill_amount: int | None, enabled: bool, rate_limit_enabled: bool,
    rate_limit_time_window: int | None, rate_limit_max: int | None, remaining: int | None,
    expires_at: dt.datetime | None, created_at: dt.datetime, updated_at: dt.datetime,
    permissions: dict[str, Any] | None, metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "configId": config_id,
        "name": name,
        "start": start,
        "referenceId": reference_id,
        "prefix": prefix,
        "refillInterval": refill_interval,
        "refillAmount": refill_amount,
        "lastRefillAt": None,
        "enabled": enabled,
        "rateLimitEnabled": rate_limit_enabled,
        "rateLimitTimeWindow": rate_limit_time_window,
        "rateLimitMax": rate_limit_max,
        "requestCount": 0,
        "remaining": remaining,
        "lastRequest": None,
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
EXPIRES_AT = _ROW_FIELDS.index("expires_at")  # a row's expiry, as a datetime, for verify


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    return _record(**dict(zip(_ROW_FIELDS, row)))
