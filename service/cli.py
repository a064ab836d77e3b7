"""The keyledger command: every parser and thin command (serve, migrate, dev-session, dev-cluster, receipts,
history, replay, audit, import). The capabilities themselves live in ops/ (audit, replay, import), storage/ and
background/, and know nothing of argparse; where the servers are is environment.py's business.
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

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .background.bus import ensure_streams
from .config import (ConfigError, Settings, StreamSettings, Topology, nats_connect_options, nats_servers,
                     redact_conninfo)
from .core.events import encode_envelope, kind
from .environment import Environment
from .http import auth
from .ops import audit, importer
from .ops.replay import PROJECTIONS, replay
from .projections import receipts
from .storage.schema import migrate
from .storage.store import read_stream

log = logging.getLogger("keyledger")


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not _port_free(args.host, args.port):
        raise ConfigError(f"{args.host}:{args.port} is already in use (another keyledger serve?); "
                          "choose another with --port")
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
        from .http.limits import BoundedHttpToolsProtocol

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
            uvicorn.run("keyledger.http.app:create_app_from_env", factory=True, workers=args.workers, **common)
        else:
            from .http.app import create_app  # only here: with workers, this process is just their supervisor

            uvicorn.run(create_app(settings), **common)
    finally:
        env.stop()
    return 0


def _port_free(host: str, port: int) -> bool:
    """Checked before any embedded server starts, so a second serve on a taken port changes nothing."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _with_roles(settings: Settings, args: argparse.Namespace) -> Settings:
    from dataclasses import replace

    # A flag can only take a role away: KEYLEDGER_RUN_RELAY=0 / KEYLEDGER_RUN_PROJECTIONS=0 hold without flags.
    return replace(settings, run_relay=settings.run_relay and not args.no_relay,
                   run_projections=settings.run_projections and not args.no_projections)


def cmd_migrate(args: argparse.Namespace) -> int:
    env = Environment(need_nats=args.streams, create=True)
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
        async def read() -> tuple[list[Any], dict[str, Any] | None]:
            async with await psycopg.AsyncConnection.connect(env.database_url, autocommit=True) as conn:
                return await read_stream(conn, args.key_id), await receipts.read(conn, args.key_id)

        events, receipt = asyncio.run(read())
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
        if receipt is not None and receipt["position"] == e.position:
            confirmed = sum(c["state"] == "confirmed" for c in receipt["caches"])
            print(f"     effective everywhere: {receipt['effectiveEverywhereAt'] or 'pending'} "
                  f"({confirmed} of {len(receipt['caches'])} caches confirmed; `keyledger receipts` for each)")
    return 0


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    """The deployment shape on loopback: a 3-node JetStream cluster (R3 streams), one PostgreSQL, and
    ``--processes`` ``keyledger serve`` processes on consecutive ports, all sharing one secret. Ctrl-C stops it."""
    import subprocess
    import time

    from .embedded import NatsCluster, start_postgres

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


def cmd_replay(args: argparse.Namespace) -> int:
    if args.projection not in PROJECTIONS:
        print(f"keyledger: unknown projection {args.projection!r} (known: {', '.join(PROJECTIONS)})",
              file=sys.stderr)
        return 2
    env = Environment(need_nats=False)
    try:
        report = replay(env.database_url, args.projection, progress=not args.quiet)
    finally:
        env.stop()
    print(report.summary(), file=sys.stderr)
    return 0


def cmd_receipts(args: argparse.Namespace) -> int:
    """A key's revocation receipt: when it took effect in each cache, and everywhere."""
    import asyncio

    env = Environment(need_nats=False)

    async def fetch() -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(env.database_url, autocommit=True) as conn:
            return await receipts.read(conn, args.key_id)

    try:
        receipt = asyncio.run(fetch())
    finally:
        env.stop()
    if receipt is None:
        print(f"keyledger: key {args.key_id} has no revocation (or it is unknown)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(receipt))
        return 0
    everywhere = receipt["effectiveEverywhereAt"] or "pending"
    print(f"{receipt['type']} at position {receipt['position']}, {receipt['revokedAt']}; everywhere: {everywhere}")
    for cache in receipt["caches"]:
        print(f"  {cache['state']:<9} {cache['cacheId']} ({cache['service'] or '-'})  "
              f"effective {cache['effectiveAt'] or '-'}  last seen {cache['lastSeenAt'] or '-'}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# audit as-of|export|verify|head (ops/audit.py)
# ----------------------------------------------------------------------------------------------------------
def _instant(text: str) -> dt.datetime:
    """``audit.parse_instant`` as an argparse ``type``: a bad value is one line and exit status 2, never a
    traceback."""
    try:
        return audit.parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_audit_as_of(args: argparse.Namespace) -> int:
    at = args.instant
    env = Environment(need_nats=False)
    try:
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            keys = audit.as_of(conn, at)
    finally:
        env.stop()
    out = sys.stdout
    if args.json:
        encoder = msgspec.json.Encoder()
        buf = bytearray()
        for key in keys:
            encoder.encode_into(key, buf, len(buf))
            buf += b"\n"
        sys.stdout.buffer.write(buf)
    else:
        for key in keys:
            expires = key.expires_at.astimezone(dt.timezone.utc).isoformat() if key.expires_at else "never"
            grace = "".join(f"  +start={g.start} until {g.grace_until.astimezone(dt.timezone.utc).isoformat()}"
                            for g in key.superseded)
            out.write(f"{key.key_id}  owner={key.reference_id}  start={key.start}  expires={expires}  "
                      f"name={key.name!r}{grace}\n")
    print(f"keyledger: {len(keys):,} keys active at {at.isoformat()}", file=sys.stderr)
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    since, until = args.since, args.until
    env = Environment(need_nats=False)
    try:
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            out = sys.stdout.buffer
            for chunk in audit.export_chunks(conn, since, until, args.key):
                out.write(chunk)
            out.flush()
    finally:
        env.stop()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        anchor = audit.parse_anchor(args.head) if args.head else None
    except ValueError as exc:
        print(f"keyledger: --head: {exc}", file=sys.stderr)
        return 2
    env = Environment(need_nats=False)
    try:
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            if args.seal:
                with psycopg.connect(env.database_url, autocommit=True) as lead:
                    if audit.try_lead(lead):
                        audit.seal(lead)
            verdict = audit.verify(conn, anchor)
    finally:
        env.stop()
    print(verdict.summary(), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def cmd_audit_head(args: argparse.Namespace) -> int:
    env = Environment(need_nats=False)
    try:
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            current = audit.head(conn)
    finally:
        env.stop()
    if current is None:
        print("keyledger: the chain is empty (nothing sealed yet)", file=sys.stderr)
        return 1
    print(f"{current[0]}:{current[1]}")
    return 0


def _add_audit_parsers(sub: Any) -> None:
    """``audit {as-of,export,verify,head}`` (ops/audit.py)."""
    p = sub.add_parser("audit", help="tamper-evident chain, exports and point-in-time queries")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)

    p = audit_sub.add_parser("as-of", help="the keys active at an instant, from the log")
    p.add_argument("instant", type=_instant, help="ISO-8601; without a zone it is UTC")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_audit_as_of)

    p = audit_sub.add_parser("export", help="events as JSON lines with their chain hashes, in position order")
    p.add_argument("--since", type=_instant, help="recorded at or after (ISO-8601, inclusive)")
    p.add_argument("--until", type=_instant, help="recorded before (ISO-8601, exclusive)")
    p.add_argument("--key", help="only this key's events")
    p.set_defaults(func=cmd_audit_export)

    p = audit_sub.add_parser("verify", help="recompute the chain from the events; exit 1 naming the first bad position")
    p.add_argument("--head", help="POSITION:HASH anchor (as published on <prefix>.audit.head)")
    p.add_argument("--seal", action="store_true", help="seal what is final first (when no sealer runs)")
    p.set_defaults(func=cmd_audit_verify)

    p = audit_sub.add_parser("head", help="print the chain head as POSITION:HASH")
    p.set_defaults(func=cmd_audit_head)


# ----------------------------------------------------------------------------------------------------------
# import better-auth (ops/importer.py)
# ----------------------------------------------------------------------------------------------------------
def cmd_import_better_auth(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    env = Environment(need_nats=False)
    try:
        if not args.dry_run:
            importer.connect(env.database_url, "target").close()  # unreachable: say which database it is
            # The schema must know ApiKeyImported (its projection branch) before the first event lands.
            migrate(env.database_url)
        report = importer.run_import(args.source_url, env.database_url, dry_run=args.dry_run,
                                     batch_size=args.batch_size, table=args.table, progress=sys.stderr)
    except importer.Unreachable as exc:
        given = "--from" if exc.which == "source" else "embedded" if env.embedded else "DATABASE_URL"
        print(f"keyledger: cannot reach the {exc.which} database ({given} {redact_conninfo(exc.url)}): {exc.reason}",
              file=sys.stderr)
        return 3
    finally:
        env.stop()
    report.render(sys.stdout)
    sys.stdout.flush()
    if report.imported and not args.dry_run and env.embedded:
        print("keyledger: the events are in the outbox; `keyledger serve` publishes them to NATS",
              file=sys.stderr)
    return report.exit_code


def _database_url(text: str) -> str:
    """An argparse ``type``: a libpq URL or key=value string, else one line and exit status 2."""
    try:
        conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        raise argparse.ArgumentTypeError(f"not a PostgreSQL connection URL: {text!r} ({exc})") from None
    return text


def _add_import_parsers(sub: Any) -> None:
    """``import better-auth --from URL [--dry-run]`` (ops/importer.py)."""
    p = sub.add_parser("import", help="adopt existing API keys from another system")
    sources = p.add_subparsers(dest="import_source", required=True, metavar="SOURCE")
    b = sources.add_parser(
        "better-auth", help="import better-auth's apikey table (stored hashes: keys keep working)",
        description=importer.__doc__.split("\n\n", 1)[1].split("\n\nExit status", 1)[0] if importer.__doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 all rows imported or already present; 1 some rows rejected (listed); "
               "2 configuration problem; 3 database unavailable",
    )
    b.add_argument("--from", dest="source_url", required=True, metavar="DATABASE_URL", type=_database_url,
                   help="the better-auth database (read only)")
    b.add_argument("--dry-run", action="store_true", help="report what would happen; write nothing")
    b.add_argument("--table", default="apikey", help="the source table, optionally schema-qualified "
                   "(default: apikey in the search path)")
    b.add_argument("--batch-size", type=int, default=importer.BATCH_SIZE, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_import_better_auth)


def _describe(e: Any) -> str:
    data = msgspec.to_builtins(e.event)
    data.pop("type", None)
    data.pop("keyHash", None)
    shown = {k: v for k, v in data.items() if v is not None}
    if e.type in ("ApiKeyCreated", "ApiKeyImported"):
        origin = (f" imported from {data.get('source')}, created {data.get('createdAt')}"
                  if e.type == "ApiKeyImported" else "")
        return f"  name={data.get('name')!r} owner={data.get('referenceId')}{origin}"
    return ("  " + json.dumps(shown, sort_keys=True)) if shown else ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keyledger")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="keyledger", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="keyledger: an event-sourced API-key service, wire-compatible with better-auth's API-key plugin.",
        epilog="With neither DATABASE_URL nor NATS_URL set, commands use the embedded PostgreSQL and NATS of\n"
               "KEYLEDGER_DATA_DIR (default ./.keyledger), started by `keyledger serve`. "
               "`keyledger COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"keyledger {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve", help="run the HTTP API, the outbox relay and the projections",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Environment: DATABASE_URL and NATS_URL (neither: embedded servers in KEYLEDGER_DATA_DIR), "
               "BETTER_AUTH_SECRET, TRUSTED_ORIGINS, KEYLEDGER_SERVICE_TOKEN, KEYLEDGER_POOL_MAX, NATS_TLS_*, "
               "NATS_CREDS_FILE, KEYLEDGER_STREAM_*: see docs/operations.md, 'Every setting'.")
    p.add_argument("--host", default=os.environ.get("KEYLEDGER_HOST", "127.0.0.1"),
                   help="address to listen on (KEYLEDGER_HOST)")
    p.add_argument("--port", type=int, default=int(os.environ.get("KEYLEDGER_PORT", "3000")),
                   help="port to listen on (KEYLEDGER_PORT)")
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

    p = sub.add_parser("receipts", help="when a key's revocation took effect in each cache, and everywhere")
    p.add_argument("key_id")
    p.add_argument("--json", action="store_true", help="the same JSON as GET /api/auth/api-key/revocation")
    p.set_defaults(func=cmd_receipts)

    p = sub.add_parser("history", help="a key's events in order")
    p.add_argument("key_id")
    p.add_argument("--json", action="store_true", help="one JSON envelope per line")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("replay", help="rebuild a projection from the event log (built aside, then swapped)")
    p.add_argument("--projection", default="active_api_keys")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    _add_audit_parsers(sub)
    _add_import_parsers(sub)

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
