#!/usr/bin/env python3
"""Import benchmark: 100,000 better-auth ``apikey`` rows into a fresh keyledger database, timed.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python bench/import_bench.py [--rows N] [--keep]

Creates two databases on that server, both dropped at the end (``--keep`` keeps them and prints their URLs):

* ``kl_importbench_src_<rand>``: better-auth's tables (the 1.5+ layout, exactly as in tests/test_import.py),
  filled by COPY with N realistic rows: 32-character ids, real ``base64url(sha256(...))`` hashes, a mix of
  ``metadata`` (SQL NULL, the text ``null``, objects, some double-encoded), some permissions, some expiries,
  some disabled keys, some rate limits;
* ``kl_importbench_dst_<rand>``: keyledger's schema applied with ``keyledger.storage.schema.migrate``.

Then it runs the importer exactly as ``keyledger import better-auth`` does (``run_import``; the command only
adds ``migrate``, done above) and prints the time, rows/s and the load average (the machine is shared: the
figure is only meaningful next to it). Target (issue 5): 100,000 rows in <= 10 s. No NATS: the events land in
the outbox, which a running service's relay would publish; the bench checks the counts and leaves it at that.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import random
import resource
import secrets
import sys
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from keyledger.ops.importer import run_import  # noqa: E402
from keyledger.storage.schema import migrate  # noqa: E402
from better_auth_schema import APIKEY_1_5, BETTER_AUTH_CORE  # noqa: E402  (tests/: better-auth's DDL)

TARGET_S = 10.0
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
COPY_COLUMNS = ('id', 'configId', 'name', 'start', 'referenceId', 'prefix', 'key', 'enabled', 'rateLimitEnabled',
                'rateLimitTimeWindow', 'rateLimitMax', 'requestCount', 'remaining', 'expiresAt', 'createdAt',
                'updatedAt', 'permissions', 'metadata')


def url_for(admin_url: str, dbname: str) -> str:
    params = conninfo_to_dict(admin_url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


class BackendCpu:
    """CPU seconds used by the PostgreSQL backends serving our two databases (and nobody else: the databases
    are ours), sampled from /proc every 50 ms while the import runs. On a shared machine wall time depends on
    the neighbours; CPU seconds do not (much), so both are reported. Needs the server on this host."""

    def __init__(self, admin: str, dbnames: tuple[str, ...]) -> None:
        self.admin, self.dbnames = admin, dbnames
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    def _poll(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            while not self.stop.is_set():
                pids = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (list(self.dbnames),))]
                for pid in pids:
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick
                time.sleep(0.05)

    def __enter__(self) -> "BackendCpu":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def rows(n: int, seed: int = 5):
    rng = random.Random(seed)
    owners = ["".join(rng.choice(ALNUM) for _ in range(32)) for _ in range(max(1, n // 20))]
    base = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for i in range(n):
        key_id = "".join(rng.choice(ALNUM) for _ in range(32))
        prefix = rng.choice((None, None, "pk_", "rb_"))
        plaintext = (prefix or "") + "".join(rng.choice(ALNUM[:52]) for _ in range(64))
        key_hash = base64.urlsafe_b64encode(hashlib.sha256(plaintext.encode()).digest()).rstrip(b"=").decode()
        created = base + dt.timedelta(seconds=i * 7)
        pick = i % 10
        metadata = (None, "null", json.dumps({"plan": "pro", "n": i}), json.dumps(json.dumps({"v": 1})))[pick % 4]
        permissions = json.dumps({"sites": ["read"], "events": ["read", "write"]}) if pick == 3 else None
        expires = created + dt.timedelta(days=400) if pick in (1, 2) else None
        yield (key_id, "default", f"key {i}", plaintext[:6], rng.choice(owners), prefix, key_hash,
               pick != 9, pick == 5, 60_000 if pick == 5 else 86_400_000, 100 if pick == 5 else 10, 0,
               1000 if pick == 6 else None, expires, created, created, permissions, metadata)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="target connections appending in parallel")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        print("set DATABASE_URL to a server where this user may CREATE DATABASE", file=sys.stderr)
        return 2
    tag = secrets.token_hex(4)
    src_name, dst_name = f"kl_importbench_src_{tag}", f"kl_importbench_dst_{tag}"
    src, dst = url_for(admin, src_name), url_for(admin, dst_name)
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in (src_name, dst_name):
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
    try:
        t0 = time.perf_counter()
        with psycopg.connect(src) as conn:
            conn.execute(BETTER_AUTH_CORE)
            conn.execute(APIKEY_1_5)
            with conn.cursor().copy(sql.SQL("COPY apikey ({}) FROM STDIN").format(
                    sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS)))) as copy:
                for row in rows(args.rows):
                    copy.write_row(row)
            conn.execute("ANALYZE apikey")
        migrate(dst)
        with psycopg.connect(dst, autocommit=True) as conn:
            conn.execute("ANALYZE")
        print(f"source: {args.rows:,} better-auth rows COPYed in {time.perf_counter() - t0:.1f}s; target migrated",
              flush=True)

        load_before = os.getloadavg()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        with BackendCpu(admin, (src_name, dst_name)) as backends:
            report = run_import(src, dst, batch_size=args.batch_size, workers=args.workers, progress=sys.stderr)
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        load_after = os.getloadavg()
        client_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
        report.render(sys.stdout)

        with psycopg.connect(dst, autocommit=True) as conn:
            events, active, outbox = conn.execute(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM active_api_keys),"
                " (SELECT count(*) FROM outbox)").fetchone()
        ok = events == active == outbox == args.rows and report.imported == args.rows and not report.rejected
        verdict = "PASS" if report.seconds <= TARGET_S and ok else "FAIL"
        print(f"\nimport of {args.rows:,} rows: {report.seconds:.2f} s, {args.rows / report.seconds:,.0f} rows/s "
              f"(target <= {TARGET_S:.0f} s for 100,000) -> {verdict}")
        print(f"target now holds {events:,} events, {active:,} active keys, {outbox:,} outbox rows"
              f"{'' if ok else '  (MISMATCH)'}")
        cpu = client_cpu + backends.total
        print(f"CPU used: importer process {client_cpu:.1f} s, PostgreSQL backends {backends.total:.1f} s "
              f"(sampled), total {cpu:.1f} s -> on {os.cpu_count()} idle CPUs at least {cpu / (os.cpu_count() or 1):.1f} s wall")
        print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
              f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; {os.cpu_count()} CPUs")
        results = ROOT / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / "import-latest.json").write_text(json.dumps({
            "rows": args.rows, "seconds": round(report.seconds, 3), "rows_per_s": round(args.rows / report.seconds),
            "batch_size": args.batch_size, "workers": args.workers, "client_cpu_s": round(client_cpu, 2),
            "backend_cpu_s": round(backends.total, 2), "target_s": TARGET_S, "ok": ok, "verdict": verdict,
            "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }, indent=2) + "\n")
        return 0 if verdict == "PASS" else 1
    finally:
        if args.keep:
            print(f"kept: source {src}\n      target {dst}")
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                for name in (src_name, dst_name):
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    sys.exit(main())
