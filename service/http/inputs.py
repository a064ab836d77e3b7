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

from .errors import MISSING, ApiError, validation

_decoder = msgspec.json.Decoder()

# Ids keyledger creates are 32 letters/digits; imported ones may add '-' or '_'. Anything else (dots,
# wildcards, spaces...) cannot name a key, and must never reach a NATS subject.
KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
PREFIX_RE = re.compile(r"[a-zA-Z0-9_-]+")
MAX_DEPTH = 32
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
    """Whether any string (key or value) anywhere in a decoded JSON value holds U+0000. Iterative, and raises
    400 past ``MAX_DEPTH`` levels, so no body can make it recurse or run long."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep()
            if isinstance(item, dict):
                for k, v in item.items():
                    if "\x00" in k:
                        return True
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)
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
