"""Request parsing with better-auth's error precedence and wording.

Precedence on a POST (observed on better-auth): malformed JSON (400 ``BAD_REQUEST``) -> Origin check (403,
only when a cookie is sent) -> body schema (400 ``VALIDATION_ERROR``) -> session (401) -> lookup (404).
Nothing here touches the database: bad input is refused before any connection is taken.

Bounds, so hostile input costs nothing: a body is at most 64 KiB (the app's limit), JSON nests at most
``MAX_DEPTH`` levels (deeper is 400 ``BAD_REQUEST``; msgspec's own C decoder stops at ~1,000 with a
RecursionError, which is caught too), and every walk over a decoded body is iterative, never recursive.
Whole numbers that land in an ``integer`` column are at most ``MAX_INT`` (2,147,483,647).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..core.validation import MAX_DEPTH, TooDeep, has_nul as _has_nul
from ..core.validation import plausible_key_id  # noqa: F401  (inputs.plausible_key_id, for the handlers)
from .errors import MISSING, ApiError, validation

_decoder = msgspec.json.Decoder()

PREFIX_RE = re.compile(r"[a-zA-Z0-9_-]+")
MAX_INT = 2**31 - 1  # PostgreSQL integer: remaining, refill*, rateLimit*; also limit/offset of list


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
    except RecursionError:
        raise _too_deep() from None
    return body


def _too_deep() -> ApiError:
    return ApiError(400, "BAD_REQUEST", f"JSON in request body nests deeper than {MAX_DEPTH} levels")


def has_nul(value: Any) -> bool:
    """``core.validation.has_nul``, where a value nesting past ``MAX_DEPTH`` levels is a 400, as a body is."""
    try:
        return _has_nul(value)
    except TooDeep:
        raise _too_deep() from None


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

