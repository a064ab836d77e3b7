"""Hostile input costs nothing: each case gets its documented 4xx, writes nothing, and the service keeps
answering. Real ``keyledger serve`` over real HTTP (raw sockets where an HTTP client would refuse to send it)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
import psutil
import pytest

from harness import Service, count_events, delete_streams, unique_topology

DEEP_OK = 32  # the documented nesting limit: this deep is fine
INT_MAX = 2**31 - 1


SERVER_TOKEN = "hostile-server-token"


@pytest.fixture(scope="module")
def service(database_url: str, nats_url: str, request: pytest.FixtureRequest) -> Any:
    topology = unique_topology("hostile")
    svc = Service(database_url=database_url, nats_url=nats_url, topology=topology,
                  extra_env={"KEYLEDGER_SERVICE_TOKEN": SERVER_TOKEN}).start()
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


def nested(depth: int) -> str:
    """``{"keyId": [[[...]]]}`` with the whole body ``depth`` levels deep."""
    return '{"keyId":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], body


@pytest.mark.parametrize("depth", [DEEP_OK + 1, 100, 350, 2_000, 20_000])
def test_deep_json_is_a_400_on_every_post_without_a_session(service: Service, depth: int) -> None:
    for path in ("api-key/delete", "api-key/verify", "api-key/create", "api-key/update", "api-key/rotate"):
        response = service.post(path, content=nested(depth), headers={"content-type": "application/json"})
        assert_error(response, 400, "BAD_REQUEST")
        assert "nests deeper than 32 levels" in response.json()["message"], response.text
    assert service.verify("nope")["valid"] is False  # still answering


def test_json_at_the_nesting_limit_is_parsed(service: Service, alice: dict[str, str]) -> None:
    # 32 levels is accepted by the parser; the field then fails its schema like any other wrong type.
    response = service.post("api-key/delete", {**alice, "content-type": "application/json"},
                            content=nested(DEEP_OK))
    assert_error(response, 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("field", ["remaining", "refillAmount", "refillInterval", "rateLimitTimeWindow",
                                   "rateLimitMax"])
@pytest.mark.parametrize("value,ok", [(INT_MAX, True), (INT_MAX + 1, False), (10**30, False)])
def test_integers_are_checked_against_their_columns(service: Service, field: str, value: int, ok: bool) -> None:
    owner = service.session()["x-test-user-id"]
    server = {"authorization": f"Bearer {SERVER_TOKEN}"}
    body: dict[str, Any] = {"userId": owner, field: value}
    if field == "refillAmount":
        body["refillInterval"] = 1000
    if field == "refillInterval":
        body["refillAmount"] = 1
    before = count_events(service.database_url)
    response = service.post("api-key/create", server, json=body)
    if ok:
        assert response.status_code == 200, response.text
        return
    assert_error(response, 400, "VALIDATION_ERROR")
    assert response.json()["message"] == f"[body.{field}] Too big: expected number to be <={INT_MAX}"
    assert count_events(service.database_url) == before


@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("raw", [str(INT_MAX + 1), "9223372036854775808", "1" + "0" * 25])
def test_list_paging_past_its_range_is_a_400(service: Service, alice: dict[str, str], name: str, raw: str) -> None:
    response = service.get("api-key/list", alice, params={name: raw})
    assert_error(response, 400, "VALIDATION_ERROR")
    assert response.json()["message"] == f"[query.{name}] Too big: expected number to be <={INT_MAX}"
    assert service.get("api-key/list", alice, params={name: str(INT_MAX)}).status_code == 200


def raw_request(service: Service, head: bytes, timeout: float = 30.0) -> bytes:
    """Send a raw HTTP/1.1 request head (in pieces, as a slow client would) and return what came back."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=timeout) as s:
        try:
            for i in range(0, len(head), 1 << 16):
                s.sendall(head[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed: what it answered is what counts
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


@pytest.mark.parametrize("size", [17 * 1024, 1 << 20, 64 << 20])
def test_huge_headers_are_a_431_before_the_app(service: Service, size: int) -> None:
    head = (b"GET /api/auth/api-key/list HTTP/1.1\r\nHost: x\r\nCookie: better-auth.session_token="
            + b"a" * size + b"\r\n\r\n")
    answer = raw_request(service, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code":"REQUEST_HEADER_FIELDS_TOO_LARGE"' in answer
    assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200


def test_headers_just_under_the_limit_are_served(service: Service) -> None:
    response = httpx.get(f"{service.url}/health", headers={"x-filler": "f" * (15 * 1024)}, timeout=5)
    assert response.status_code == 200


@pytest.mark.parametrize("filler", [17 * 1024, 40 * 1024])
def test_a_huge_head_pipelined_behind_a_small_request_is_a_431_after_its_answer(service: Service, filler: int) -> None:
    # The second head begins in the read that ends the first request: its bytes must still count. Both arrive in
    # one write, so the refusal is decided before the first request is even served: it must wait for its answer
    # (HTTP/1.1 answers in order; a 431 first would be taken for the first request's answer).
    small = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * filler + b"\r\n\r\n"
    answer = raw_request(service, small + huge)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"431"], answer[:400]
    assert answer.endswith(b'"code":"REQUEST_HEADER_FIELDS_TOO_LARGE"}')


def test_a_request_that_is_not_http_is_a_json_400_after_the_answers_before_it(service: Service) -> None:
    small = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_request(service, small + small + b"GET /health HTTP/1.1\r\nHost x\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"400"], answer[:600]
    head, _, body = answer.rpartition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.rsplit(b"HTTP/1.1 400", 1)[1]
    assert json.loads(body) == {"message": "Invalid HTTP request", "code": "INVALID_HTTP_REQUEST"}
    alone = raw_request(service, b"\x16\x03\x01 not http\r\n\r\n")
    assert alone.startswith(b"HTTP/1.1 400 ") and alone.endswith(b'"code":"INVALID_HTTP_REQUEST"}'), alone


def test_concurrent_huge_headers_keep_memory_bounded(service: Service) -> None:
    assert service.proc is not None
    proc = psutil.Process(service.proc.pid)
    before = proc.memory_info().rss
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * (64 << 20) + b"\r\n\r\n"
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(raw_request(service, head))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 4 and all(a.startswith(b"HTTP/1.1 431 ") for a in answers)
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 20, f"RSS grew {grown:.0f} MB for four 64 MB headers"


def test_a_null_origin_is_refused_even_with_a_trusted_referer(service: Service, alice: dict[str, str]) -> None:
    key = service.create_key(alice)
    cookie = {"cookie": alice["cookie"]}
    for headers in ({**cookie, "origin": "null", "referer": f"{service.origin}/settings"},
                    {**cookie, "origin": "null"}, cookie):
        assert_error(service.delete(headers, key["id"]), 403, "MISSING_OR_NULL_ORIGIN")
    assert_error(service.delete({**cookie, "referer": "https://evil.test/x"}, key["id"]), 403, "INVALID_ORIGIN")
    assert count_events(service.database_url, key["id"]) == 1
    # The browser vouching for a same-origin request is enough, as in better-auth.
    same = service.delete({**cookie, "origin": "null", "sec-fetch-site": "same-origin"}, key["id"])
    assert same.status_code == 200, same.text


def test_the_secure_cookie_wins_over_a_tossed_plain_one(service: Service) -> None:
    a, b = service.session(), service.session()
    a_value = a["cookie"].split("=", 1)[1]
    both = {"cookie": f"{b['cookie']}; __Secure-better-auth.session_token={a_value}", "origin": service.origin}
    listed = service.get("api-key/list", both)
    assert listed.status_code == 200
    mine = service.create_key(both)
    assert mine["referenceId"] == a["x-test-user-id"]


@pytest.mark.parametrize("permissions", [{}, {"sites": []}, {"sites": ["read"], "files": []}])
def test_empty_permission_requests_are_refused_as_better_auth_does(service: Service, permissions: Any) -> None:
    owner = service.session()["x-test-user-id"]
    server = {"authorization": f"Bearer {SERVER_TOKEN}"}
    key = service.create_key(server, userId=owner, permissions={"sites": ["read"], "files": ["read"]})["key"]
    answer = service.post("api-key/verify", json={"key": key, "permissions": permissions}).json()
    assert answer["valid"] is False and answer["error"]["code"] == "KEY_NOT_FOUND", answer
    assert service.post("api-key/verify", json={"key": key, "permissions": {"sites": ["read"]}}).json()["valid"]


@pytest.mark.parametrize("argv", [
    ["audit", "as-of", "yesterday"],
    ["audit", "export", "--since", "nope"],
    ["audit", "export", "--until", "2026-13-45"],
    ["audit", "verify", "--head", "12:xyz"],
    ["import", "better-auth", "--from", "nope"],
])
def test_bad_cli_arguments_are_one_clear_error_and_exit_2(service: Service, argv: list[str]) -> None:
    env = {**os.environ, "DATABASE_URL": service.database_url, "NATS_URL": service.nats_url}
    done = subprocess.run([sys.executable, "-m", "keyledger.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.strip(), done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 200
