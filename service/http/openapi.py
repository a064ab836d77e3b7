"""The OpenAPI document, built from msgspec Structs that describe the wire shapes.

Handlers parse their bodies by hand (to reproduce better-auth's error precedence exactly), so the framework
cannot infer request bodies; rather than publish a document that says "no body", we describe each endpoint
here, next to nothing else, and a test checks that every route is documented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ..core.domain import MAX_EXPIRES_IN, MAX_GRACE_PERIOD, MIN_EXPIRES_IN


class Error(msgspec.Struct):
    message: str
    code: str


class KeyRecord(msgspec.Struct, rename="camel"):
    id: str
    config_id: str
    name: str | None
    start: str | None
    prefix: str | None
    reference_id: str
    enabled: bool
    expires_at: str | None
    created_at: str
    updated_at: str
    refill_interval: int | None
    refill_amount: int | None
    last_refill_at: str | None
    rate_limit_enabled: bool
    rate_limit_time_window: int | None
    rate_limit_max: int | None
    request_count: int
    remaining: int | None
    last_request: str | None
    permissions: dict[str, list[str]] | None
    metadata: dict[str, Any] | None


class CreatedKey(KeyRecord, rename="camel"):
    key: str  # the plaintext key: returned by create only, never again


ConfigId = Literal["default", "org"]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Prefix = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern="^[a-zA-Z0-9_-]+$")]
ExpiresIn = Annotated[int, msgspec.Meta(ge=MIN_EXPIRES_IN, le=MAX_EXPIRES_IN,
                                        description="seconds from now; null: never")]
GracePeriod = Annotated[int, msgspec.Meta(ge=0, le=MAX_GRACE_PERIOD,
                                          description="seconds the previous secret keeps working (default 0)")]


class CreateBody(msgspec.Struct, rename="camel", omit_defaults=True):
    config_id: ConfigId | None = None
    organization_id: str | None = None  # with configId "org"
    name: Name | None = None
    prefix: Prefix | None = None
    expires_in: ExpiresIn | None = None
    metadata: dict[str, Any] | None = None  # refused (METADATA_DISABLED) unless KEYLEDGER_ENABLE_METADATA=1


class UpdateBody(msgspec.Struct, rename="camel", omit_defaults=True):
    key_id: str
    config_id: ConfigId | None = None
    name: Name | None = None
    enabled: bool | None = None
    expires_in: ExpiresIn | None = None
    metadata: dict[str, Any] | None = None


class DeleteBody(msgspec.Struct, rename="camel", omit_defaults=True):
    key_id: str
    config_id: ConfigId | None = None


class RotateBody(msgspec.Struct, rename="camel", omit_defaults=True):
    key_id: str
    config_id: ConfigId | None = None
    grace_period_seconds: GracePeriod | None = None


class Success(msgspec.Struct):
    success: bool


class ListAnswer(msgspec.Struct, rename="camel", omit_defaults=True):
    api_keys: list[KeyRecord]
    total: int
    limit: int | None = None
    offset: int | None = None


class VerifyBody(msgspec.Struct):
    key: str


class VerifiedKey(KeyRecord, rename="camel", omit_defaults=True):
    grace_until: str | None = None  # only when the key was a superseded secret, still inside its grace period


class VerifyAnswer(msgspec.Struct):
    valid: bool
    error: Error | None
    key: VerifiedKey | None


class Envelope(msgspec.Struct, rename="camel"):
    id: str
    type: str
    key_id: str
    version: int
    position: int
    occurred_at: str
    actor: dict[str, Any]
    data: dict[str, Any]


class History(msgspec.Struct):
    events: list[Envelope]


class CacheReceipt(msgspec.Struct, rename="camel"):
    cache_id: str
    service: str
    effective_at: str | None  # when keyledger heard this cache had applied the revocation
    last_seen_at: str | None
    state: Literal["confirmed", "pending", "gone"]


class Revocation(msgspec.Struct, rename="camel"):
    key_id: str
    position: int
    type: str  # ApiKeyRevoked, ApiKeyDisabled, ApiKeyExpired or ApiKeyRotated (without grace)
    revoked_at: str
    effective_everywhere_at: str | None  # null while a live cache has not confirmed
    caches: list[CacheReceipt]


class Health(msgspec.Struct):
    ok: bool
    nats: bool


class Ready(msgspec.Struct, rename="camel"):
    ready: bool
    checkpoint_age_seconds: float  # age of this process's freshness proof (docs/architecture.md, "Freshness")
    outbox_depth: int
    leader: bool  # this process runs the background work


class NotReady(msgspec.Struct):
    message: str
    code: str  # NOT_READY
    reasons: list[str]


_STRUCTS = [Error, KeyRecord, CreatedKey, CreateBody, UpdateBody, DeleteBody, RotateBody, Success, ListAnswer, VerifyBody,
            VerifyAnswer, Envelope, History, Health, Ready, NotReady, CacheReceipt, Revocation]
_COOKIE = [{"betterAuthSession": []}]


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{struct.__name__}"}


def _json(struct: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(struct)}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {status: _json(Error, text) for status, text in (c.split(" ", 1) for c in codes)}


def _query(name: str, kind: str, required: bool = False, description: str = "", **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": {"type": kind, **schema},
            "description": description}


_PAGE = {"minimum": 0, "maximum": 2**31 - 1}
_ORG_403 = "403 org keys: USER_NOT_MEMBER_OF_ORGANIZATION, INSUFFICIENT_API_KEY_PERMISSIONS"
_DB_503 = "503 database unavailable (SERVICE_UNAVAILABLE)"
_CONFIG_ID = _query("configId", "string", enum=["default", "org"])


COMMON_POST_ERRORS = ("400 malformed JSON (BAD_REQUEST) or body schema (VALIDATION_ERROR)",
                      "403 cookie sent without a trusted Origin (MISSING_OR_NULL_ORIGIN, INVALID_ORIGIN); org keys:"
                      " USER_NOT_MEMBER_OF_ORGANIZATION, INSUFFICIENT_API_KEY_PERMISSIONS",
                      "401 no valid session (UNAUTHORIZED), banned user (USER_BANNED)",
                      "413 body over 64 KiB (PAYLOAD_TOO_LARGE), or the change would make an event over 256 KiB"
                      " (EVENT_TOO_LARGE)", "415 not JSON (UNSUPPORTED_MEDIA_TYPE)",
                      "431 request headers over 16 KiB (REQUEST_HEADER_FIELDS_TOO_LARGE)",
                      "503 database unavailable, nothing was changed (SERVICE_UNAVAILABLE), or the connection failed"
                      " after the change was sent and its outcome could not be found out (OUTCOME_UNKNOWN)")


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_STRUCTS, ref_template="#/components/schemas/{name}")

    def post(summary: str, body: type, ok: type, *errors: str) -> dict[str, Any]:
        return {"post": {
            "summary": summary, "security": _COOKIE,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {"200": _json(ok, "success"), **_errors(*COMMON_POST_ERRORS, *errors)},
        }}

    paths = {
        "/api/auth/api-key/create": post(
            "Create an API key; the answer carries the plaintext key, once", CreateBody, CreatedKey,
            "401 no session (UNAUTHORIZED_SESSION)"),
        "/api/auth/api-key/update": post("Update one of your keys (name, enabled, expiresIn, metadata)",
                                         UpdateBody, KeyRecord, "404 not yours or unknown (KEY_NOT_FOUND)"),
        "/api/auth/api-key/delete": post("Revoke one of your keys, immediately and permanently", DeleteBody,
                                         Success, "404 not yours, unknown or already revoked (KEY_NOT_FOUND)",
                                         "409 changed concurrently too often (CONFLICT)"),
        "/api/auth/api-key/rotate": post(
            "Issue a new secret for one of your keys; the answer carries it, once. The previous secret keeps "
            "working for gracePeriodSeconds (default 0)", RotateBody, CreatedKey,
            "400 malformed JSON (BAD_REQUEST), body schema (VALIDATION_ERROR), disabled or expired key "
            "(KEY_DISABLED, KEY_EXPIRED)",
            "404 not yours, unknown or revoked (KEY_NOT_FOUND)", "409 changed concurrently too often (CONFLICT)"),
        "/api/auth/api-key/get": {"get": {
            "summary": "One of your keys, without the key", "security": _COOKIE,
            "parameters": [_query("id", "string", True), _CONFIG_ID],
            "responses": {"200": _json(KeyRecord, "the key"),
                          **_errors("400 missing id (VALIDATION_ERROR)", "401 no session (UNAUTHORIZED)", _ORG_403,
                                    "404 not yours or unknown (KEY_NOT_FOUND)", _DB_503)},
        }},
        "/api/auth/api-key/list": {"get": {
            "summary": "Your keys", "security": _COOKIE,
            "parameters": [_query("limit", "integer", **_PAGE), _query("offset", "integer", **_PAGE),
                           _query("sortBy", "string",
                                  enum=["createdAt", "updatedAt", "name", "expiresAt", "enabled", "id"]),
                           _query("sortDirection", "string", enum=["asc", "desc"]),
                           _CONFIG_ID, _query("organizationId", "string", description='with configId "org"')],
            "responses": {"200": _json(ListAnswer, "keys"),
                          **_errors("400 bad paging (VALIDATION_ERROR)", "401 no session (UNAUTHORIZED)", _ORG_403,
                                    _DB_503)},
        }},
        "/api/auth/api-key/verify": {"post": {
            "summary": "Verify a key (for downstream services); HTTP 200 with valid=false for bad keys",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(VerifyBody)}}},
            "responses": {"200": _json(VerifyAnswer, "INVALID_API_KEY, KEY_DISABLED or KEY_EXPIRED when invalid"),
                          **_errors("400 body schema (VALIDATION_ERROR)", "503 database unavailable")},
        }},
        "/api/auth/api-key/history": {"get": {
            "summary": "One of your keys' lifecycle events, oldest first (revoked keys included)",
            "security": _COOKIE, "parameters": [_query("id", "string", True), _CONFIG_ID],
            "responses": {"200": _json(History, "the events, as on NATS"),
                          **_errors("400 missing id (VALIDATION_ERROR)", "401 no session (UNAUTHORIZED)", _ORG_403,
                                    "404 not yours or unknown (KEY_NOT_FOUND)", _DB_503)},
        }},
        "/api/auth/api-key/revocation": {"get": {
            "summary": "When one of your keys' latest revocation (or disable, expiry, rotation without grace) took "
                       "effect in every cache",
            "security": _COOKIE, "parameters": [_query("id", "string", True), _CONFIG_ID],
            "responses": {"200": _json(Revocation, "the receipt"),
                          **_errors("400 missing id (VALIDATION_ERROR)", "401 no session (UNAUTHORIZED)", _ORG_403,
                                    "404 not yours or unknown (KEY_NOT_FOUND), or never revoked (NOT_REVOKED)",
                                    _DB_503)},
        }},
        "/health": {"get": {"summary": "Liveness: the database answers; whether NATS is connected",
                            "responses": {"200": _json(Health, "healthy"),
                                          **_errors("503 database unavailable (SERVICE_UNAVAILABLE)")}}},
        "/ready": {"get": {"summary": "Readiness: revocations propagate now (database writable, NATS connected, "
                                      "a fresh freshness proof, no old unpublished event)",
                           "responses": {"200": _json(Ready, "ready"),
                                         "503": _json(NotReady, "not ready, with the reasons (NOT_READY)")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)",
                             "responses": {"200": {"description": "metrics",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "keyledger", "version": "0.1.0",
                 "description": "better-auth-compatible API-key service on an event-sourced core"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"betterAuthSession": {"type": "apiKey", "in": "cookie",
                                                      "name": "better-auth.session_token"}},
        },
    }
