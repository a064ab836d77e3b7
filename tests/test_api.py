"""The better-auth-compatible API over real HTTP, real Postgres and real NATS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from typing import Any
from urllib.parse import unquote

import httpx
import psycopg
import pytest

from harness import Service, count_events, read_stream_messages, wait_until
from keyledger.core.records import hash_key

RECORD_FIELDS = {
    "configId", "name", "start", "referenceId", "prefix", "refillInterval", "refillAmount", "lastRefillAt",
    "enabled", "rateLimitEnabled", "rateLimitTimeWindow", "rateLimitMax", "requestCount", "remaining",
    "lastRequest", "expiresAt", "createdAt", "updatedAt", "permissions", "metadata", "id",
}


def test_create_returns_the_key_once_and_stores_only_its_hash(service: Service, alice: dict[str, str], db: Any) -> None:
    created = service.create_key(alice, name="ci", prefix="pk_", expiresIn=7 * 86400)
    key = created["key"]
    assert set(created) == RECORD_FIELDS | {"key"}
    assert key.startswith("pk_") and len(key) == 3 + 64 and key[3:].isalpha()
    assert created["start"] == key[:6] and created["prefix"] == "pk_" and created["name"] == "ci"
    assert created["referenceId"] == alice["x-test-user-id"]
    assert created["expiresAt"].endswith("Z") and created["createdAt"].endswith("Z")
    assert len(created["id"]) == 32 and created["id"].isalnum()

    stored = db.execute("SELECT key_hash FROM active_api_keys WHERE id = %s", (created["id"],)).fetchone()[0]
    assert stored == hash_key(key) and len(stored) == 43
    # The plaintext is nowhere in the database.
    dump = db.execute("SELECT string_agg(data::text || metadata::text, '') FROM events").fetchone()[0]
    assert key not in dump and hash_key(key) in dump

    got = service.get("api-key/get", alice, params={"id": created["id"]})
    assert got.status_code == 200 and "key" not in got.json() and got.json()["id"] == created["id"]


def test_delete_is_immediate_permanent_and_published(service: Service, alice: dict[str, str], db: Any) -> None:
    created = service.create_key(alice, name="doomed")
    assert service.verify(created["key"])["valid"] is True

    response = service.delete(alice, created["id"])
    assert response.status_code == 200 and response.json() == {"success": True}
    # No window: the very next verify (no sleep) already refuses the key.
    assert service.verify(created["key"]) == {
        "valid": False, "error": {"message": "Invalid API key.", "code": "INVALID_API_KEY"}, "key": None,
    }
    again = service.delete(alice, created["id"])
    assert again.status_code == 404 and again.json() == {"message": "API Key not found", "code": "KEY_NOT_FOUND"}
    assert service.get("api-key/get", alice, params={"id": created["id"]}).status_code == 404

    types = [r[0] for r in db.execute("SELECT type FROM events WHERE stream_id = %s ORDER BY version", (created["id"],))]
    assert types == ["ApiKeyCreated", "ApiKeyRevoked"]
    wait_until(lambda: db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, what="outbox drained")

    messages = [m for m in read_stream_messages(service.nats_url, service.topology.events_stream)
                if m.subject.endswith(created["id"])]
    assert [m.subject for m in messages] == [
        f"{service.topology.prefix}.events.created.{created['id']}",
        f"{service.topology.prefix}.events.revoked.{created['id']}",
    ]
    envelope = json.loads(messages[1].data)
    assert set(envelope) == {"id", "type", "keyId", "version", "position", "occurredAt", "actor", "data"}
    assert envelope["type"] == "ApiKeyRevoked" and envelope["version"] == 2 and envelope["keyId"] == created["id"]
    assert envelope["actor"]["userId"] == alice["x-test-user-id"] and envelope["actor"]["sessionId"]
    assert envelope["data"] == {"keyHash": hash_key(created["key"])}
    assert messages[1].headers["Nats-Msg-Id"] == envelope["id"]
    assert all(created["key"].encode() not in m.data for m in messages)


def test_list_get_and_update(service: Service, db: Any) -> None:
    me = service.session()
    a = service.create_key(me, name="a")
    b = service.create_key(me, name="b")
    listed = service.get("api-key/list", me).json()
    assert listed["total"] == 2 and [k["id"] for k in listed["apiKeys"]] == [a["id"], b["id"]]
    assert all("key" not in k for k in listed["apiKeys"])
    page = service.get("api-key/list", me, params={"limit": 1, "offset": 1, "sortBy": "createdAt",
                                                   "sortDirection": "desc"}).json()
    assert page == {"apiKeys": [service.get("api-key/get", me, params={"id": a["id"]}).json()],
                    "total": 2, "limit": 1, "offset": 1}
    bad = service.get("api-key/list", me, params={"limit": -1})
    assert bad.status_code == 400 and bad.json()["code"] == "VALIDATION_ERROR"

    # enabled + name in one request: ApiKeyDisabled and ApiKeyUpdated, one transaction.
    updated = service.post("api-key/update", me, json={"keyId": a["id"], "enabled": False, "name": "renamed"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["enabled"] is False and updated.json()["name"] == "renamed"
    rows = db.execute("SELECT type, data, recorded_at FROM events WHERE stream_id = %s ORDER BY version",
                      (a["id"],)).fetchall()
    assert [r[0] for r in rows] == ["ApiKeyCreated", "ApiKeyDisabled", "ApiKeyUpdated"]
    assert rows[2][1]["name"] == "renamed" and rows[1][2] == rows[2][2]
    assert service.verify(a["key"])["error"]["code"] == "KEY_DISABLED"

    none = service.post("api-key/update", me, json={"keyId": a["id"]})
    assert none.status_code == 400 and none.json()["code"] == "NO_VALUES_TO_UPDATE"
    same = service.post("api-key/update", me, json={"keyId": a["id"], "enabled": False})
    assert same.status_code == 200 and count_events(service.database_url, a["id"]) == 3  # no-op: no event
    enabled = service.post("api-key/update", me, json={"keyId": a["id"], "enabled": True})
    assert enabled.json()["enabled"] is True and service.verify(a["key"])["valid"] is True

    short = service.post("api-key/update", me, json={"keyId": a["id"], "expiresIn": 60})
    assert short.status_code == 400 and short.json()["code"] == "EXPIRES_IN_IS_TOO_SMALL"
    server_only = service.post("api-key/update", me, json={"keyId": a["id"], "remaining": 5})
    assert server_only.status_code == 400 and server_only.json()["code"] == "SERVER_ONLY_PROPERTY"


def test_another_users_key_is_not_found(service: Service, alice: dict[str, str], bob: dict[str, str]) -> None:
    key = service.create_key(alice, name="alice's")
    not_found = {"message": "API Key not found", "code": "KEY_NOT_FOUND"}
    for response in (
        service.delete(bob, key["id"]),
        service.post("api-key/update", bob, json={"keyId": key["id"], "name": "mine"}),
        service.get("api-key/get", bob, params={"id": key["id"]}),
    ):
        assert response.status_code == 404 and response.json() == not_found
    assert service.get("api-key/list", bob).json() == {"apiKeys": [], "total": 0}
    assert service.verify(key["key"])["valid"] is True
    assert count_events(service.database_url, key["id"]) == 1


@pytest.mark.parametrize(
    "cookie",
    [None, "forged", "unsigned", "expired", "unknown"],
)
def test_no_valid_session_is_401(service: Service, alice: dict[str, str], cookie: str | None) -> None:
    key = service.create_key(alice)
    headers = {"origin": service.origin}
    token_cookie = alice["cookie"]
    if cookie == "forged":
        headers["cookie"] = token_cookie[:-6] + "AAAA%3D"
    elif cookie == "unsigned":
        # The session's real token, as the cookie value, without its ".<signature>": a live session that
        # only lacks the HMAC. (The cookie *name* also contains dots, so split on the value's last dot.)
        name, _, value = token_cookie.partition("=")
        token = unquote(value).rpartition(".")[0]
        assert token and name == "better-auth.session_token"
        headers["cookie"] = f"{name}={token}"
    elif cookie == "expired":
        headers = {k: v for k, v in service.session(expires_in="-1 minute").items() if k != "x-test-user-id"}
    elif cookie == "unknown":
        from keyledger.http.auth import cookie_value

        headers["cookie"] = f"better-auth.session_token={cookie_value('A' * 32, service.secret)}"
    response = service.delete(headers, key["id"])
    assert response.status_code == 401 and response.json() == {"message": "Unauthorized", "code": "UNAUTHORIZED"}
    assert service.verify(key["key"])["valid"] is True
    no_session_create = service.post("api-key/create", headers, json={})
    assert no_session_create.status_code == 401
    assert no_session_create.json()["code"] == "UNAUTHORIZED_SESSION"


def test_secure_cookie_name_is_accepted(service: Service, alice: dict[str, str]) -> None:
    key = service.create_key(alice)
    headers = {"origin": service.origin, "cookie": "__Secure-" + alice["cookie"]}
    assert service.delete(headers, key["id"]).status_code == 200


def test_banned_user_gets_user_banned(service: Service) -> None:
    banned = service.session(banned=True)
    response = service.post("api-key/create", banned, json={})
    assert response.status_code == 401 and response.json()["code"] == "USER_BANNED"


def test_origin_check(service: Service, alice: dict[str, str]) -> None:
    key = service.create_key(alice)
    cookie_only = {"cookie": alice["cookie"]}
    missing = service.delete(cookie_only, key["id"])
    assert missing.status_code == 403 and missing.json() == {"message": "Missing or null Origin",
                                                             "code": "MISSING_OR_NULL_ORIGIN"}
    evil = service.delete({**cookie_only, "origin": "http://evil.example"}, key["id"])
    assert evil.status_code == 403 and evil.json() == {"message": "Invalid origin", "code": "INVALID_ORIGIN"}
    null = service.delete({**cookie_only, "origin": "null"}, key["id"])
    assert null.status_code == 403 and null.json()["code"] == "MISSING_OR_NULL_ORIGIN"
    via_referer = service.delete({**cookie_only, "referer": f"{service.origin}/settings/keys"}, key["id"])
    assert via_referer.status_code == 200


def test_error_precedence_matches_better_auth(service: Service, alice: dict[str, str]) -> None:
    cookie_only = {"cookie": alice["cookie"], "content-type": "application/json"}
    with_origin = {"origin": service.origin, "content-type": "application/json"}
    cases = [
        # (headers, body, status, code)
        (with_origin, b'{"keyId": ', 400, "BAD_REQUEST"),  # no cookie + malformed JSON
        (with_origin, b"{}", 400, "VALIDATION_ERROR"),  # no cookie + missing keyId: schema before session
        (cookie_only, b'{"keyId": ', 400, "BAD_REQUEST"),  # cookie, no Origin + malformed JSON
        (cookie_only, b"{}", 403, "MISSING_OR_NULL_ORIGIN"),  # cookie, no Origin + missing keyId
        (with_origin, b'{"keyId": "x"}', 401, "UNAUTHORIZED"),
    ]
    for headers, body, status, code in cases:
        response = httpx.post(f"{service.url}/api/auth/api-key/delete", content=body, headers=headers)
        assert (response.status_code, response.json()["code"]) == (status, code), body
    missing = httpx.post(f"{service.url}/api/auth/api-key/delete", content=b'{}', headers=with_origin)
    assert missing.json()["message"] == "[body.keyId] Invalid input: expected string, received undefined"


BAD_BODIES: list[tuple[str, bytes, str, int]] = [
    ("malformed JSON", b'{"keyId": "abc"', "application/json", 400),
    ("missing keyId", b"{}", "application/json", 400),
    ("number keyId", b'{"keyId": 123}', "application/json", 400),
    ("null keyId", b'{"keyId": null}', "application/json", 400),
    ("array keyId", b'{"keyId": ["a"]}', "application/json", 400),
    ("object keyId", b'{"keyId": {"$ne": 1}}', "application/json", 400),
    ("null body", b"null", "application/json", 400),
    ("array body", b'[{"keyId": "a"}]', "application/json", 400),
    ("string body", b'"keyId"', "application/json", 400),
    ("NUL in keyId", b'{"keyId": "abc\\u0000def"}', "application/json", 400),
    ("NUL in key name", b'{"keyId": "abc", "\\u0000": 1}', "application/json", 400),
    ("SQL-looking keyId", b"""{"keyId": "x' OR '1'='1"}""", "application/json", 404),
    ("SQL-looking keyId 2", b'{"keyId": "x; DELETE FROM events; --"}', "application/json", 404),
    ("NATS wildcard keyId", b'{"keyId": "*"}', "application/json", 404),
    ("NATS tail wildcard keyId", b'{"keyId": ">"}', "application/json", 404),
    ("NATS subject keyId", b'{"keyId": "a.b.>"}', "application/json", 404),
    ("empty keyId", b'{"keyId": ""}', "application/json", 404),
    ("huge keyId", b'{"keyId": "' + b"a" * 5000 + b'"}', "application/json", 404),
    ("text/plain", b'{"keyId": "abc"}', "text/plain", 415),
    ("form", b"keyId=abc", "application/x-www-form-urlencoded", 415),
    ("empty body", b"", "", 400),
    ("over 64 KiB", b'{"keyId": "' + b"a" * (70 * 1024) + b'"}', "application/json", 413),
    ("deeply nested", b'{"keyId": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 413),
    ("invalid UTF-8", b'{"keyId": "\xff\xfe"}', "application/json", 400),
]


@pytest.mark.parametrize("endpoint", ["delete", "rotate"])
@pytest.mark.parametrize("label,body,content_type,status", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_is_a_clear_4xx_and_writes_nothing(service: Service, alice: dict[str, str], label: str,
                                                     body: bytes, content_type: str, status: int,
                                                     endpoint: str) -> None:
    victim = service.create_key(alice, name="victim")
    before = count_events(service.database_url)
    headers = {"cookie": alice["cookie"], "origin": service.origin}
    if content_type:
        headers["content-type"] = content_type
    response = httpx.post(f"{service.url}/api/auth/api-key/{endpoint}", content=body, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert set(error) == {"message", "code"} and error["message"] and error["code"].isupper()
    assert count_events(service.database_url) == before
    assert service.verify(victim["key"])["valid"] is True


def test_framework_errors_are_json(service: Service, alice: dict[str, str]) -> None:
    for response, status, code in (
        (httpx.get(f"{service.url}/api/auth/nope"), 404, "NOT_FOUND"),
        (httpx.get(f"{service.url}/api/auth/api-key/delete", headers=alice), 405, "METHOD_NOT_ALLOWED"),
        (httpx.put(f"{service.url}/api/auth/api-key/create", headers=alice), 405, "METHOD_NOT_ALLOWED"),
    ):
        assert response.status_code == status
        assert response.json()["code"] == code and response.json()["message"]


def test_verify_rejects_bad_bodies(service: Service) -> None:
    for body, status in ((b"{}", 400), (b'{"key": 5}', 400), (b"nope", 400), (b'{"key": "nope"}', 200)):
        response = httpx.post(f"{service.url}/api/auth/api-key/verify", content=body,
                              headers={"content-type": "application/json"})
        assert response.status_code == status
    assert service.verify("x" * 64)["error"]["code"] == "INVALID_API_KEY"


def test_sixteen_concurrent_deletes_one_wins(service: Service, alice: dict[str, str], db: Any) -> None:
    key = service.create_key(alice, name="contended")

    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=20,
                                     limits=httpx.Limits(max_connections=16)) as client:
            responses = await asyncio.gather(*(
                client.post("/api/auth/api-key/delete", json={"keyId": key["id"]}, headers=alice)
                for _ in range(16)
            ))
        return [r.status_code for r in responses]

    statuses = asyncio.run(storm())
    assert sorted(statuses) == [200] + [404] * 15
    assert count_events(service.database_url, key["id"], "ApiKeyRevoked") == 1
    versions = [r[0] for r in db.execute("SELECT version FROM events WHERE stream_id = %s ORDER BY version",
                                         (key["id"],))]
    assert versions == [1, 2]


def test_concurrent_updates_never_lose_an_event(service: Service, alice: dict[str, str], db: Any) -> None:
    key = service.create_key(alice, name="busy")

    async def flips() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=20) as client:
            responses = await asyncio.gather(*(
                client.post("/api/auth/api-key/update", json={"keyId": key["id"], "name": f"n{i}"}, headers=alice)
                for i in range(12)
            ))
        return [r.status_code for r in responses]

    assert asyncio.run(flips()) == [200] * 12
    versions = [r[0] for r in db.execute("SELECT version FROM events WHERE stream_id = %s ORDER BY version",
                                         (key["id"],))]
    assert versions == list(range(1, 14))  # created + 12 renames, gapless
    name = db.execute("SELECT name FROM active_api_keys WHERE id = %s", (key["id"],)).fetchone()[0]
    last = db.execute("SELECT data->>'name' FROM events WHERE stream_id = %s ORDER BY version DESC LIMIT 1",
                      (key["id"],)).fetchone()[0]
    assert name == last


def test_event_log_is_append_only_even_for_its_owner(service: Service, alice: dict[str, str]) -> None:
    service.create_key(alice)
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        for statement in ("UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events CASCADE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] > 0


def test_history_cli(service: Service, alice: dict[str, str]) -> None:
    key = service.create_key(alice, name="audited")
    service.post("api-key/update", alice, json={"keyId": key["id"], "enabled": False})
    service.delete(alice, key["id"])
    env = service.env()
    run = lambda *args: subprocess.run([sys.executable, "-m", "keyledger.cli", "history", *args], env=env,
                                       capture_output=True, text=True, timeout=30)
    text = run(key["id"])
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.strip().splitlines() if line[:1] == "v" and line[1:2].isdigit()]
    assert [line.split()[2] for line in lines] == ["created", "disabled", "revoked"]
    assert alice["x-test-user-id"] in lines[2] and key["key"] not in text.stdout

    as_json = run(key["id"], "--json")
    envelopes = [json.loads(line) for line in as_json.stdout.strip().splitlines()]
    assert [e["version"] for e in envelopes] == [1, 2, 3]
    assert [e["type"] for e in envelopes] == ["ApiKeyCreated", "ApiKeyDisabled", "ApiKeyRevoked"]

    unknown = run("doesnotexist")
    assert unknown.returncode == 1 and "doesnotexist" in unknown.stderr and unknown.stdout == ""


def test_write_path_catches_up_a_projection_that_is_behind(service: Service, alice: dict[str, str], db: Any) -> None:
    """After a projection reset the inline apply finds no tracking row at version n-1 (KL409) and falls back to
    catching the key up from the log in the same transaction: the answer still reflects the whole history."""
    key = service.create_key(alice, name="reset-me")
    with db.transaction():
        db.execute("DELETE FROM active_api_keys WHERE id = %s", (key["id"],))
        db.execute("DELETE FROM projection_tracking WHERE stream_id = %s", (key["id"],))
    # The subscriber may or may not have rebuilt it meanwhile (it only acts on new messages); either way:
    response = service.post("api-key/update", alice, json={"keyId": key["id"], "enabled": False})
    assert response.status_code == 200, response.text
    row = db.execute("SELECT enabled, version, name FROM active_api_keys WHERE id = %s", (key["id"],)).fetchone()
    assert row == (False, 2, "reset-me")
    tracked = db.execute("SELECT version FROM projection_tracking WHERE stream_id = %s AND projection = %s",
                         (key["id"], "active_api_keys")).fetchone()
    assert tracked == (2,)
    assert service.verify(key["key"])["error"]["code"] == "KEY_DISABLED"


def test_openapi_documents_every_route(service: Service) -> None:
    doc = httpx.get(f"{service.url}/openapi.json").json()
    for path in ("create", "get", "list", "update", "delete", "rotate", "verify", "history"):
        assert f"/api/auth/api-key/{path}" in doc["paths"]
    delete = doc["paths"]["/api/auth/api-key/delete"]["post"]
    body = delete["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert doc["components"]["schemas"][body]["required"] == ["keyId"]
    assert {"200", "400", "401", "403", "404"} <= set(delete["responses"])


def test_history_endpoint_is_owner_only_and_outlives_revocation(service: Service, alice: dict[str, str],
                                                                bob: dict[str, str]) -> None:
    key = service.create_key(alice, name="h")
    assert service.delete(alice, key["id"]).status_code == 200
    mine = service.get("api-key/history", alice, params={"id": key["id"]})
    assert mine.status_code == 200
    events = mine.json()["events"]
    assert [(e["type"], e["version"]) for e in events] == [("ApiKeyCreated", 1), ("ApiKeyRevoked", 2)]
    assert events[1]["actor"]["userId"] == alice["x-test-user-id"] and key["key"] not in mine.text
    for who, key_id in ((bob, key["id"]), (alice, "doesnotexist"), (alice, "a.b.>")):
        other = service.get("api-key/history", who, params={"id": key_id})
        assert other.status_code == 404 and other.json()["code"] == "KEY_NOT_FOUND"
    assert service.get("api-key/history", {}, params={"id": key["id"]}).status_code == 401


# ---------------------------------------------------------------------------------------------------------
# Documented promises (docs/api.md): 409 after 40 lost retries, metadata, name length, banExpires, ApiKeyUpdated's fields
# ---------------------------------------------------------------------------------------------------------
def test_a_request_that_loses_forty_times_is_409_conflict_and_changes_nothing(service: Service,
                                                                             alice: dict[str, str],
                                                                             db: Any) -> None:
    """Deterministic contention: a trigger on this one key makes every append meet a real concurrent writer.
    Before each insert of the key's next version it inserts that very version itself (in the same
    transaction), so the request's own row hits the ``(stream_id, version)`` unique index, exactly as when
    another writer won; the whole transaction (both rows) rolls back, the request re-reads, re-decides and
    loses again. A sequence (not transactional) counts the attempts."""
    key = service.create_key(alice, name="contended forever")
    tag = uuid.uuid4().hex[:8]
    seq, fn, trigger = f"kl_test_attempts_{tag}", f"kl_test_collide_{tag}", f"kl_test_collide_{tag}"
    db.execute(f"CREATE SEQUENCE {seq}")
    db.execute(f"""
        CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.stream_id = '{key["id"]}' AND pg_trigger_depth() = 1 THEN
                PERFORM nextval('{seq}');
                INSERT INTO events (id, stream_id, version, type, data, metadata, recorded_at)
                VALUES (gen_random_uuid(), NEW.stream_id, NEW.version, NEW.type, NEW.data, NEW.metadata,
                        NEW.recorded_at);
            END IF;
            RETURN NEW;
        END $$""")
    db.execute(f"CREATE TRIGGER {trigger} BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION {fn}()")
    try:
        response = service.delete(alice, key["id"])
        assert response.status_code == 409, response.text
        assert response.json() == {"message": "The key is being changed concurrently; try again", "code": "CONFLICT"}
        attempts = db.execute(f"SELECT last_value, is_called FROM {seq}").fetchone()
        assert attempts == (40, True)  # 40 attempts, each lost, then the answer
        assert count_events(service.database_url, key["id"]) == 1  # changed nothing
        assert service.verify(key["key"])["valid"] is True
    finally:
        db.execute(f"DROP TRIGGER IF EXISTS {trigger} ON events")
        db.execute(f"DROP FUNCTION IF EXISTS {fn}()")
        db.execute(f"DROP SEQUENCE IF EXISTS {seq}")
    # Without the competition the same request goes through: it was the contention, not the key.
    assert service.delete(alice, key["id"]).status_code == 200
    assert count_events(service.database_url, key["id"]) == 2


def test_metadata_is_refused_unless_enabled(service: Service, alice: dict[str, str]) -> None:
    """better-auth's default (``enableMetadata: false``): metadata on create or update is 400
    ``METADATA_DISABLED`` and writes nothing; ``null`` (no metadata) is fine. (Enabled: test_lifecycle.py.)"""
    before = count_events(service.database_url)
    refused = service.post("api-key/create", alice, json={"name": "m", "metadata": {"plan": "pro"}})
    assert refused.status_code == 400 and refused.json() == {"message": "Metadata is disabled.",
                                                            "code": "METADATA_DISABLED"}
    assert count_events(service.database_url) == before
    assert service.get("api-key/list", alice).json()["total"] == 0  # alice is a fresh user in every test

    key = service.create_key(alice, name="plain", metadata=None)
    assert key["metadata"] is None
    updated = service.post("api-key/update", alice, json={"keyId": key["id"], "metadata": {"plan": "pro"}})
    assert updated.status_code == 400 and updated.json()["code"] == "METADATA_DISABLED"
    assert count_events(service.database_url, key["id"]) == 1
    assert service.get("api-key/get", alice, params={"id": key["id"]}).json()["metadata"] is None


@pytest.mark.parametrize("name,ok", [("", False), ("a", True), ("n" * 32, True), ("n" * 33, False),
                                     ("é" * 32, True), ("é" * 33, False)])
def test_a_name_is_1_to_32_characters_on_create_and_update(service: Service, alice: dict[str, str], name: str,
                                                           ok: bool) -> None:
    created = service.post("api-key/create", alice, json={"name": name})
    key = service.create_key(alice, name="before")
    updated = service.post("api-key/update", alice, json={"keyId": key["id"], "name": name})
    if ok:
        assert created.status_code == 200 and created.json()["name"] == name, created.text
        assert updated.status_code == 200 and updated.json()["name"] == name, updated.text
        assert count_events(service.database_url, key["id"]) == 2
        return
    invalid = {"message": "The name length is either too large or too small.", "code": "INVALID_NAME_LENGTH"}
    assert created.status_code == 400 and created.json() == invalid
    assert updated.status_code == 400 and updated.json() == invalid
    assert count_events(service.database_url, key["id"]) == 1
    assert service.get("api-key/get", alice, params={"id": key["id"]}).json()["name"] == "before"


def test_a_ban_holds_until_ban_expires(service: Service) -> None:
    """The admin plugin's ``banExpires``: a banned user is refused (401 ``USER_BANNED``) while it is in the
    future or unset, and is a normal user again once it has passed."""
    user = service.session()
    key = service.create_key(user, name="banned later")

    def ban(expires: str | None) -> None:
        with psycopg.connect(service.database_url, autocommit=True) as conn:
            conn.execute('UPDATE "user" SET banned = true, "banExpires" = ' + (expires or "NULL") + " WHERE id = %s",
                         (user["x-test-user-id"],))

    for expires in (None, "now() + interval '1 hour'"):
        ban(expires)
        for response in (service.post("api-key/create", user, json={}),
                         service.post("api-key/update", user, json={"keyId": key["id"], "name": "x"}),
                         service.delete(user, key["id"])):
            assert response.status_code == 401 and response.json()["code"] == "USER_BANNED", (expires, response.text)
    assert count_events(service.database_url, key["id"]) == 1
    ban("now() - interval '1 second'")  # the ban is over
    assert service.post("api-key/update", user, json={"keyId": key["id"], "name": "x"}).status_code == 200
    assert service.delete(user, key["id"]).status_code == 200


def test_an_update_records_only_the_fields_it_changed(service: Service, alice: dict[str, str], db: Any) -> None:
    key = service.create_key(alice, name="same", expiresIn=3 * 86_400)

    def last_event(expected_version: int) -> tuple[str, dict[str, Any]]:
        rows = db.execute("SELECT type, data, version FROM events WHERE stream_id = %s ORDER BY version",
                          (key["id"],)).fetchall()
        assert rows[-1][2] == expected_version, rows
        return rows[-1][0], rows[-1][1]

    # name unchanged, enabled unchanged, expiry set again (expiresIn restarts the clock: always a change)
    response = service.post("api-key/update", alice, json={"keyId": key["id"], "name": "same", "enabled": True,
                                                           "expiresIn": 2 * 86_400})
    assert response.status_code == 200, response.text
    kind, data = last_event(2)
    assert kind == "ApiKeyUpdated" and set(data) == {"keyHash", "expiresAt"}
    assert data["expiresAt"].startswith(response.json()["expiresAt"][:19])

    response = service.post("api-key/update", alice, json={"keyId": key["id"], "name": "renamed", "enabled": True})
    assert response.status_code == 200, response.text
    assert last_event(3) == ("ApiKeyUpdated", {"keyHash": hash_key(key["key"]), "name": "renamed"})

    # expiry removed: null is a real value, carried as such
    response = service.post("api-key/update", alice, json={"keyId": key["id"], "expiresIn": None})
    assert response.status_code == 200 and response.json()["expiresAt"] is None, response.text
    assert last_event(4) == ("ApiKeyUpdated", {"keyHash": hash_key(key["key"]), "expiresAt": None})

    # nothing changed at all: no event
    assert service.post("api-key/update", alice, json={"keyId": key["id"], "name": "renamed"}).status_code == 200
    last_event(4)
