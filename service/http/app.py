"""The HTTP API: better-auth's API-key endpoints under ``/api/auth``, plus ``api-key/verify``.

Handlers stay thin: parse (inputs.py), identify the caller (a better-auth session cookie, auth.py, or a
backend's Bearer service token) in the same statement that loads the key (store.load), run a domain command
through the store (store.py), render the record (records.py). They never publish to NATS: an appended event is
published by the outbox relay; a handler only nudges the relay so it does not wait for its next poll.

Every error, the framework's own 404/405/413 included, leaves as ``{"message": ..., "code": ...}``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import psycopg
import psycopg_pool
from litestar import Litestar, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from ..background.runtime import Runtime
from ..config import Settings
from ..core import records
from ..core.domain import (
    MAX_EXPIRES_IN,
    MAX_GRACE_PERIOD,
    SERVER_FIELDS,
    CreateKey,
    DomainError,
    GracePeriodOutOfRange,
    RevokeKey,
    RotateKey,
    UpdateKey,
)
from ..core.events import ApiKeyCreated, to_envelope
from ..projections import receipts
from ..storage import store
from . import inputs, openapi
from .auth import check_origin, session_token
from .errors import MISSING, ApiError, unauthorized, validation
from .metrics import Figures, Metrics

log = logging.getLogger("keyledger.http")

# better-auth's server-only properties, in their wire (camelCase) spelling, plus the acting userId.
SERVER_ONLY = (*(records.camel(f) for f in SERVER_FIELDS), "userId")
SORTABLE = {
    "createdAt": "created_at", "updatedAt": "updated_at", "name": "name", "expiresAt": "expires_at",
    "enabled": "enabled", "id": "id",
}
# get and list show the live counters (api_key_usage, LEFT JOINed: most keys have no row there), not only the
# configured `remaining`, as better-auth's stored record would.
GET_KEY = f"SELECT {records.LIVE_COLUMNS} FROM {records.LIVE_FROM} WHERE a.id = %s AND a.config_id = %s"
MEMBER_ROLE = 'SELECT role FROM member WHERE "organizationId" = %s AND "userId" = %s'
ORG_MANAGERS = frozenset({"owner", "admin"})  # roles that may manage an organization's keys
ORG_KEY_PREFIX = "rb_org_"  # Rybbit's default prefix for organization keys
# One statement per verify, whatever the key (schema.sql): lookup by hash (current or superseded secret), the
# refusals, and for a limited key the counted use. Fewer round trips is what makes limited verify fast.
VERIFY_KEY = "SELECT * FROM keyledger_verify_key(%s, %s, %s::jsonb)"
# better-auth's message for each refusal keyledger_verify_key answers with.
REFUSALS = {
    "INVALID_API_KEY": "Invalid API key.", "KEY_DISABLED": "API Key is disabled",
    "KEY_EXPIRED": "API Key has expired", "KEY_NOT_FOUND": "API Key not found",
    "USAGE_EXCEEDED": "Usage limit exceeded.", "RATE_LIMITED": "Rate limit exceeded.",
}


# --------------------------------------------------------------------------------------------------------
# Helpers shared by the handlers
# --------------------------------------------------------------------------------------------------------
def _rt(request: Request[Any, Any, Any]) -> Runtime:
    return request.app.state.runtime


def _reconnect(rt: Runtime) -> store.Connect:
    """Another pooled connection, for finding out what became of a write whose connection failed."""
    return lambda: rt.pool.connection(timeout=1.0)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def _post_body(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """JSON parse, then the origin check, then "is it an object": better-auth's order."""
    rt = _rt(request)
    body = inputs.parse_json(await request.body(), request.headers.get("content-type"))
    check_origin(request.headers, _has_cookie(request), rt.settings.trusted_origins)
    return inputs.require_object(body)


def _has_cookie(request: Request[Any, Any, Any]) -> bool:
    # A server caller's request is authenticated by its Bearer token alone; a cookie on it is ignored.
    return bool(request.headers.get("cookie")) and _bearer(request) is None


def _bearer(request: Request[Any, Any, Any]) -> str | None:
    scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _server_user(request: Request[Any, Any, Any], params: dict[str, Any], where: str) -> str | None:
    """The user a server caller acts for, or None when the request carries no Bearer token.

    ``Authorization: Bearer <KEYLEDGER_SERVICE_TOKEN>`` (compared in constant time) marks a trusted backend
    (Rybbit's server), which names the user it acts for in ``userId``. A Bearer token that does not match is
    401, with no fallback to a cookie; without a configured token there are no server callers at all.
    """
    presented = _bearer(request)
    if presented is None:
        return None
    expected = _rt(request).settings.service_token
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise unauthorized()
    user_id = params.get("userId", MISSING)
    if not isinstance(user_id, str) or not inputs.plausible_key_id(user_id):
        raise validation(f"{where}.userId", "string", user_id)
    return user_id


async def _identify(
    request: Request[Any, Any, Any], conn: Any, params: dict[str, Any], key_id: str | None = None, *,
    where: str = "body", code: str = "UNAUTHORIZED",
) -> tuple[store.Session, list[Any], bool]:
    """Who is calling (a server acting for ``userId``, or a better-auth session) and, when ``key_id`` is given,
    that key's events: one statement either way. Returns (caller, stream, is_server)."""
    server_user = _server_user(request, params, where)
    session, stream = await store.load(conn, None if server_user else _token(request), key_id)
    if server_user is not None:
        return store.Session((None, server_user, False)), stream, True
    return _authenticated(session, code), stream, False


async def _caller_and_key(
    request: Request[Any, Any, Any], conn: Any, params: dict[str, Any], key_id: str, *, where: str = "body",
) -> tuple[store.Session, list[Any]]:
    """``_identify`` for an endpoint about one existing key: the caller first (401/403 come before 404, as in
    better-auth), then 404 ``KEY_NOT_FOUND`` for an id that cannot be a key id, without a lookup."""
    plausible = inputs.plausible_key_id(key_id)
    session, stream, _ = await _identify(request, conn, params, key_id if plausible else None, where=where)
    if not plausible:
        raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    return session, stream


def _token(request: Request[Any, Any, Any]) -> str | None:
    return session_token(request.cookies, _rt(request).settings.secret)


def _authenticated(session: store.Session | None, code: str = "UNAUTHORIZED") -> store.Session:
    if session is None:
        if code == "UNAUTHORIZED_SESSION":
            raise ApiError(401, code, "Unauthorized or invalid session")
        raise unauthorized()
    if session.banned:
        raise ApiError(401, "USER_BANNED", "You have been banned from this application")
    return session


# What a request copies into an event's metadata is capped, in characters: events are kept forever and
# published to NATS, and one oversized header must not make an event unpublishable (a 1.1 MB User-Agent once
# did). Longer values are cut, not refused: the request itself is legitimate.
MAX_USER_AGENT = 512
MAX_REQUEST_ID = 128


def _actor(request: Request[Any, Any, Any], session: store.Session) -> dict[str, Any]:
    """Event metadata: who did it, from where. Never the key, never the cookie or token."""
    client = request.client.host if request.client else None
    user_agent = request.headers.get("user-agent")
    return {
        "userId": session.user_id,
        "sessionId": session.id,  # None for a server caller
        "via": "server" if session.id is None else "session",
        "ipAddress": client,
        "userAgent": user_agent[:MAX_USER_AGENT] if user_agent is not None else None,
        "requestId": (request.headers.get("x-request-id") or str(uuid.uuid4()))[:MAX_REQUEST_ID],
    }


def _server_fields(body: dict[str, Any], is_server: bool) -> dict[str, Any]:
    """The server-only fields present in ``body``, validated, as command arguments (snake_case).

    A browser session that sends any of them gets 400 ``SERVER_ONLY_PROPERTY``, as in better-auth.
    """
    present = {k: v for k, v in body.items() if k in SERVER_ONLY and k != "userId"}
    if not is_server:
        if present or "userId" in body:
            raise ApiError(
                400, "SERVER_ONLY_PROPERTY",
                "The property you're trying to set can only be set from the server auth instance only.",
            )
        return {}
    for name, value in present.items():  # integer columns: refuse what they cannot hold, in zod's words
        if isinstance(value, int) and not isinstance(value, bool) and value > inputs.MAX_INT:
            raise ApiError(400, "VALIDATION_ERROR",
                           f"[body.{name}] Too big: expected number to be <={inputs.MAX_INT}")
    try:
        fields = msgspec.convert(present, ServerFields)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "VALIDATION_ERROR", f"[body] Invalid input: {exc}") from None
    return {f: v for f in SERVER_FIELDS if (v := getattr(fields, f)) is not msgspec.UNSET}


class ServerFields(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    permissions: dict[str, list[str]] | None | msgspec.UnsetType = msgspec.UNSET
    remaining: Annotated[int, msgspec.Meta(ge=0)] | None | msgspec.UnsetType = msgspec.UNSET
    refill_amount: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    refill_interval: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    rate_limit_enabled: bool | msgspec.UnsetType = msgspec.UNSET
    rate_limit_time_window: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    rate_limit_max: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET


def _whole_number(body: dict[str, Any], name: str, expected: str = "an integer") -> Any:
    """An optional JSON number that must be whole (``5.0`` counts as 5): an int, None or MISSING."""
    value = inputs.optional(body, name, (int, float), "number", nullable=True)
    if isinstance(value, float):
        if not value.is_integer():
            raise ApiError(400, "VALIDATION_ERROR", f"[body.{name}] Invalid input: expected {expected}")
        value = int(value)
    return value


def _expires_in(body: dict[str, Any]) -> Any:
    value = _whole_number(body, "expiresIn")
    if isinstance(value, int) and value > MAX_EXPIRES_IN * 1000:  # absurd values never reach timedelta
        raise ApiError(400, "EXPIRES_IN_IS_TOO_LARGE", "The expiresIn is larger than the predefined maximum value.")
    return value


def _metadata(rt: Runtime, body: dict[str, Any]) -> Any:
    value = body.get("metadata", MISSING)
    if value is MISSING or value is None:
        return value
    if not rt.settings.enable_metadata:
        raise ApiError(400, "METADATA_DISABLED", "Metadata is disabled.")
    if not isinstance(value, dict):
        raise ApiError(400, "INVALID_METADATA_TYPE", "metadata must be an object or undefined")
    return value


def _config_id(params: dict[str, Any]) -> str:
    value = params.get("configId")
    if value is None:
        return "default"
    if value not in ("default", "org"):
        raise ApiError(400, "INVALID_CONFIG_ID", 'configId must be "default" or "org"')
    return value


async def _may_manage(conn: Any, user_id: str, org_id: str, *, key_addressed: bool = False) -> None:
    """Owners and admins of an organization manage its keys; a plain member gets 403, a stranger another 403.

    ``key_addressed``: the request named a key id, not the organization. A stranger then gets the 404 that an
    unknown key id gets, so key ids cannot be probed for existence from outside the organization.
    """
    row = await (await conn.execute(MEMBER_ROLE, (org_id, user_id))).fetchone()
    if row is None:
        if key_addressed:
            raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
        raise ApiError(403, "USER_NOT_MEMBER_OF_ORGANIZATION", "You are not a member of this organization")
    if not {role.strip() for role in (row[0] or "").split(",")} & ORG_MANAGERS:
        raise ApiError(403, "INSUFFICIENT_API_KEY_PERMISSIONS",
                       "You do not have permission to manage this organization's API keys")


async def _scope(conn: Any, caller: store.Session, config_id: str, stream: list[Any]) -> dict[str, Any]:
    """Whose key this command may touch: the caller's own (``default``) or, for ``org``, the key's organization
    once the caller is found to manage it. The domain then answers 404 unless referenceId and configId match."""
    if config_id == "org" and stream and stream[0].event.config_id == "org":
        org_id = stream[0].event.reference_id  # a key's owner never changes
        await _may_manage(conn, caller.user_id, org_id, key_addressed=True)
        return {"owner_id": org_id, "config_id": "org"}
    return {"config_id": config_id}


# --------------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------------
@post("/api-key/create", status_code=200, summary="Create an API key (returns the plaintext key once)")
async def create_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _rt(request)
    body = await _post_body(request)
    name = inputs.optional(body, "name", str, "string")
    prefix = inputs.optional(body, "prefix", str, "string")
    expires_in = _expires_in(body)
    config_id = _config_id(body)
    org_id = body.get("organizationId", MISSING)
    if org_id is not MISSING and config_id != "org":
        raise ApiError(400, "VALIDATION_ERROR", '[body.organizationId] Invalid input: requires configId "org"')
    if config_id == "org" and not (isinstance(org_id, str) and inputs.plausible_key_id(org_id)):
        raise validation("body.organizationId", "string", org_id)
    async with rt.pool.connection() as conn:
        session, _, is_server = await _identify(request, conn, body, code="UNAUTHORIZED_SESSION")
        if config_id == "org":
            await _may_manage(conn, session.user_id, org_id)
            if prefix is MISSING:
                prefix = ORG_KEY_PREFIX
        server_fields = _server_fields(body, is_server)
        metadata = _metadata(rt, body)
        if name is not MISSING and not 1 <= len(name) <= 32:
            raise ApiError(400, "INVALID_NAME_LENGTH", "The name length is either too large or too small.")
        if prefix is not MISSING and not (1 <= len(prefix) <= 32 and inputs.PREFIX_RE.fullmatch(prefix)):
            raise ApiError(400, "INVALID_PREFIX_LENGTH", "The prefix length is either too large or too small.")
        key = records.new_key(None if prefix is MISSING else prefix)
        key_id = records.new_key_id()
        command = CreateKey(
            actor_id=session.user_id, now=_now(), key_id=key_id, key_hash=records.hash_key(key), start=key[:6],
            prefix=None if prefix is MISSING else prefix, name=None if name is MISSING else name,
            expires_in=None if expires_in is MISSING else expires_in,
            metadata=None if metadata is MISSING else metadata, **server_fields,
            owner_id=org_id if config_id == "org" else None, config_id=config_id,
        )
        state, _ = await store.execute(conn, command, key_id, _actor(request, session), loaded=[],
                                       connect=_reconnect(rt))
    rt.nudge_relay()
    return {**records.from_state(state), "key": key}


@get("/api-key/get", summary="Get one of your API keys (without the key)")
async def get_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    params = dict(request.query_params)
    key_id = inputs.string_field(params, "id", required=True, where="query")
    async with _rt(request).pool.connection() as conn:
        session, _, _ = await _identify(request, conn, params, where="query")
        config_id = _config_id(params)
        if not inputs.plausible_key_id(key_id):
            raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
        cur = await conn.execute(GET_KEY, (key_id, config_id))
        row = await cur.fetchone()
        record = records.from_live_row(row) if row else None
        if record is not None and config_id == "org":
            await _may_manage(conn, session.user_id, record["referenceId"], key_addressed=True)
        elif record is not None and record["referenceId"] != session.user_id:
            record = None
    if record is None:
        raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    return record


def _non_negative_int(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise validation(f"query.{name}", "number", "NaN") from None
    if value < 0:
        raise ApiError(400, "VALIDATION_ERROR", f"[query.{name}] Too small: expected number to be >=0")
    if value > inputs.MAX_INT:
        raise ApiError(400, "VALIDATION_ERROR", f"[query.{name}] Too big: expected number to be <={inputs.MAX_INT}")
    return value


@get("/api-key/list", summary="List your API keys")
async def list_keys(request: Request[Any, Any, Any]) -> dict[str, Any]:
    params = dict(request.query_params)
    limit, offset = _non_negative_int(params, "limit"), _non_negative_int(params, "offset")
    sort_by = SORTABLE.get(params.get("sortBy") or "createdAt")
    direction = (params.get("sortDirection") or "asc").lower()
    if sort_by is None or direction not in ("asc", "desc"):
        raise ApiError(400, "VALIDATION_ERROR", "[query] Invalid sortBy or sortDirection")
    config_id = _config_id(params)
    org_id = params.get("organizationId")
    if config_id == "org" and not (org_id and inputs.plausible_key_id(org_id)):
        raise validation("query.organizationId", "string", org_id if org_id is not None else MISSING)
    async with _rt(request).pool.connection() as conn:
        session, _, _ = await _identify(request, conn, params, where="query")
        owner = session.user_id
        if config_id == "org":
            await _may_manage(conn, session.user_id, org_id)
            owner = org_id
        # sort_by and direction come from fixed whitelists above, never from the request verbatim.
        cur = await conn.execute(
            f"SELECT {records.LIVE_COLUMNS}, count(*) OVER () FROM {records.LIVE_FROM} "
            f"WHERE a.reference_id = %s AND a.config_id = %s ORDER BY a.{sort_by} {direction}, a.id "
            "LIMIT %s OFFSET %s",
            (owner, config_id, limit, offset or 0),
        )
        rows = await cur.fetchall()
        if rows:
            total = rows[0][-1]
        else:
            cur = await conn.execute(
                "SELECT count(*) FROM active_api_keys WHERE reference_id = %s AND config_id = %s",
                (owner, config_id),
            )
            total = (await cur.fetchone())[0]
    answer: dict[str, Any] = {"apiKeys": [records.from_live_row(r[:-1]) for r in rows], "total": total}
    if limit is not None:
        answer["limit"] = limit
    if offset is not None:
        answer["offset"] = offset
    return answer


@post("/api-key/update", status_code=200, summary="Update one of your API keys")
async def update_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _rt(request)
    body = await _post_body(request)
    key_id = inputs.string_field(body, "keyId", required=True)
    config_id = _config_id(body)
    name = inputs.optional(body, "name", str, "string")
    enabled = inputs.optional(body, "enabled", bool, "boolean")
    expires_in = _expires_in(body)
    plausible = inputs.plausible_key_id(key_id)
    async with rt.pool.connection() as conn:
        # Not _caller_and_key: better-auth validates the server fields, metadata and name before the 404.
        session, stream, is_server = await _identify(request, conn, body, key_id if plausible else None)
        server_fields = _server_fields(body, is_server)
        metadata = _metadata(rt, body)
        if name is not MISSING and not 1 <= len(name) <= 32:
            raise ApiError(400, "INVALID_NAME_LENGTH", "The name length is either too large or too small.")
        if not plausible:
            raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
        command = UpdateKey(
            actor_id=session.user_id, now=_now(), key_id=key_id, **await _scope(conn, session, config_id, stream),
            **{k: v for k, v in (("name", name), ("enabled", enabled), ("expires_in", expires_in),
                                 ("metadata", metadata)) if v is not MISSING},
            **server_fields,
        )
        state, recorded = await store.execute(conn, command, key_id, _actor(request, session), loaded=stream,
                                              connect=_reconnect(rt))
    if recorded:
        rt.nudge_relay()
    return records.from_state(state)


@post("/api-key/delete", status_code=200, summary="Revoke one of your API keys, immediately and for good")
async def delete_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _rt(request)
    body = await _post_body(request)
    key_id = inputs.string_field(body, "keyId", required=True)
    config_id = _config_id(body)
    async with rt.pool.connection() as conn:
        session, stream = await _caller_and_key(request, conn, body, key_id)
        command = RevokeKey(actor_id=session.user_id, now=_now(), key_id=key_id,
                            **await _scope(conn, session, config_id, stream))
        await store.execute(conn, command, key_id, _actor(request, session), loaded=stream,
                            connect=_reconnect(rt))
    rt.nudge_relay()
    return {"success": True}


@post("/api-key/rotate", status_code=200, summary="Issue a new secret for a key (returns it once)")
async def rotate_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The same key id gets a new secret (``ApiKeyRotated``); the previous secret keeps working for
    ``gracePeriodSeconds`` (default 0: it stops at once; at most 7 days), then stops everywhere. The new
    secret verifies as soon as this answers: the projection is updated in the appending statement.
    The key keeps its prefix, owner, limits and expiry. Revoked or someone else's: 404; disabled or expired:
    400 ``KEY_DISABLED`` / ``KEY_EXPIRED``.
    """
    rt = _rt(request)
    body = await _post_body(request)
    key_id = inputs.string_field(body, "keyId", required=True)
    config_id = _config_id(body)
    grace = _grace_period(body)
    async with rt.pool.connection() as conn:
        session, stream = await _caller_and_key(request, conn, body, key_id)
        # A key's prefix is set at creation and never changes, so the new secret can be drawn before deciding.
        prefix = stream[0].event.prefix if stream and isinstance(stream[0].event, ApiKeyCreated) else None
        key = records.new_key(prefix)
        command = RotateKey(actor_id=session.user_id, now=_now(), key_id=key_id, key_hash=records.hash_key(key),
                            start=key[:6], grace_seconds=grace, **await _scope(conn, session, config_id, stream))
        state, _ = await store.execute(conn, command, key_id, _actor(request, session), loaded=stream,
                                       connect=_reconnect(rt))
    rt.nudge_relay()
    return {**records.from_state(state), "key": key}


def _grace_period(body: dict[str, Any]) -> int:
    # Checked here as well as in the domain so that, like every body-schema error, it comes before the 401.
    value = _whole_number(body, "gracePeriodSeconds", GracePeriodOutOfRange.expected)
    if value is MISSING or value is None:
        return 0
    if not 0 <= value <= MAX_GRACE_PERIOD:
        raise GracePeriodOutOfRange()
    return value


@post("/api-key/verify", status_code=200, summary="Verify a key (for downstream services)")
async def verify_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """better-auth's verify answer: ``{"valid", "error", "key"}``, always HTTP 200 for a well-formed body.

    One statement (``keyledger_verify_key``, schema.sql) finds the key by hash in ``active_api_keys``, which the
    write path updates inline in the revoking transaction (once a delete has answered 200, this answers
    ``valid: false``), or as a superseded secret inside its rotation grace period (the record then carries
    ``graceUntil``); refuses it (disabled, expired, a requested permission not held); and counts the use of a
    key with a usage or rate limit. A valid key without limits writes nothing: its ``lastRequest`` is noted in
    memory and written in batches (usage.py), so it shows in get/list up to a flush interval later.
    """
    rt = _rt(request)
    body = inputs.require_object(inputs.parse_json(await request.body(), request.headers.get("content-type")))
    key = inputs.string_field(body, "key", required=True)
    wanted = body.get("permissions")
    if wanted is not None:
        try:
            wanted = msgspec.convert(wanted, dict[str, list[str]])
        except msgspec.ValidationError as exc:
            raise ApiError(400, "VALIDATION_ERROR", f"[body.permissions] Invalid input: {exc}") from None
        # As better-auth's role().authorize: every requested resource's actions must all be held (AND); an empty
        # request or an empty action list is refused, never vacuously held (keyledger_verify_key).
    now = _now()
    async with rt.pool.connection() as conn:
        cur = await conn.execute(VERIFY_KEY, (records.hash_key(key), now,
                                              None if wanted is None else msgspec.json.encode(wanted).decode()))
        code, try_again_in, grace_until, *row = await cur.fetchone()
    if code is not None:
        answer = _invalid(code, REFUSALS[code])
        if code == "RATE_LIMITED":
            answer["error"]["details"] = {"tryAgainIn": try_again_in}
        return answer
    record = records.from_live_row(row)
    if record["remaining"] is None and not record["rateLimitEnabled"]:  # nothing counted it: note the use
        rt.last_requests.note(record["id"], now)
        record["lastRequest"] = records.iso(now)
    if grace_until is not None:  # matched through a superseded secret (an extension field)
        record["graceUntil"] = records.iso(grace_until)
    return {"valid": True, "error": None, "key": record}


def _invalid(code: str, message: str) -> dict[str, Any]:
    return {"valid": False, "error": {"message": message, "code": code}, "key": None}


@get("/openapi.json", include_in_schema=False)
async def openapi_document() -> dict[str, Any]:
    return _OPENAPI


_OPENAPI = openapi.document()


@get("/api-key/history", summary="A key's lifecycle events, oldest first (owner only)")
async def key_history(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Ownership comes from the LOG (the ``ApiKeyCreated`` event's ``referenceId``), not from
    ``active_api_keys``: a revoked key is gone from the projection but its history is exactly what an owner
    wants to see. Anyone else, an unknown id and an implausible id get 404 ``KEY_NOT_FOUND``, like ``get``.
    """
    params, key_id, config_id = _owned_key_query(request)
    async with _rt(request).pool.connection() as conn:
        stream = await _owned_stream(request, conn, params, key_id, config_id)
        receipt = await receipts.read(conn, key_id)
    answer: dict[str, Any] = {"events": [msgspec.to_builtins(to_envelope(e)) for e in stream]}
    if receipt is not None:  # beside the revocation: when it took effect everywhere (api-key/revocation)
        answer["revocation"] = {k: receipt[k] for k in ("position", "type", "revokedAt", "effectiveEverywhereAt")}
        answer["revocation"]["caches"] = len(receipt["caches"])
    return answer


def _owned_key_query(request: Request[Any, Any, Any]) -> tuple[dict[str, Any], str, str]:
    """``?id=`` and ``configId`` of the owner-only reads (history, revocation), checked before any connection."""
    params = dict(request.query_params)
    return params, inputs.string_field(params, "id", required=True, where="query"), _config_id(params)


async def _owned_stream(request: Request[Any, Any, Any], conn: Any, params: dict[str, Any], key_id: str,
                        config_id: str) -> list[Any]:
    """The key's events, for its owner only. Ownership from the LOG (the ApiKeyCreated event's referenceId),
    so revoked keys stay readable by their owner; anyone else, and an unknown id, get 404 KEY_NOT_FOUND."""
    session, stream = await _caller_and_key(request, conn, params, key_id, where="query")
    created = stream[0].event if stream and isinstance(stream[0].event, ApiKeyCreated) else None
    if created is None or created.config_id != config_id:
        raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    if config_id == "org":  # the organization's owners and admins, like every other org-key endpoint
        await _may_manage(conn, session.user_id, created.reference_id, key_addressed=True)
    elif created.reference_id != session.user_id:
        raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    return stream


@get("/api-key/revocation", summary="When a revoked key stopped working in every cache (owner only)")
async def key_revocation(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The receipt of the key's latest revocation-like event (revoked, disabled, expired, rotated without grace):
    per cache, when keyledger heard it had applied the invalidation, and ``effectiveEverywhereAt`` once every
    cache live at that moment confirmed (projections/receipts.py). Who may ask: as for history; a key with no
    such event is 404 ``NOT_REVOKED``."""
    params, key_id, config_id = _owned_key_query(request)
    async with _rt(request).pool.connection() as conn:
        await _owned_stream(request, conn, params, key_id, config_id)
        answer = await receipts.read(conn, key_id)
    if answer is None:
        raise ApiError(404, "NOT_REVOKED", "This key has not been revoked, disabled or expired")
    return answer


@get("/health", summary="Liveness: the database answers", include_in_schema=True)
async def health(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _rt(request)
    async with rt.pool.connection() as conn:
        await conn.execute("SELECT 1")
    return {"ok": True, "nats": rt.bus.connected}


@get("/ready", summary="Readiness: this deployment propagates revocations now (metrics.py)")
async def ready(request: Request[Any, Any, Any]) -> dict[str, Any]:
    figures = await Figures.gather(_rt(request))
    reasons = figures.reasons()
    if reasons:
        raise ApiError(503, "NOT_READY", "; ".join(reasons), reasons=reasons)
    return {"ready": True, "checkpointAgeSeconds": round(figures.checkpoint_age, 3),
            "outboxDepth": figures.outbox_depth, "leader": figures.leader}


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(await request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


# --------------------------------------------------------------------------------------------------------
# The one exception-to-response mapping
# --------------------------------------------------------------------------------------------------------
_HTTP_CODES = {
    400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 429: "TOO_MANY_REQUESTS",
}


def _json_error(status: int, code: str, message: str, **extra: object) -> Response[dict[str, Any]]:
    return Response({"message": message, "code": code, **extra}, status_code=status)


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, ApiError):
        return _json_error(exc.status, exc.code, exc.message, **exc.extra)
    if isinstance(exc, DomainError):
        return _json_error(exc.status, exc.code, exc.message)
    if isinstance(exc, store.OutcomeUnknown):
        log.warning("write outcome unknown: the database connection failed after the change was sent")
        return _json_error(503, "OUTCOME_UNKNOWN", "The database connection failed after the change was sent and "
                           "it could not be found out whether it was applied; check before retrying")
    if isinstance(exc, store.EventTooLarge):
        return _json_error(413, "EVENT_TOO_LARGE", "The change would make an event larger than keyledger stores")
    if isinstance(exc, store.ConcurrencyConflict):
        return _json_error(409, "CONFLICT", "The key is being changed concurrently; try again")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        log.warning("database is read-only (a standby, or a failover in progress)")
        return _json_error(503, "SERVICE_UNAVAILABLE", "The database is read-only (a standby, or a failover in "
                           "progress); nothing was changed")
    if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
        log.warning("database unavailable: %s", type(exc).__name__)
        return _json_error(503, "SERVICE_UNAVAILABLE", "The database is unavailable; nothing was changed")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 413:
            return _json_error(413, "PAYLOAD_TOO_LARGE", "Request body is too large")
        if status == 404:
            return _json_error(404, "NOT_FOUND", "Not found")
        if status == 405:
            return _json_error(405, "METHOD_NOT_ALLOWED", "Method not allowed")
        return _json_error(status, _HTTP_CODES.get(status, "HTTP_ERROR"), str(exc.detail))
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json_error(HTTP_500_INTERNAL_SERVER_ERROR, "INTERNAL_SERVER_ERROR", "Internal server error")


def create_app(settings: Settings, runtime: Runtime | None = None) -> Litestar:
    """The ASGI app. The lifespan opens the pool and NATS and starts the relay and projections."""
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        # Everything allocated so far (modules, the app, pools) lives as long as the process: move it out of
        # the cyclic collector's reach, so its full collections during requests have less to walk. (Revoke
        # p99 at c=16: 29.6 ms in one run without, 25.6-27.8 ms in four runs with; a noisy machine.)
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await runtime.stop()

    api = Router(path="/api/auth", route_handlers=API_ROUTES)
    counted = Metrics(runtime)
    app = Litestar(
        route_handlers=[api, health, ready, metrics, openapi_document],
        lifespan=[lifespan],
        state=State({"runtime": runtime, "metrics": counted}),
        exception_handlers={Exception: error_response},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,  # the document is openapi.py's, served at /openapi.json
        logging_config=None,
    )
    # Requests are counted around Litestar's own exception handling (every answer as sent, an unknown path's 404
    # too), not by a Litestar middleware: any route middleware makes Litestar wrap every route in a second
    # exception handler (one more send wrapper and coroutine per request).
    app.asgi_handler = counted.middleware(app.asgi_handler)
    return app


def create_app_from_env() -> Litestar:
    """Factory for ``uvicorn --factory`` worker processes: everything comes from the environment."""
    return create_app(Settings.from_env())


API_ROUTES = [create_key, get_key, list_keys, update_key, delete_key, rotate_key, verify_key, key_history,
              key_revocation]
