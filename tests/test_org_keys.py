"""Organization keys as Rybbit uses them: configId "org", membership and roles from better-auth's tables."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from harness import Service, count_events


@pytest.fixture
def org(service: Service) -> dict[str, Any]:
    """An organization with an owner, an admin (comma-separated roles), a plain member and a stranger."""
    people = {name: service.session() for name in ("owner", "admin", "member", "stranger")}
    org_id = uuid.uuid4().hex
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO organization (id, name, slug) VALUES (%s, 'Acme', %s)", (org_id, org_id))
        for name, role in (("owner", "owner"), ("admin", "member, admin"), ("member", "member")):
            conn.execute('INSERT INTO member (id, "organizationId", "userId", role) VALUES (%s, %s, %s, %s)',
                         (uuid.uuid4().hex, org_id, people[name]["x-test-user-id"], role))
    return {"id": org_id, **people}


def create_org_key(service: Service, who: dict[str, str], org_id: str, **body: Any) -> Any:
    return service.post("api-key/create", who, json={"configId": "org", "organizationId": org_id, **body})


def test_owners_and_admins_manage_the_organizations_keys(service: Service, org: dict[str, Any]) -> None:
    created = create_org_key(service, org["owner"], org["id"], name="ci")
    assert created.status_code == 200, created.text
    key = created.json()
    assert key["configId"] == "org" and key["referenceId"] == org["id"] and key["key"].startswith("rb_org_")
    assert service.verify(key["key"])["valid"] is True

    admin = org["admin"]
    got = service.get("api-key/get", admin, params={"id": key["id"], "configId": "org"})
    assert got.status_code == 200 and got.json()["id"] == key["id"]
    listed = service.get("api-key/list", admin, params={"configId": "org", "organizationId": org["id"]}).json()
    assert [k["id"] for k in listed["apiKeys"]] == [key["id"]]
    renamed = service.post("api-key/update", admin, json={"keyId": key["id"], "configId": "org", "name": "renamed"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    rotated = service.post("api-key/rotate", admin, json={"keyId": key["id"], "configId": "org"})
    assert rotated.status_code == 200 and rotated.json()["key"].startswith("rb_org_"), rotated.text
    assert service.verify(rotated.json()["key"])["valid"] is True and service.verify(key["key"])["valid"] is False
    key["key"] = rotated.json()["key"]

    deleted = service.post("api-key/delete", admin, json={"keyId": key["id"], "configId": "org"})
    assert deleted.status_code == 200 and deleted.json() == {"success": True}
    assert service.verify(key["key"])["valid"] is False
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        actor = conn.execute("SELECT metadata->>'userId' FROM events WHERE stream_id = %s AND type = 'ApiKeyRevoked'",
                             (key["id"],)).fetchone()[0]
    assert actor == admin["x-test-user-id"]


def test_members_and_strangers_are_refused_with_better_auths_codes(service: Service, org: dict[str, Any]) -> None:
    key = create_org_key(service, org["owner"], org["id"]).json()
    for who, code in (("member", "INSUFFICIENT_API_KEY_PERMISSIONS"), ("stranger", "USER_NOT_MEMBER_OF_ORGANIZATION")):
        headers = org[who]
        for response in (
            create_org_key(service, headers, org["id"]),
            service.get("api-key/list", headers, params={"configId": "org", "organizationId": org["id"]}),
        ):
            assert response.status_code == 403 and response.json()["code"] == code, (who, response.text)
    # Naming a key: a member learns it is the organization's (403); a stranger gets exactly what an unknown
    # id gets (404), so org key ids cannot be probed from outside.
    unknown = "Zz" * 16
    for key_id, who, status in ((key["id"], "member", 403), (key["id"], "stranger", 404), (unknown, "stranger", 404)):
        headers = org[who]
        for response in (
            service.get("api-key/get", headers, params={"id": key_id, "configId": "org"}),
            service.post("api-key/update", headers, json={"keyId": key_id, "configId": "org", "name": "x"}),
            service.post("api-key/delete", headers, json={"keyId": key_id, "configId": "org"}),
            service.post("api-key/rotate", headers, json={"keyId": key_id, "configId": "org"}),
            service.get("api-key/history", headers, params={"id": key_id, "configId": "org"}),
        ):
            assert response.status_code == status, (who, key_id, response.text)
            if status == 404:
                assert response.json() == {"message": "API Key not found", "code": "KEY_NOT_FOUND"}
    assert count_events(service.database_url, key["id"]) == 1
    assert service.verify(key["key"])["valid"] is True


def test_org_and_user_keys_never_see_each_others_ids(service: Service, org: dict[str, Any]) -> None:
    owner = org["owner"]
    org_key = create_org_key(service, owner, org["id"]).json()
    own_key = service.create_key(owner)
    not_found = {"message": "API Key not found", "code": "KEY_NOT_FOUND"}
    for response in (
        service.post("api-key/delete", owner, json={"keyId": org_key["id"]}),  # default config
        service.get("api-key/get", owner, params={"id": org_key["id"]}),
        service.post("api-key/delete", owner, json={"keyId": own_key["id"], "configId": "org"}),
        service.post("api-key/rotate", owner, json={"keyId": org_key["id"]}),
        service.get("api-key/get", owner, params={"id": own_key["id"], "configId": "org"}),
    ):
        assert response.status_code == 404 and response.json() == not_found
    assert [k["id"] for k in service.get("api-key/list", owner).json()["apiKeys"]] == [own_key["id"]]


def test_bad_org_requests_are_400(service: Service, org: dict[str, Any]) -> None:
    owner = org["owner"]
    cases = (
        {"organizationId": org["id"]},  # organizationId without configId "org"
        {"configId": "org"},  # configId "org" without organizationId
        {"configId": "team"},
        {"configId": "org", "organizationId": "a.b.>"},
    )
    for body in cases:
        response = service.post("api-key/create", owner, json=body)
        assert response.status_code == 400, (body, response.text)
    missing = service.get("api-key/list", owner, params={"configId": "org"})
    assert missing.status_code == 400 and missing.json()["code"] == "VALIDATION_ERROR"


def test_org_key_history_is_for_the_organizations_managers(service: Service, org: dict[str, Any]) -> None:
    key = create_org_key(service, org["owner"], org["id"]).json()
    params = {"id": key["id"], "configId": "org"}
    history = service.get("api-key/history", org["admin"], params=params)
    assert history.status_code == 200 and [e["type"] for e in history.json()["events"]] == ["ApiKeyCreated"]
    assert service.get("api-key/history", org["member"], params=params).status_code == 403
    assert service.get("api-key/history", org["owner"], params={"id": key["id"]}).status_code == 404
