"""Deployment shapes: several NATS URLs, TLS and credentials, stream settings, a read-only PostgreSQL, and a
cache bound to several keyledger processes. Real nats-servers (one configured for TLS and a password, with
certificates made by ``openssl`` in the test), real PostgreSQL, real ``keyledger serve`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest
from nats.js.api import StreamConfig

from harness import ROOT, Service, delete_streams, free_port, unique_topology, wait_for, wait_until
from keyledger.client import KeyCache
from keyledger.config import nats_connect_options
from keyledger.embedded import find_nats_server


def ready(service: Service) -> httpx.Response:
    return httpx.get(f"{service.url}/ready", timeout=5)


@contextlib.contextmanager
def serving(database_url: str, nats_url: str, hint: str, tmp_path: Path,
            extra_env: dict[str, str] | None = None, *, shared_nats: bool = True) -> Iterator[Service]:
    """A ``keyledger serve``; its streams are deleted afterwards on a shared NATS (a private one just stops)."""
    topology = unique_topology(hint)
    svc = Service(database_url=database_url, nats_url=nats_url, topology=topology,
                  log_path=tmp_path / f"{hint}.log", extra_env=dict(extra_env or {})).start()
    try:
        yield svc
    finally:
        svc.stop()
        if shared_nats:
            asyncio.run(delete_streams(nats_url.split(",")[-1].strip(), topology))


# --------------------------------------------------------------------------------------------------------
# NATS_URL: a list; a URL that cannot be parsed stops the start
# --------------------------------------------------------------------------------------------------------
def test_nats_url_takes_a_list_and_skips_a_server_that_is_down(db_factory: Any, nats_url: str,
                                                               tmp_path: Path) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    with serving(db_factory.create("deploy_list"), f"{dead}, {nats_url}", "natslist", tmp_path) as svc:
        wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200 through the second URL")


@pytest.mark.parametrize("bad", ["127.0.0.1:4222", "http://127.0.0.1:4222", "nats://127.0.0.1:99999",
                                 "nats://127.0.0.1:4222,,nope"])
def test_a_nats_url_that_cannot_be_parsed_is_a_startup_error(db_factory: Any, bad: str) -> None:
    svc = Service(database_url=db_factory.create("deploy_bad"), nats_url=bad, topology=unique_topology("bad"))
    with pytest.raises(RuntimeError, match="exited with 2") as failed:
        svc.start(timeout=15)
    assert "NATS_URL" in str(failed.value)


# --------------------------------------------------------------------------------------------------------
# TLS (a private CA, the server verifying client certificates) and a password in the URL
# --------------------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    where.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=keyledger test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=where)
    (where / "san.cnf").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=where)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=where)
    return {n: where / f for n, f in (("ca", "ca.pem"), ("server_cert", "server.pem"), ("server_key", "server.key"),
                                       ("client_cert", "client.pem"), ("client_key", "client.key"))}


@contextlib.contextmanager
def tls_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, Path]]]:
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{tmp_path / 'js'}" }}
tls {{
  cert_file: "{certs['server_cert']}"
  key_file: "{certs['server_key']}"
  ca_file: "{certs['ca']}"
  verify: true
}}
authorization {{ user: keyledger, password: "s3cret-pw" }}
""")
    with private_nats(config, port, "the TLS nats-server"):
        yield f"tls://keyledger:s3cret-pw@127.0.0.1:{port}", certs


@contextlib.contextmanager
def private_nats(config: Path, port: int, what: str) -> Iterator[None]:
    """A nats-server of our own with ``config``, listening on ``port``, stopped afterwards."""
    proc = subprocess.Popen([find_nats_server(), "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _listening(port), timeout=10, what=what)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def test_tls_with_client_certificates_and_a_password(db_factory: Any, tmp_path: Path) -> None:
    with tls_nats(tmp_path) as (url, certs):
        tls_env = {"NATS_TLS_CA_FILE": str(certs["ca"]), "NATS_TLS_CERT_FILE": str(certs["client_cert"]),
                   "NATS_TLS_KEY_FILE": str(certs["client_key"])}
        # Without the client certificate the server refuses: the service starts, but is not ready.
        with serving(db_factory.create("deploy_notls"), url, "notls", tmp_path,
                     extra_env={"NATS_TLS_CA_FILE": str(certs["ca"])}, shared_nats=False) as svc:
            time.sleep(3.0)
            assert ready(svc).status_code == 503
            wait_until(lambda: "NATS not reachable" in svc.log_tail(200), timeout=10, what="a WARNING about NATS")
            assert "s3cret-pw" not in svc.log_tail(400)  # credentials never in the log
        with serving(db_factory.create("deploy_tls"), url, "tls", tmp_path, extra_env=tls_env,
                     shared_nats=False) as svc:
            wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200 over TLS")
            me = svc.session()
            key = svc.create_key(me)

            async def cache_over_tls() -> None:
                options = nats_connect_options(tls_env)
                async with KeyCache(svc.url, url, topology=svc.topology, nats_options=options) as cache:
                    await wait_for(lambda: cache.trusted, 15, "a freshness proof over TLS")
                    assert (await cache.verify(key["key"])).valid
                    await asyncio.to_thread(svc.delete, me, key["id"])
                    await wait_for(lambda: cache.verify_cached(key["key"]) is None, 5, "the invalidation over TLS")

            asyncio.run(cache_over_tls())


# --------------------------------------------------------------------------------------------------------
# nkey authentication: a server that knows only public keys; the service and a cache sign its challenge
# --------------------------------------------------------------------------------------------------------
async def a_revocation_reaches_a_cache(svc: Service, nats_url: str, cache_env: dict[str, str]) -> None:
    """A cache logged in with ``cache_env``'s credentials gets a proof, caches a key, and evicts it on revoke."""
    me = await asyncio.to_thread(svc.session)
    key = await asyncio.to_thread(svc.create_key, me)
    options = nats_connect_options(cache_env)
    async with KeyCache(svc.url, nats_url, topology=svc.topology, nats_options=options) as cache:
        await wait_for(lambda: cache.trusted, 15, "a freshness proof with these credentials")
        assert (await cache.verify(key["key"])).valid
        assert (await asyncio.to_thread(svc.delete, me, key["id"])).status_code == 200
        await wait_for(lambda: cache.verify_cached(key["key"]) is None, 5, "the invalidation")


def _nkey_user(where: Path, name: str) -> tuple[str, Path]:
    """A fresh user nkey: its public key (for the server) and a file holding its seed (for the client)."""
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = where / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return nkeys.from_seed(bytearray(seed)).public_key.decode(), path


@contextlib.contextmanager
def nkey_nats(tmp_path: Path, public_keys: list[str]) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "nats-nkey.conf"
    users = ", ".join(f'{{ nkey: "{key}" }}' for key in public_keys)
    config.write_text(f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{tmp_path / 'js-nkey'}" }}
authorization {{ users: [ {users} ] }}
""")
    with private_nats(config, port, "the nkey nats-server"):
        yield f"nats://127.0.0.1:{port}"


def test_nkey_authentication(db_factory: Any, tmp_path: Path) -> None:
    service_key, service_seed = _nkey_user(tmp_path, "service")
    cache_key, cache_seed = _nkey_user(tmp_path, "cache")
    _, stranger_seed = _nkey_user(tmp_path, "stranger")
    with nkey_nats(tmp_path, [service_key, cache_key]) as url:
        # A seed the server does not know: refused, so the service runs but is not ready, and says why.
        with serving(db_factory.create("deploy_nkey_no"), url, "nkeyno", tmp_path,
                     extra_env={"NATS_NKEY_SEED_FILE": str(stranger_seed)}, shared_nats=False) as svc:
            wait_until(lambda: "NATS not reachable" in svc.log_tail(200), timeout=15, what="a WARNING about NATS")
            assert ready(svc).status_code == 503
            assert stranger_seed.read_text().strip() not in svc.log_tail(400)  # the seed never in the log
        with serving(db_factory.create("deploy_nkey"), url, "nkey", tmp_path,
                     extra_env={"NATS_NKEY_SEED_FILE": str(service_seed)}, shared_nats=False) as svc:
            wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200 with an nkey")
            asyncio.run(a_revocation_reaches_a_cache(svc, url, {"NATS_NKEY_SEED_FILE": str(cache_seed)}))


# --------------------------------------------------------------------------------------------------------
# A .creds file: a server in operator (JWT) mode, with an account and users signed as nsc would sign them
# --------------------------------------------------------------------------------------------------------
def _jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS v2 JWT: ``header.claims`` signed with the issuer's nkey (ed25519), base64url without padding."""
    import base64
    import hashlib
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims: dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
                              "sub": subject, "nats": {**nats_claims, "version": 2}}
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signed = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(issuer.sign(signed.encode()))}"


def _keypair(prefix: int) -> tuple[Any, bytes]:
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(bytearray(seed)), seed


@contextlib.contextmanager
def operator_nats(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A nats-server in operator mode (JetStream on for one account); yields its URL and a function that
    writes a ``.creds`` file for a new user of that account."""
    import nkeys

    operator, _ = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs the server's system account
    account_id, system_id = account.public_key.decode(), system.public_key.decode()
    unlimited = {name: -1 for name in ("subs", "data", "payload", "imports", "exports", "conn", "leaf",
                                       "mem_storage", "disk_storage", "streams", "consumer")}
    operator_jwt = tmp_path / "operator.jwt"
    operator_jwt.write_text(_jwt(operator, operator.public_key.decode(), "op", {"type": "operator"}))
    account_jwt = _jwt(operator, account_id, "keyledger", {
        "type": "account", "limits": {**unlimited, "wildcards": True}, "default_permissions": {"pub": {}, "sub": {}}})
    system_jwt = _jwt(operator, system_id, "SYS", {"type": "account"})
    port = free_port()
    config = tmp_path / "nats-operator.conf"
    config.write_text(f"""
listen: 127.0.0.1:{port}
operator: "{operator_jwt}"
system_account: {system_id}
resolver: MEMORY
resolver_preload: {{ {account_id}: "{account_jwt}", {system_id}: "{system_jwt}" }}
jetstream {{ store_dir: "{tmp_path / 'js-operator'}" }}
""")

    def creds(name: str) -> Path:
        user, seed = _keypair(nkeys.PREFIX_BYTE_USER)
        token = _jwt(account, user.public_key.decode(), name,
                     {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
        path = tmp_path / f"{name}.creds"
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")
        path.chmod(0o600)
        return path

    with private_nats(config, port, "the operator-mode nats-server"):
        yield f"nats://127.0.0.1:{port}", creds


def test_a_creds_file_against_an_operator_mode_server(db_factory: Any, tmp_path: Path) -> None:
    with operator_nats(tmp_path) as (url, creds):
        # Without credentials the server refuses: the service runs, but is not ready.
        with serving(db_factory.create("deploy_nocreds"), url, "nocreds", tmp_path, shared_nats=False) as svc:
            wait_until(lambda: "NATS not reachable" in svc.log_tail(200), timeout=15, what="a WARNING about NATS")
            assert ready(svc).status_code == 503
        service_creds = creds("service")
        with serving(db_factory.create("deploy_creds"), url, "creds", tmp_path,
                     extra_env={"NATS_CREDS_FILE": str(service_creds)}, shared_nats=False) as svc:
            wait_until(lambda: ready(svc).status_code == 200, timeout=30, what="/ready 200 with a .creds file")
            seed = service_creds.read_text().split("SEED-----\n")[1].split("\n")[0]
            assert seed not in svc.log_tail(400)
            asyncio.run(a_revocation_reaches_a_cache(svc, url, {"NATS_CREDS_FILE": str(creds("cache"))}))


@pytest.mark.parametrize("env,message", [
    ({"NATS_TLS_CA_FILE": "/nonexistent/ca.pem"}, "NATS_TLS_CA_FILE"),
    ({"NATS_TLS_CERT_FILE": "/etc/hostname"}, "go together"),
    ({"NATS_CREDS_FILE": "/nonexistent/x.creds"}, "NATS_CREDS_FILE"),
])
def test_missing_credential_files_are_a_startup_error(db_factory: Any, nats_url: str, env: dict[str, str],
                                                      message: str) -> None:
    svc = Service(database_url=db_factory.create("deploy_cred"), nats_url=nats_url,
                  topology=unique_topology("cred"), extra_env=env)
    with pytest.raises(RuntimeError, match="exited with 2") as failed:
        svc.start(timeout=15)
    assert message in str(failed.value)


# --------------------------------------------------------------------------------------------------------
# Stream settings: a different existing stream is reported once; migrate --streams updates it
# --------------------------------------------------------------------------------------------------------
def test_a_stream_with_other_settings_is_reported_and_migrate_updates_it(db_factory: Any, nats_url: str,
                                                                         tmp_path: Path) -> None:
    topology = unique_topology("streams")

    async def precreate() -> None:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=topology.invalidations_stream,
                                                         subjects=[topology.invalidation_subject], max_age=60.0))
        finally:
            await nc.close()

    async def max_age() -> float:
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().stream_info(topology.invalidations_stream)).config.max_age
        finally:
            await nc.close()

    asyncio.run(precreate())
    database_url = db_factory.create("deploy_streams")
    env = {"KEYLEDGER_INVALIDATIONS_MAX_AGE": "3600"}
    svc = Service(database_url=database_url, nats_url=nats_url, topology=topology, log_path=tmp_path / "s.log",
                  extra_env=env).start()
    try:
        wait_until(lambda: "differs from keyledger's settings" in svc.log_tail(200), timeout=10,
                   what="the WARNING about the stream")
        line = next(ln for ln in svc.log_tail(200).splitlines() if "differs from keyledger's settings" in ln)
        assert "WARNING" in line and "max_age is 60.0, configured 3600.0" in line
        assert svc.log_tail(400).count("differs from keyledger's settings") == 1  # once, not on every retry
        assert asyncio.run(max_age()) == 60.0  # left as it is
        done = subprocess.run([sys.executable, "-m", "keyledger.cli", "migrate", "--streams"], env=svc.env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"stream {topology.invalidations_stream}: max_age 60.0 -> 3600.0" in done.stderr
        assert asyncio.run(max_age()) == 3600.0
        again = subprocess.run([sys.executable, "-m", "keyledger.cli", "migrate", "--streams"], env=svc.env(),
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "streams as configured" in again.stderr, again.stderr
    finally:
        svc.stop()
        asyncio.run(delete_streams(nats_url, topology))


# --------------------------------------------------------------------------------------------------------
# PostgreSQL read-only (a standby, a failover in progress): 503 with the JSON error, never 500
# --------------------------------------------------------------------------------------------------------
def test_a_read_only_database_is_a_503_and_ready_says_why(db_factory: Any, nats_url: str, tmp_path: Path) -> None:
    database_url = db_factory.create("deploy_ro")
    with serving(database_url, nats_url, "readonly", tmp_path) as svc:
        me = svc.session()
        key = svc.create_key(me)
        wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200")
        with psycopg.connect(database_url, autocommit=True) as conn:
            dbname = conn.info.dbname

            def reconnect_everyone(read_only: bool) -> None:
                conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = '
                             f'{"on" if read_only else "off"}')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                             " AND pid <> pg_backend_pid()", (dbname,))

            reconnect_everyone(True)
            try:
                def refused() -> httpx.Response | None:
                    r = svc.delete(me, key["id"])
                    return r if r.status_code == 503 and "read-only" in r.json().get("message", "") else None

                answer = wait_until(refused, timeout=20, what="a read-only 503")
                assert answer.json()["code"] == "SERVICE_UNAVAILABLE"
                assert svc.verify(key["key"])["valid"] is True  # reads still answer
                not_ready = wait_until(lambda: ready(svc) if ready(svc).status_code == 503 else None, timeout=10,
                                       what="/ready 503")
                assert any("read-only" in r for r in not_ready.json()["reasons"])
            finally:
                reconnect_everyone(False)
            wait_until(lambda: svc.delete(me, key["id"]).status_code == 200, timeout=20, what="writes again")
            wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200 again")


def keepalive_timers(port: int) -> dict[int, float | None]:
    """peer port -> seconds left on the keepalive timer of each established TCP socket whose local port is
    ``port`` (the kernel's view, ``ss -o``); None when the socket shows no keepalive timer at that instant."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    timers: dict[int, float | None] = {}
    for line in out.splitlines():
        fields = line.split()
        peer = int(fields[3].rsplit(":", 1)[1])
        match = re.search(r"timer:\(keepalive,(?:(\d+)min)?(?:([\d.]+)sec)?(?:(\d+)ms)?", line)
        timers[peer] = None if match is None else (
            60 * float(match[1] or 0) + float(match[2] or 0) + float(match[3] or 0) / 1000)
    return timers


def test_postgresql_ends_a_vanished_service_hosts_sessions_in_seconds(db_factory: Any, nats_url: str,
                                                                      tmp_path: Path) -> None:
    """Every connection ``keyledger serve`` holds asks PostgreSQL for TCP keepalives (10 s idle, then 3 probes
    5 s apart: storage/connections.py), so when a service host vanishes without closing its sockets, PostgreSQL
    ends its sessions, and what a transaction in flight held, in about 25 s, not the OS default of two hours.
    Seen from the kernel: the server's end of each of the service's connections arms a keepalive timer of at most
    10 s (the default would read about 120 minutes)."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read the kernel's socket timers")
    database_url = db_factory.create("deploy_keepalive")
    with serving(database_url, nats_url, "keepalive", tmp_path) as svc:
        wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200")
        with psycopg.connect(database_url, autocommit=True) as conn:
            if conn.execute("SELECT inet_client_addr()").fetchone()[0] is None:
                pytest.skip("PostgreSQL is reached over a Unix socket here (the embedded one): no TCP to keep alive")
            server_port = int(conn.execute("SHOW port").fetchone()[0])

            def service_ports() -> set[int] | None:
                ports = {r[0] for r in conn.execute(
                    "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND client_port > 0").fetchall()}
                return ports if len(ports) >= 5 else None

            # the request pool, the leader's lease, the relay, the projections, the sealer, the sweeper
            ports = wait_until(service_ports, timeout=20, interval=0.1, what="the service's connections")

        def armed() -> dict[int, float | None] | None:
            timers = keepalive_timers(server_port)
            seen = {port: timers.get(port) for port in ports if port in timers}
            return seen if seen and all(t is not None for t in seen.values()) else None

        timers = wait_until(armed, timeout=10, interval=0.1, what="keepalive timers on the server's sockets")
        assert all(t <= 10.0 for t in timers.values()), timers


def test_each_database_session_of_the_service_says_what_it_is_for(db_factory: Any, nats_url: str,
                                                                  tmp_path: Path) -> None:
    """An operator reading ``pg_stat_activity`` sees which part of keyledger holds each session (its
    ``application_name``): the request pool, the lease and, in the leader, the relay, the projections, the sealer
    and the sweeper."""
    database_url = db_factory.create("deploy_appname")
    expected = {"keyledger requests", "keyledger lease", "keyledger relay", "keyledger active keys",
                "keyledger receipts", "keyledger audit sealer", "keyledger expiry sweeper"}
    with serving(database_url, nats_url, "appname", tmp_path) as svc:
        wait_until(lambda: ready(svc).status_code == 200, timeout=20, what="/ready 200")
        with psycopg.connect(database_url, autocommit=True) as conn:
            def names() -> set[str] | None:
                seen = {r[0] for r in conn.execute(
                    "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()").fetchall()}
                return seen if expected <= seen else None

            wait_until(names, timeout=20, interval=0.1, what=f"sessions named {sorted(expected)}")


# --------------------------------------------------------------------------------------------------------
# A cache bound to several keyledger processes fails over
# --------------------------------------------------------------------------------------------------------
def test_a_cache_fails_over_to_another_keyledger_process(db_factory: Any, nats_url: str, tmp_path: Path) -> None:
    database_url = db_factory.create("deploy_failover")
    topology = unique_topology("failover")
    first = Service(database_url=database_url, nats_url=nats_url, topology=topology,
                    log_path=tmp_path / "a.log").start()
    second = Service(database_url=database_url, nats_url=nats_url, topology=topology,
                     log_path=tmp_path / "b.log").start()
    try:
        me = first.session()
        keys = [first.create_key(me) for _ in range(3)]

        async def scenario() -> None:
            async with KeyCache([first.url, second.url], nats_url, topology=topology) as cache:
                assert (await cache.verify(keys[0]["key"])).valid
                first.kill()
                for key in keys[1:]:
                    result = await cache.verify(key["key"])
                    assert result.valid, result
                assert cache.active_base_url == second.url

        asyncio.run(scenario())
    finally:
        first.stop()
        second.stop()
        asyncio.run(delete_streams(nats_url, topology))
