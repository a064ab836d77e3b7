"""``keyledger import better-auth``: existing better-auth keys adopted with their stored hashes.

The source is a real PostgreSQL database with better-auth's own tables, created with the statements
better-auth's Postgres migration (``npx @better-auth/cli migrate``) produces, in both layouts: 1.4 (owner
``"userId"``) and 1.5+ (``"referenceId"`` + ``"configId"``). Its ``key`` column holds the real
``base64url(sha256(plaintext))`` of plaintexts the test keeps, so after the import the ORIGINAL plaintext
must verify against keyledger, with no key reissued.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import string
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest

from better_auth_schema import APIKEY_1_4, APIKEY_1_5, BETTER_AUTH_CORE
from harness import ROOT, Service, count_events, free_port, read_stream_messages, wait_until
from keyledger.core.records import hash_key, iso, new_key
from keyledger.http.auth import cookie_value
from keyledger.ops.importer import ImportReport, decode_json_text, Rejected, run_import

APIKEY_COLUMNS = ("id", "configId", "name", "start", "referenceId", "prefix", "key", "refillInterval",
                  "refillAmount", "enabled", "rateLimitEnabled", "rateLimitTimeWindow", "rateLimitMax",
                  "requestCount", "remaining", "expiresAt", "createdAt", "updatedAt", "permissions", "metadata")

_ALNUM = string.ascii_letters + string.digits
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
CREATED = dt.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)


def better_auth_database(db_factory: Any, hint: str, apikey_ddl: str) -> str:
    """A fresh database holding only better-auth's tables (the factory's keyledger schema is wiped first)."""
    url = db_factory.create(hint)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        conn.execute(BETTER_AUTH_CORE)
        conn.execute(apikey_ddl)
    return url


def rand_id(n: int = 32) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def add_user(url: str, user_id: str | None = None) -> str:
    user_id = user_id or rand_id()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute('INSERT INTO "user" (id, name, email, "emailVerified") VALUES (%s, %s, %s, false)',
                     (user_id, "u", f"{user_id}@example.com"))
    return user_id


def add_key(url: str, owner: str, *, layout: str = "1.5", plaintext: str | None = None, **columns: Any) -> dict[str, Any]:
    """Insert an apikey row as better-auth writes it; returns the row plus the plaintext."""
    prefix = columns.pop("prefix", None)
    plaintext = plaintext or new_key(prefix)
    row: dict[str, Any] = {
        "id": rand_id(), "configId": "default", "name": None, "start": plaintext[:6], "prefix": prefix,
        "key": hash_key(plaintext), "refillInterval": None, "refillAmount": None, "enabled": True,
        "rateLimitEnabled": False, "rateLimitTimeWindow": 86_400_000, "rateLimitMax": 10, "requestCount": 0,
        "remaining": None, "expiresAt": None, "createdAt": CREATED, "updatedAt": CREATED,
        "permissions": None, "metadata": "null",  # better-auth stores JSON.stringify(null)
    }
    row.update(columns)
    if layout == "1.4":
        row.pop("configId")
        row["userId"] = owner
    else:
        row["referenceId"] = owner
    names = list(row)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO apikey ({}) VALUES ({})".format(", ".join(f'"{n}"' for n in names),
                                                         ", ".join(["%s"] * len(names))),
            [row[n] for n in names],
        )
    return {**row, "plaintext": plaintext, "owner": owner}


def session_for(service: Service, user_id: str) -> dict[str, str]:
    """A session in keyledger's database for a user id that came from the source (an imported owner)."""
    token = rand_id()
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        conn.execute('INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING',
                     (user_id, user_id, f"{user_id}@example.com"))
        conn.execute(
            "INSERT INTO session (id, \"expiresAt\", token, \"userId\") VALUES (%s, now() + interval '1 day', %s, %s)",
            (rand_id(), token, user_id),
        )
    return {"cookie": f"better-auth.session_token={cookie_value(token, service.secret)}", "origin": service.origin}


def run_cli(target_url: str, nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command in its own process, as a user runs it (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLEDGER_")}
    env.update(DATABASE_URL=target_url, NATS_URL=nats_url)
    return subprocess.run([sys.executable, "-m", "keyledger.cli", "import", "better-auth", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def all_stored_text(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT coalesce((SELECT string_agg(data::text || metadata::text, '') FROM events), '')"
            " || coalesce((SELECT string_agg(row_to_json(a)::text, '') FROM active_api_keys a), '')"
        ).fetchone()[0]


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one 1.5+ source and one 1.4 source, imported into the module's keyledger database
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_15(db_factory: Any) -> dict[str, Any]:
    url = better_auth_database(db_factory, "ba15", APIKEY_1_5)
    owner = add_user(url)
    keys = {
        "valid": add_key(url, owner, name="ci", prefix="pk_", expiresAt=NOW + dt.timedelta(days=30),
                         metadata=json.dumps({"team": "core"}), permissions=json.dumps({"files": ["read", "write"]}),
                         rateLimitEnabled=True, rateLimitTimeWindow=60_000, rateLimitMax=100, remaining=50,
                         refillAmount=50, refillInterval=3_600_000),
        "disabled": add_key(url, owner, name="off", enabled=False),
        "expired": add_key(url, owner, name="old", expiresAt=NOW - dt.timedelta(days=1)),
        # double-encoded metadata (JSON of a JSON string), as some better-auth versions wrote it
        "double": add_key(url, owner, name="double", metadata=json.dumps(json.dumps({"a": 1}))),
        "nulls": add_key(url, owner, name=None, metadata=None, enabled=None, rateLimitEnabled=None,
                         rateLimitTimeWindow=None, rateLimitMax=None, createdAt=CREATED + dt.timedelta(seconds=1)),
        "org": add_key(url, "org_" + rand_id(12), configId="org", prefix="rb_org_", name="org key"),
        "dashes": add_key(url, owner, id="legacy-key_" + rand_id(8), name="dashes"),
        "deletable": add_key(url, owner, name="to delete", prefix="del_"),
    }
    return {"url": url, "owner": owner, "keys": keys}


@pytest.fixture(scope="module")
def source_14(db_factory: Any) -> dict[str, Any]:
    url = better_auth_database(db_factory, "ba14", APIKEY_1_4)
    owner = add_user(url)
    keys = {
        "valid": add_key(url, owner, layout="1.4", name="v14", metadata=json.dumps({"plan": "pro"})),
        "disabled": add_key(url, owner, layout="1.4", name="v14 off", enabled=False),
        "doomed": add_key(url, owner, layout="1.4", name="v14 doomed"),
    }
    return {"url": url, "owner": owner, "keys": keys}


@pytest.fixture(scope="module")
def imported(service: Service, source_15: dict[str, Any], source_14: dict[str, Any]) -> dict[str, ImportReport]:
    """Both sources imported into the running service's database (the relay publishes the events)."""
    return {
        "1.5": run_import(source_15["url"], service.database_url),
        "1.4": run_import(source_14["url"], service.database_url),
    }


# ---------------------------------------------------------------------------------------------------------
# (a) imported keys work with their original plaintext, and behave like any other key
# ---------------------------------------------------------------------------------------------------------
def test_both_layouts_import_everything(imported: dict[str, ImportReport], source_15: dict[str, Any],
                                        source_14: dict[str, Any]) -> None:
    r15, r14 = imported["1.5"], imported["1.4"]
    assert "referenceId" in r15.layout and "userId" in r14.layout
    assert (r15.total, r15.imported, r15.already_present, r15.rejected) == (len(source_15["keys"]),) * 2 + (0, [])
    assert (r14.total, r14.imported, r14.already_present, r14.rejected) == (len(source_14["keys"]),) * 2 + (0, [])
    assert r15.exit_code == 0 and r14.exit_code == 0


def test_original_plaintext_verifies_with_the_source_record(service: Service, imported: Any,
                                                            source_15: dict[str, Any]) -> None:
    k = source_15["keys"]["valid"]
    owner = session_for(service, source_15["owner"])
    # The live count before this test's use (other tests may have used the key: count only our own use).
    left = service.get("api-key/get", owner, params={"id": k["id"]}).json()["remaining"]
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        data = conn.execute("SELECT data FROM events WHERE stream_id = %s AND type = 'ApiKeyImported'",
                            (k["id"],)).fetchone()[0]
    assert (data["remaining"], data["refillAmount"], data["refillInterval"]) == (50, 50, 3_600_000)
    answer = service.verify(k["plaintext"])
    assert answer["valid"] is True and answer["error"] is None, answer
    record = answer["key"]
    assert record["id"] == k["id"]
    assert record["referenceId"] == source_15["owner"] and record["configId"] == "default"
    assert record["name"] == "ci" and record["prefix"] == "pk_" and record["start"] == k["plaintext"][:6]
    assert record["expiresAt"] == iso(k["expiresAt"])
    assert record["createdAt"] == "2025-01-02T03:04:05.678Z"  # the source's createdAt, not the import time
    assert record["metadata"] == {"team": "core"}
    assert record["permissions"] == {"files": ["read", "write"]}
    assert (record["rateLimitEnabled"], record["rateLimitTimeWindow"], record["rateLimitMax"]) == (True, 60_000, 100)
    # remaining was 50 in the source (the imported event says so); this verify is a use of a usage-limited
    # key, so it answers one less than before it.
    assert 0 < left <= 50
    assert (record["remaining"], record["refillAmount"], record["refillInterval"]) == (left - 1, 50, 3_600_000)

    assert service.verify(source_15["keys"]["disabled"]["plaintext"])["error"]["code"] == "KEY_DISABLED"
    assert service.verify(source_15["keys"]["expired"]["plaintext"])["error"]["code"] == "KEY_EXPIRED"
    double = service.verify(source_15["keys"]["double"]["plaintext"])
    assert double["valid"] is True and double["key"]["metadata"] == {"a": 1}
    nulls = service.verify(source_15["keys"]["nulls"]["plaintext"])["key"]
    # enabled NULL is enabled (better-auth refuses only enabled === false); NULL limits stay NULL
    assert nulls["enabled"] is True and nulls["metadata"] is None and nulls["name"] is None
    assert (nulls["rateLimitEnabled"], nulls["rateLimitTimeWindow"], nulls["rateLimitMax"]) == (False, None, None)
    org = service.verify(source_15["keys"]["org"]["plaintext"])["key"]
    assert org["configId"] == "org" and org["referenceId"] == source_15["keys"]["org"]["owner"]
    assert service.verify(source_15["keys"]["dashes"]["plaintext"])["key"]["id"].startswith("legacy-key_")


def test_1_4_layout_keys_verify_and_keep_their_user(service: Service, imported: Any, source_14: dict[str, Any]) -> None:
    k = source_14["keys"]["valid"]
    answer = service.verify(k["plaintext"])
    assert answer["valid"] is True and answer["key"]["referenceId"] == source_14["owner"]
    assert answer["key"]["configId"] == "default" and answer["key"]["metadata"] == {"plan": "pro"}
    assert service.verify(source_14["keys"]["disabled"]["plaintext"])["error"]["code"] == "KEY_DISABLED"
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        data, metadata, recorded_at = conn.execute(
            "SELECT data, metadata, recorded_at FROM events WHERE stream_id = %s", (k["id"],)).fetchone()
    assert data["userId"] == source_14["owner"] and data["source"] == "better-auth"
    assert metadata["userId"] is None and metadata["source"] == "better-auth import"
    assert metadata["requestId"] == imported["1.4"].run_id
    assert recorded_at > CREATED + dt.timedelta(days=300)  # recorded when imported, created long before


def test_owner_lists_and_deletes_an_imported_key(service: Service, imported: Any, source_15: dict[str, Any]) -> None:
    owner = session_for(service, source_15["owner"])
    listed = service.get("api-key/list", owner, params={"limit": 100}).json()
    mine = {k["id"] for k in source_15["keys"].values() if k["owner"] == source_15["owner"]}
    assert {k["id"] for k in listed["apiKeys"]} == mine and listed["total"] == len(mine)
    assert all("key" not in k for k in listed["apiKeys"])
    org_key = source_15["keys"]["org"]
    assert service.delete(owner, org_key["id"]).status_code == 404  # not this user's key

    k = source_15["keys"]["deletable"]
    assert service.verify(k["plaintext"])["valid"] is True
    response = service.delete(owner, k["id"])
    assert response.status_code == 200 and response.json() == {"success": True}
    assert service.verify(k["plaintext"])["error"]["code"] == "INVALID_API_KEY"
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT type, version FROM events WHERE stream_id = %s ORDER BY version", (k["id"],)).fetchall()
        assert rows == [("ApiKeyImported", 1), ("ApiKeyRevoked", 2)]
        wait_until(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, what="outbox drained")
    messages = [m for m in read_stream_messages(service.nats_url, service.topology.events_stream)
                if m.subject.endswith("." + k["id"])]
    prefix = service.topology.prefix
    assert [m.subject for m in messages] == [f"{prefix}.events.imported.{k['id']}", f"{prefix}.events.revoked.{k['id']}"]
    envelope = json.loads(messages[0].data)
    assert envelope["type"] == "ApiKeyImported" and envelope["version"] == 1
    assert envelope["data"]["keyHash"] == k["key"] and envelope["data"]["createdAt"].startswith("2025-01-02T03:04:05.678")
    assert envelope["actor"] == {"userId": None, "source": "better-auth import", "requestId": imported["1.5"].run_id}
    assert json.loads(messages[1].data)["data"] == {"keyHash": k["key"]}


# ---------------------------------------------------------------------------------------------------------
# (b) idempotent: the second run imports nothing, even for a key revoked since
# ---------------------------------------------------------------------------------------------------------
def test_second_run_imports_nothing(service: Service, imported: Any, source_15: dict[str, Any],
                                    source_14: dict[str, Any]) -> None:
    # a key deleted after its import must not be resurrected by a later run
    doomed = source_14["keys"]["doomed"]
    assert service.delete(session_for(service, source_14["owner"]), doomed["id"]).status_code == 200
    # (only ApiKeyImported is counted: the expiry sweeper may append ApiKeyExpired for the expired key meanwhile)
    before = count_events(service.database_url, type_="ApiKeyImported")
    again = run_import(source_15["url"], service.database_url)
    assert (again.imported, again.already_present, again.rejected) == (0, len(source_15["keys"]), [])
    result = run_cli(service.database_url, service.nats_url, "--from", source_14["url"])
    assert result.returncode == 0, result.stderr
    assert "imported:        0" in result.stdout and f"already present: {len(source_14['keys'])}" in result.stdout
    assert count_events(service.database_url, type_="ApiKeyImported") == before
    assert count_events(service.database_url, doomed["id"]) == 2
    assert service.verify(doomed["plaintext"])["error"]["code"] == "INVALID_API_KEY"


# ---------------------------------------------------------------------------------------------------------
# (c) malformed rows are listed with their reason, the rest is imported, exit code 1
# ---------------------------------------------------------------------------------------------------------
def test_malformed_rows_are_listed_and_exit_1(db_factory: Any, service: Service, nats_url: str) -> None:
    url = better_auth_database(db_factory, "babad", APIKEY_1_5)
    owner = add_user(url)
    good = add_key(url, owner, name="good")
    # a keyledger-native key, then source rows colliding with its hash and with its id
    native_owner = service.session()
    native = service.create_key(native_owner, name="native")
    bad = {
        "short-hash": (add_key(url, owner, key="abc"), "43-character"),
        "std-base64": (add_key(url, owner, key="+" * 42 + "="), "43-character"),
        "missing-hash": (add_key(url, owner, key=""), "missing key hash"),
        "dotted-id": (add_key(url, owner, id="has.dot"), "usable key id"),
        "long-id": (add_key(url, owner, id="x" * 129), "usable key id"),
        "bad-json": (add_key(url, owner, metadata='{"a":'), "metadata is not valid JSON"),
        "nul": (add_key(url, owner, metadata='{"a":"x\\u0000y"}'), "NUL"),
        "list-meta": (add_key(url, owner, metadata="[1, 2]"), "not an object"),
        "bad-perms": (add_key(url, owner, permissions='{"files": "read"}'), "permissions"),
        "bad-perms-json": (add_key(url, owner, permissions="{files}"), "permissions is not valid JSON"),
        # the same hash twice in the source: the first in createdAt order wins
        "dup-hash": (add_key(url, owner, plaintext=good["plaintext"], createdAt=CREATED + dt.timedelta(days=1)),
                     f"already used by key {good['id']!r}"),
        "native-hash": (add_key(url, owner, plaintext=native["key"]), f"already used by key {native['id']!r}"),
        "native-id": (add_key(url, owner, id=native["id"]), "different keyledger key"),
        "infinite": (add_key(url, owner, expiresAt="infinity"), "expiresAt is not a representable timestamp"),
    }
    result = run_cli(service.database_url, nats_url, "--from", url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("rejected ")]
    assert len(lines) == len(bad), result.stdout
    for label, (row, reason) in bad.items():
        line = next((entry for entry in lines if entry.startswith(f"rejected {row['id']!r}: ")), None)
        assert line is not None and reason in line, (label, line, result.stdout)
    assert "imported:        1" in result.stdout and f"rejected:        {len(bad)}" in result.stdout
    assert "importing [" in result.stderr  # progress on stderr
    assert service.verify(good["plaintext"])["valid"] is True
    assert service.verify(native["key"])["key"]["id"] == native["id"]  # the native key is untouched
    assert count_events(service.database_url, native["id"]) == 1


# ---------------------------------------------------------------------------------------------------------
# (d) --dry-run reports and writes nothing
# ---------------------------------------------------------------------------------------------------------
def test_dry_run_writes_nothing(db_factory: Any, nats_url: str, source_15: dict[str, Any]) -> None:
    target = db_factory.create("importdry")
    result = run_cli(target, nats_url, "--from", source_15["url"], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "DRY RUN" in result.stdout and f"would import:    {len(source_15['keys'])}" in result.stdout
    with psycopg.connect(target, autocommit=True) as conn:
        counts = conn.execute("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM outbox),"
                              " (SELECT count(*) FROM active_api_keys), (SELECT count(*) FROM projection_tracking)"
                              ).fetchone()
    assert counts == (0, 0, 0, 0)
    # a dry run against a database without keyledger's schema does not create it either
    bare = db_factory.create("importbare")
    with psycopg.connect(bare, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    report = run_import(source_15["url"], bare, dry_run=True)
    assert report.imported == len(source_15["keys"]) and report.dry_run
    with psycopg.connect(bare, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('events')").fetchone()[0] is None


# ---------------------------------------------------------------------------------------------------------
# (e) the plaintext never reaches the log, the projection or NATS
# ---------------------------------------------------------------------------------------------------------
def test_no_plaintext_anywhere(service: Service, imported: Any, source_15: dict[str, Any],
                               source_14: dict[str, Any]) -> None:
    keys = [*source_15["keys"].values(), *source_14["keys"].values()]
    stored = all_stored_text(service.database_url)
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0, what="outbox drained")
    published = b"".join(m.data for m in read_stream_messages(service.nats_url, service.topology.events_stream))
    for k in keys:
        assert k["plaintext"] not in stored and k["plaintext"].encode() not in published
        assert k["key"] in stored  # the hash, as better-auth stored it
    subjects = {m.subject for m in read_stream_messages(service.nats_url, service.topology.events_stream)}
    assert all(f"{service.topology.prefix}.events.imported.{k['id']}" in subjects for k in keys)


# ---------------------------------------------------------------------------------------------------------
# Two runs at once: every key once, none lost, none doubled
# ---------------------------------------------------------------------------------------------------------
def test_concurrent_runs_import_each_key_once(db_factory: Any) -> None:
    url = better_auth_database(db_factory, "baconc", APIKEY_1_5)
    owner = add_user(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO apikey (id, "configId", "referenceId", key, "createdAt", "updatedAt", metadata)
               SELECT 'k' || i, 'default', %s,
                      rtrim(translate(encode(sha256(('plain' || i)::bytea), 'base64'), '+/', '-_'), '='),
                      now(), now(), 'null'
               FROM generate_series(1, 600) i""", (owner,))
    target = db_factory.create("importconc")
    reports: list[ImportReport] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        try:
            start.wait()
            reports.append(run_import(url, target, batch_size=50))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r.imported for r in reports) == 600
    assert all(r.imported + r.already_present == 600 and not r.rejected for r in reports)
    with psycopg.connect(target, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT stream_id), max(version) FROM events").fetchone() == (600, 600, 1)
        assert conn.execute("SELECT count(*) FROM active_api_keys").fetchone()[0] == 600
        assert conn.execute("SELECT key_hash FROM active_api_keys WHERE id = 'k7'").fetchone()[0] == hash_key("plain7")


# ---------------------------------------------------------------------------------------------------------
# The defensive JSON decoding, unit by unit
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (None, None), ("null", None), ("", None), ('"null"', None), ('{"a": 1}', {"a": 1}),
    (json.dumps(json.dumps({"a": [1]})), {"a": [1]}), (json.dumps(json.dumps(json.dumps({"b": 2}))), {"b": 2}),
])
def test_json_text_decoding(text: str | None, expected: Any) -> None:
    assert decode_json_text(text, "metadata") == expected


@pytest.mark.parametrize("text", ['{"a":', "not json", '"not json"', '{"a": "\\u0000"}',
                                  json.dumps(json.dumps(json.dumps(json.dumps({"deep": 1}))))])
def test_json_text_rejections(text: str) -> None:
    with pytest.raises(Rejected):
        decode_json_text(text, "metadata")


def test_unknown_table_is_a_configuration_error(db_factory: Any, nats_url: str) -> None:
    target = db_factory.create("importnotable")
    result = run_cli(target, nats_url, "--from", target, "--dry-run")  # keyledger's db has no apikey table
    assert result.returncode == 2 and "no table 'apikey'" in result.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_unreachable_database_is_named_in_one_line_without_its_password(db_factory: Any, nats_url: str,
                                                                            dry_run: bool) -> None:
    """Source or target: the one line says which (``--from`` or ``DATABASE_URL``), with the password hidden."""
    reachable = db_factory.create("importreach")
    nobody = free_port()  # nothing listens there
    flags = ["--dry-run"] if dry_run else []

    source = run_cli(reachable, nats_url, "--from", f"postgresql://ba:s3cret-source@127.0.0.1:{nobody}/ba", *flags)
    assert source.returncode == 3, source.stderr
    line, = source.stderr.splitlines()
    assert line.startswith(f"keyledger: cannot reach the source database (--from postgresql://***@127.0.0.1:{nobody}"
                           "/ba): "), line
    assert "s3cret" not in source.stderr + source.stdout

    target = run_cli(f"postgresql://kl:s3cret-target@127.0.0.1:{nobody}/kl", nats_url, "--from", reachable, *flags)
    assert target.returncode == 3, target.stderr
    line, = target.stderr.splitlines()
    assert line.startswith("keyledger: cannot reach the target database (DATABASE_URL "
                           f"postgresql://***@127.0.0.1:{nobody}/kl): "), line
    assert "s3cret" not in target.stderr + target.stdout

    keywords = run_cli(reachable, nats_url, "--from", f"host=127.0.0.1 port={nobody} password=s3cret dbname=ba",
                       *flags)
    assert keywords.returncode == 3 and "s3cret" not in keywords.stderr, keywords.stderr
    assert f"(--from host=127.0.0.1 port={nobody} password=*** dbname=ba)" in keywords.stderr
