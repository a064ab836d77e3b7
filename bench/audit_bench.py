#!/usr/bin/env python3
"""Audit and replay benchmark: 1,000,000 events, then replay, seal, verify, as-of and export, in events/s.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python bench/audit_bench.py [--events N] [--keep]

A fresh database ``kl_auditbench_<rand>`` is created on that server (schema.sql applied) and
dropped at the end (``--keep`` keeps it and prints its URL). No service and no NATS: everything here reads
the log directly, which is what the commands do.

Seeding is fast because it is a COPY of rows generated in Python, *through* the events triggers (positions are
drawn by ``events_position``, the outbox trigger runs too). The bench has no relay, so the outbox is emptied
afterwards (``DELETE FROM outbox``): it would otherwise hold a million rows nobody publishes.

After sealing, ``event_chain`` is VACUUM ANALYZEd like ``events`` (this machine's PostgreSQL runs with
autovacuum off; a live system's autovacuum keeps up with both tables as they grow), and each timed step starts
after a CHECKPOINT, so that it is not charged for writing what the bulk seed and seal left dirty.

Replay runs twice: first on the seeded log (no projection has seen it, so replay also creates ~300k tracking
rows), then, as on a live system whose inline projection keeps its tracking rows, after
``DELETE FROM active_api_keys``: the second is the replay figure; both are printed.

Targets (issue 4): replay >= 250,000 events/s; verify >= 300,000 events/s; as-of over 1M events <= 5 s;
export >= 200,000 events/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import random
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = {"replay_eps": 250_000, "verify_eps": 300_000, "as_of_s": 5.0, "export_eps": 200_000}
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Seeding: realistic lifecycles, interleaved across keys, COPYed through the triggers
# ------------------------------------------------------------------------------------------------------------
def generate(total: int, *, seed: int = 4, start: dt.datetime | None = None) -> Any:
    """Yield COPY rows ``(id, stream_id, version, type, data, metadata, recorded_at)`` in append order.

    About 3.3 events per key: every key is created; then, picked at random among live keys, updates
    (name / expiry), disable/enable flips, rotations (half of them with a day of grace for the old secret,
    which a later pick of the key retires) and revocations (a revoked key gets nothing more).
    """
    rng = random.Random(seed)
    at = start or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    step = dt.timedelta(milliseconds=7)
    live: list[list[Any]] = []  # [key_id, version, key_hash, enabled, superseded hashes in grace]
    encode = msgspec.json.encode
    users = [uuid.uuid4().hex for _ in range(5000)]
    n = 0
    while n < total:
        at += step
        meta = encode({"userId": users[n % len(users)], "ipAddress": "10.0.0.1", "requestId": str(n)}).decode()
        if not live or rng.random() < 0.30:
            key_id = "".join(rng.choices(ALNUM, k=32))
            key_hash = "".join(rng.choices(ALNUM, k=43))
            expires = (at + dt.timedelta(days=rng.choice((1, 30, 365)))) if rng.random() < 0.5 else None
            data = {
                "keyHash": key_hash, "configId": "default", "referenceId": users[rng.randrange(len(users))],
                "userId": None, "name": f"key {n}", "start": key_id[:6], "prefix": None, "enabled": True,
                "expiresAt": expires, "metadata": None, "permissions": None, "rateLimitEnabled": False,
                "rateLimitTimeWindow": 86400000, "rateLimitMax": 10, "remaining": None, "refillAmount": None,
                "refillInterval": None,
            }
            live.append([key_id, 1, key_hash, True, []])
            yield (str(uuid.UUID(int=rng.getrandbits(128), version=4)), key_id, 1, "ApiKeyCreated",
                   encode(data).decode(), meta, at)
        else:
            i = rng.randrange(len(live))
            key = live[i]
            roll = rng.random()
            key[1] += 1
            if key[4] and roll < 0.5:  # the grace period of a superseded secret ended
                etype, data = "ApiKeySecretRetired", {"keyHash": key[4].pop(), "graceUntil": at}
            elif roll < 0.25:
                etype, data = "ApiKeyRevoked", {"keyHash": key[2]}
                live[i] = live[-1]
                live.pop()
            elif roll < 0.28:
                new_hash = "".join(rng.choices(ALNUM, k=43))
                grace = at + dt.timedelta(days=1) if rng.random() < 0.5 else None
                etype, data = "ApiKeyRotated", {"keyHash": new_hash, "previousKeyHash": key[2],
                                                "start": new_hash[:6], "graceUntil": grace}
                if grace is not None:
                    key[4].append(key[2])
                key[2] = new_hash
            elif roll < 0.55:
                etype = "ApiKeyEnabled" if not key[3] else "ApiKeyDisabled"
                key[3] = not key[3]
                data = {"keyHash": key[2]}
            else:
                etype = "ApiKeyUpdated"
                data = {"keyHash": key[2], "name": f"renamed {n}"}
                if rng.random() < 0.3:
                    data["expiresAt"] = at + dt.timedelta(days=1)
            yield (str(uuid.UUID(int=rng.getrandbits(128), version=4)), key[0], key[1], etype,
                   encode(data).decode(), meta, at)
        n += 1


COPY_EVENTS = "COPY events (id, stream_id, version, type, data, metadata, recorded_at) FROM STDIN"


def seed(database_url: str, total: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(COPY_EVENTS) as copy:
                buf = io.StringIO()
                for i, row in enumerate(generate(total), 1):
                    eid, key, version, etype, data, meta, at = row
                    # COPY text format: our strings hold no tab, newline or backslash except JSON escapes.
                    buf.write(f"{eid}\t{key}\t{version}\t{etype}\t{_copy_text(data)}\t{_copy_text(meta)}\t"
                              f"{at.isoformat()}\n")
                    if i % 20_000 == 0:
                        copy.write(buf.getvalue())
                        buf = io.StringIO()
                copy.write(buf.getvalue())
        conn.execute("DELETE FROM outbox")  # no relay in this bench (see the module docstring)
        conn.execute("VACUUM ANALYZE events")
        conn.execute("VACUUM ANALYZE outbox")
    return time.perf_counter() - started


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\")


# ------------------------------------------------------------------------------------------------------------
# Database lifecycle
# ------------------------------------------------------------------------------------------------------------
def create_database(admin_url: str) -> tuple[str, str]:
    name = f"kl_auditbench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    url = make_conninfo("", **params)
    with psycopg.connect(url) as conn:
        conn.execute((ROOT / "schema.sql").read_text())
        conn.commit()
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# ------------------------------------------------------------------------------------------------------------
# The timed steps
# ------------------------------------------------------------------------------------------------------------
def settle(url: str) -> None:
    """Start a timed step on a settled server: no dirty pages left by the step before it for the checkpointer
    to write meanwhile (the seed and the seal write ~1 GB of WAL in seconds, which a live system spreads)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def timed(label: str, fn: Any, url: str | None = None) -> tuple[float, Any]:
    if url is not None:
        settle(url)
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    say(f"  {label:<28} {elapsed:8.2f} s")
    return elapsed, result


def run(admin_url: str, total: int, keep: bool) -> dict[str, Any]:
    from keyledger.ops import audit
    from keyledger.ops.replay import replay

    name, url = create_database(admin_url)
    say(f"database  {name}   load average {os.getloadavg()}")
    results: dict[str, Any] = {"events": total, "loadavg_start": os.getloadavg()}
    try:
        seconds, _ = timed(f"seed {total:,} events (COPY)", lambda: seed(url, total))
        results["seed_s"] = seconds

        def seal_all() -> int:
            sealed = 0
            with psycopg.connect(url, autocommit=True) as conn:
                while (n := audit.seal(conn)) > 0:
                    sealed += n
            return sealed

        results["seal_s"], sealed = timed("seal (chain every event)", seal_all)
        assert sealed == total, (sealed, total)
        # As the seed does for events: a live system's autovacuum keeps up with the chain as it grows, whereas
        # here a million rows were just written and the first reader would set every row's hint bits.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE event_chain")

        def verify() -> Any:
            with psycopg.connect(url, autocommit=True) as conn:
                return audit.verify(conn)

        results["verify_s"], verdict = timed("audit verify", verify, url)
        say(f"    {verdict}")

        with psycopg.connect(url, autocommit=True) as conn:
            lo, hi = conn.execute("SELECT min(recorded_at), max(recorded_at) FROM events").fetchone()
        instant = lo + (hi - lo) / 2

        def as_of() -> int:
            with psycopg.connect(url, autocommit=True) as conn:
                return len(audit.as_of(conn, instant))

        results["as_of_s"], active = timed("audit as-of (mid-log)", as_of, url)
        say(f"    {active:,} keys active at {instant.isoformat()}")

        def export() -> int:
            # What `keyledger audit export > file` does: the chunks of whole lines, written as they come.
            lines = 0
            with psycopg.connect(url, autocommit=True) as conn, open(os.devnull, "wb") as sink:
                for chunk in audit.export_chunks(conn):
                    sink.write(chunk)
                    lines += chunk.count(b"\n")
            return lines

        results["export_s"], exported = timed("audit export (to /dev/null)", export, url)
        assert exported == total, (exported, total)

        # Replay twice. The first runs on a log no projection has seen (the seed bypasses the write path), so it
        # also creates every key's tracking row. The second is the issue's scenario on a live system, where
        # the inline projection keeps tracking rows: `DELETE FROM active_api_keys`, then replay. It is the
        # figure checked against the target; the first is printed too.
        results["replay_first_s"], first = timed("replay, first (no tracking rows yet)",
                                                 lambda: replay(url, progress=False), url)
        say(f"    {first}")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM active_api_keys")
            conn.execute("DELETE FROM superseded_key_secrets")
        results["replay_s"], report = timed("replay after DELETE FROM active_api_keys",
                                            lambda: replay(url, progress=False), url)
        say(f"    {report}")
    finally:
        if keep:
            say(f"kept: {url}")
        else:
            drop_database(admin_url, name)
    results["loadavg_end"] = os.getloadavg()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    admin_url = os.environ.get("DATABASE_URL")
    cleanup = None
    if not admin_url:
        from servers import admin_database_url

        admin_url, cleanup = admin_database_url()
    try:
        say(f"keyledger audit bench  {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}  "
            f"{os.cpu_count()} CPUs")
        r = run(admin_url, args.events, args.keep)
    finally:
        if cleanup:
            cleanup()
    n = r["events"]
    rows = [
        ("replay", n / r["replay_s"], ">= 250,000 events/s", n / r["replay_s"] >= 250_000),
        ("replay, first", n / r["replay_first_s"], "(no tracking rows yet)", None),
        ("audit verify", n / r["verify_s"], ">= 300,000 events/s", n / r["verify_s"] >= 300_000),
        ("audit export", n / r["export_s"], ">= 200,000 events/s", n / r["export_s"] >= 200_000),
        ("seal (background)", n / r["seal_s"], "(no target)", None),
    ]
    say("")
    say("=" * 86)
    for label, rate, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        say(f"{label:<20} {rate:>12,.0f} events/s   {target:<22} {verdict}")
    as_of_ok = r["as_of_s"] <= 5.0
    say(f"{'audit as-of':<20} {r['as_of_s']:>12.2f} s over {n:,} events   <= 5 s {'PASS' if as_of_ok else 'FAIL'}")
    say(f"load average start {r['loadavg_start']}, end {r['loadavg_end']}")
    say("=" * 86)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit-latest.json").write_text(msgspec.json.encode(r).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
