"""Request parsing with better-auth's error precedence and wording.

Precedence on a POST (observed on better-auth): malformed JSON (400 ``BAD_REQUEST``) -> Origin check (403,
only when a cookie is sent) -> body schema (400 ``VALIDATION_ERROR``) -> session (401) -> lookup (404).
Nothing here touches the database: bad input is refused before any connection is taken.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .errors import MISSING, ApiError, validation

_decoder = msgspec.json.Decoder()

# Ids keyledger creates are 32 letters/digits; imported ones may add '-' or '_'. Anything else (dots,
# wildcards, spaces...) cannot name a key, and must never reach a NATS subject.
KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
PREFIX_RE = re.compile(r"[a-zA-Z0-9_-]+")


def parse_json(raw: bytes, content_type: str | None) -> Any:
    """The decoded body, or ``MISSING`` when there is none (better-auth: "received undefined")."""
    if not raw:
        return MISSING
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json")
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(400, "BAD_REQUEST", "Invalid JSON in request body") from None
    return body


def has_nul(value: Any) -> bool:
    """Whether any string (key or value) anywhere in a decoded JSON value holds U+0000."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise validation("body", "object", body)
    if has_nul(body):
        # Postgres text and jsonb cannot hold U+0000; refuse it here, before the driver sees it.
        raise ApiError(400, "VALIDATION_ERROR", "[body] Invalid input: strings must not contain NUL characters")
    return body


def string_field(body: dict[str, Any], name: str, *, required: bool = False, where: str = "body") -> Any:
    value = body.get(name, MISSING)
    if value is MISSING and not required:
        return MISSING
    if not isinstance(value, str):
        raise validation(f"{where}.{name}", "string", value)
    return value


def optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], expected: str,
             *, nullable: bool = False) -> Any:
    value = body.get(name, MISSING)
    if value is MISSING or (value is None and nullable):
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise validation(f"body.{name}", expected, value)
    return value


def plausible_key_id(key_id: str) -> bool:
    return KEY_ID_RE.fullmatch(key_id) is not None
