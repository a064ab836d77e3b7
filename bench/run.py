#!/usr/bin/env python3
"""keyledger benchmark: revoke and verify throughput/latency, and the service's memory, in one command.

    python bench/run.py                      # embedded PostgreSQL + nats-server (keyledger.embedded)
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 python bench/run.py
                                             # external servers: a fresh database kl_bench_<rand> is created
                                             # on that server (dropped at the end), and the JetStream streams
                                             # get unique names (deleted at the end)

Everything runs on this machine: PostgreSQL, NATS, ``keyledger serve`` (a subprocess) and the load generator
(``wrk``; installed with apt-get when missing and running as root). What is measured:

* verify  ``POST /api/auth/api-key/verify`` with valid keys (every answer must be ``"valid":true``), c=1, c=16;
* revoke  ``POST /api/auth/api-key/delete``, every request revoking a DIFFERENT fresh key, c=1 and c=16;
* the service's RSS: idle after start, and peak (VmRSS sampled every 100 ms, and VmHWM);
* afterwards: the outbox drains to 0 and the JetStream event stream holds one message per event.

Revoke keys are created beforehand through the HTTP API (concurrent httpx client); each revoke phase is
preceded by a short calibration run that sizes the seed for it, so no key id is ever revoked twice. A phase
with any non-2xx answer, socket error, invalid verify answer or exhausted key list is reported as an error.

c=1 is ``wrk -t1 -c1``; c=16 is ``wrk -t2 -c16`` (2 cores). Results: a table on stdout and
``bench/results/latest.json``. ``--profile`` also records py-spy stacks of the service during the c=16
phases (``bench/results/profile-*.txt``, folded) and prints the hottest frames.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORIGIN = "http://bench.local"
EMAIL = "bench@example.com"

TARGETS = {
    "revoke_c16_rps": 900, "revoke_c16_rps_aim": 1200, "revoke_c16_p99_ms": 25.0,
    "verify_c16_rps": 3000, "rss_mb": 120,
}
BETTER_AUTH = {  # better-auth's figures on this class of machine, for comparison
    ("revoke", 16): "better-auth 595/s, p50 26 ms, p99 48 ms",
    ("verify", 16): "better-auth 1,099/s",
    ("revoke", 1): "better-auth 237/s",
    ("verify", 1): "better-auth 422/s",
}


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------------------------
def machine_info(pg_version: str, pg_settings: dict[str, str]) -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    # Benches that do not use wrk (the cluster bench) need not install it: "-" then.
    wrk_version = (subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
                   if shutil.which("wrk") else ["-"])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mb": mem_kb // 1024,
        "kernel": platform.release(),
        "postgres": pg_version,
        "postgres_settings": pg_settings,
        "python": platform.python_version(),
        "wrk": wrk_version[0] if wrk_version else "?",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("bench: wrk is not installed and we are not root: run `sudo apt-get install -y wrk` first")
    say("bench: wrk missing; apt-get install -y wrk ...")
    proc = subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True, text=True)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        proc = subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True, text=True)
    if proc.returncode != 0 or not shutil.which("wrk"):
        sys.exit(f"bench: could not install wrk:\n{proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------------------------
# Servers: external (DATABASE_URL + NATS_URL) or embedded
# ------------------------------------------------------------------------------------------------------------
def with_dbname(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname, safe="")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    def __init__(self, own_nats: str | None = None) -> None:
        """``own_nats``: a NATS the caller started and stops (bench/cluster_bench.py's 3-node cluster; it may be a
        comma-separated list). Then only PostgreSQL is chosen here: DATABASE_URL's server when set, else an
        embedded one; NATS_URL is ignored, and the streams are left to the caller (they die with its cluster)."""
        db, nats_url = os.environ.get("DATABASE_URL"), own_nats or os.environ.get("NATS_URL")
        self._embedded: list[Any] = []
        self._tmp: str | None = None
        self.keep_streams = own_nats is not None
        if own_nats and not db:
            self.mode = "embedded"
            from keyledger.embedded import start_postgres

            self._tmp = tempfile.mkdtemp(prefix="klb-")  # short: the PG unix socket path is limited
            t = time.monotonic()
            pg = start_postgres(Path(self._tmp) / "pg")
            self._embedded.append(pg)
            self.admin_url, self.nats_url = pg.url, own_nats
            say(f"bench: embedded PostgreSQL started in {time.monotonic() - t:.1f} s")
        elif db and nats_url:
            self.mode = "external"
            self.admin_url, self.nats_url = db, nats_url
        elif db or nats_url:
            sys.exit("bench: set both DATABASE_URL and NATS_URL (external servers), or neither (embedded)")
        else:
            self.mode = "embedded"
            from keyledger.embedded import start_nats, start_postgres

            self._tmp = tempfile.mkdtemp(prefix="klb-")  # short: the PG unix socket path is limited
            t = time.monotonic()
            pg = start_postgres(Path(self._tmp) / "pg")
            self._embedded.append(pg)
            nats = start_nats(Path(self._tmp) / "nats")
            self._embedded.append(nats)
            self.admin_url, self.nats_url = pg.url, nats.url
            say(f"bench: embedded PostgreSQL + nats-server started in {time.monotonic() - t:.1f} s")
        rand = secrets.token_hex(4)
        self.rand = rand
        self.dbname = f"kl_bench_{rand}"
        self.db_url = with_dbname(self.admin_url, self.dbname)
        self.prefix = f"bench{rand}"
        self.events_stream = f"BENCH_{rand.upper()}_EVENTS"
        self.inv_stream = f"BENCH_{rand.upper()}_INV"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            self.pg_version = conn.execute("SHOW server_version").fetchone()[0]
            self.pg_settings = dict(conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN ('autovacuum', "
                "'synchronous_commit', 'fsync', 'shared_buffers', 'max_connections')").fetchall())
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
            explain_ms = os.environ.get("BENCH_PG_AUTO_EXPLAIN_MS")  # diagnostics: log slow plans server-side
            if explain_ms:
                for k, v in (("session_preload_libraries", "auto_explain"),
                             ("auto_explain.log_min_duration", explain_ms), ("auto_explain.log_analyze", "on"),
                             ("auto_explain.log_buffers", "on"), ("auto_explain.log_nested_statements", "on")):
                    conn.execute(f'ALTER DATABASE "{self.dbname}" SET {k} = \'{v}\'')
        self.db_created = True

    def stop(self) -> None:
        if self.db_created:
            try:
                with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            except Exception as exc:
                say(f"bench: could not drop database {self.dbname}: {exc}")
        try:
            if not getattr(self, "keep_streams", False):
                asyncio.run(self._delete_streams())
        except Exception as exc:
            say(f"bench: could not delete streams: {exc}")
        for server in reversed(self._embedded):
            try:
                server.stop()
            except Exception as exc:
                say(f"bench: stopping {server!r}: {exc}")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _delete_streams(self) -> None:
        import nats

        nc = await nats.connect(self.nats_url, connect_timeout=3, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=5)
            for name in (self.events_stream, self.inv_stream):
                try:
                    await js.delete_stream(name)
                except Exception:
                    pass
        finally:
            await nc.close()

    async def stream_messages(self) -> int:
        """Event messages in the events stream, to compare with the log's events. Earlier revisions also
        kept the newest freshness checkpoint there (``<prefix>.events.checkpoint``, rolled up), which is no
        event: not counted, so they bench the same way."""
        import nats

        nc = await nats.connect(self.nats_url, connect_timeout=3, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=5)
            info = await js.stream_info(self.events_stream)
            checkpoints = await js.stream_info(self.events_stream,
                                               subjects_filter=f"{self.prefix}.events.checkpoint")
            return info.state.messages - sum((checkpoints.state.subjects or {}).values())
        finally:
            await nc.close()


# ------------------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------------------
def keyledger_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("keyledger")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "keyledger.cli"]


def pythonpath_env(pythonpath: str | None) -> dict[str, str]:
    """``--pythonpath DIR``: the service imports ``keyledger`` from DIR (a tree such as ``DIR/keyledger/``,
    another release's code) instead of the venv's editable install, which the venv itself keeps untouched."""
    return {"PYTHONPATH": str(Path(pythonpath).resolve())} if pythonpath else {}


CODE_ORIGIN = """
import importlib, json, os, sys
import keyledger, keyledger.cli, keyledger.projections
# the service's entry modules, where this revision keeps them (in subpackages since the layout of issue 13)
layout = any(os.path.isdir(os.path.join(path, "http")) for path in keyledger.__path__)
for name in ("keyledger.http.app", "keyledger.background.runtime") if layout else ("keyledger.app", "keyledger.runtime"):
    importlib.import_module(name)
roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (keyledger, keyledger.projections))
outside = sorted(n for n, m in list(sys.modules.items())
                 if n.startswith("keyledger") and not (getattr(m, "__file__", None) or roots[0]).startswith(roots))
print(json.dumps({"file": keyledger.__file__, "outside": outside}))
"""


def code_origin(env: dict[str, str]) -> dict[str, Any]:
    """Which ``keyledger`` a process started with ``env`` runs: ``keyledger.__file__`` after importing the
    service's entry modules, and any of its modules loaded from elsewhere (with ``--pythonpath`` the editable
    install stays on sys.path behind DIR and would answer for a module DIR lacks: that must be empty)."""
    out = subprocess.run([sys.executable, "-c", CODE_ORIGIN], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"cannot import keyledger in the service's environment:\n{out.stderr[-2000:]}")
    origin = json.loads(out.stdout.strip().splitlines()[-1])
    if origin["outside"]:
        raise RuntimeError(f"keyledger from {origin['file']} loaded modules from elsewhere: {origin['outside']}")
    return origin


def wait_until_quiet(pattern: str, timeout: float = 600.0, max_cpu: float = 15.0, poll: float = 3.0) -> dict[str, Any]:
    """Before a measured phase: wait at most ``timeout`` s until no process's command line matches ``pattern``
    (``pgrep -f``: a test-suite running on the same two cores, say) and the whole machine is at most
    ``max_cpu`` % busy over 2 s (100 = every core; our idle service, PostgreSQL and NATS included), then note
    the 1-minute load average. When the wait runs out the phase runs anyway and says so. An empty pattern and
    ``max_cpu`` 0 only note the load average."""
    t0 = time.monotonic()
    mine, pid = set(), os.getpid()
    while pid > 1:  # our own ancestors may carry the pattern in their command line
        mine.add(pid)
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            break
    busy: list[int] = []
    cpu: float | None = None
    told = False
    while pattern or max_cpu:
        busy = []
        if pattern:
            try:
                out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10).stdout
                busy = [int(p) for p in out.split() if int(p) not in mine]
            except (OSError, subprocess.TimeoutExpired):
                pass
        cpu = psutil.cpu_percent(interval=2.0) if max_cpu and not busy else None
        if (not busy and (cpu is None or cpu <= max_cpu)) or time.monotonic() - t0 >= timeout:
            break
        if not told:
            say(f"  waiting   until nothing matches {pattern!r} and the machine is <= {max_cpu:g}% busy "
                f"(now: {len(busy)} matching" + (f", {cpu:.0f}% busy" if cpu is not None else "") + f"; at most "
                f"{timeout:.0f} s)")
            told = True
        time.sleep(poll)
    waited = time.monotonic() - t0
    load1 = round(os.getloadavg()[0], 2)
    noisy = bool(busy) or (cpu is not None and cpu > max_cpu)
    what = f"{len(busy)} process(es) matching {pattern!r}" if busy else f"machine {cpu:.0f}% busy" if noisy else ""
    if noisy:
        say(f"  WARNING   {what} after {waited:.0f} s of waiting: measuring anyway; load average (1 min) {load1}")
    elif pattern or max_cpu:
        say(f"  quiet     nothing matches {pattern!r}, machine {cpu or 0:.0f}% busy over 2 s (waited {waited:.0f} s); "
            f"load average (1 min) {load1}")
    return {"pattern": pattern, "max_cpu_pct": max_cpu, "waited_s": round(waited, 1), "still_running": len(busy),
            "machine_busy_pct": cpu, "quiet": not noisy, "loadavg_1min": load1}


class LoggedProcess:
    """A subprocess in its own session, its output in a log file: the log's tail on demand; ``stop`` sends
    SIGTERM, then SIGKILL after ``grace`` seconds."""

    what = "process"
    grace = 5.0

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, **popen: Any) -> None:
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **popen)
        self.pid = self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()


class ServedProcess(LoggedProcess):
    """A server subprocess: wait until its /health says ready, showing the log's tail when it does not. The
    service and invalidation_bench's example downstream are both one."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, port: int, **popen: Any) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        super().__init__(cmd, env, log_path, **popen)

    def wait_ready(self, ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
                   timeout: float = 60.0, interval: float = 0.1) -> float:
        """Seconds until ``ready(GET /health)`` held; raises with the log's tail if the process exits or
        ``timeout`` passes first."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready(httpx.get(self.base + "/health", timeout=1.0)):
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(interval)
        raise RuntimeError(f"{self.what} not ready after {timeout:.0f} s:\n{self.log_tail()}")


class Service(ServedProcess):
    what = "service"

    def __init__(self, servers: Servers, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        """``extra_env`` goes in last: ``--pythonpath`` sets PYTHONPATH, the takeover bench gives two processes
        one ``BETTER_AUTH_SECRET``."""
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": servers.db_url,
            "NATS_URL": servers.nats_url,
            "BETTER_AUTH_SECRET": secrets.token_urlsafe(32),
            "KEYLEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
            "TRUSTED_ORIGINS": ORIGIN,
            "KEYLEDGER_SUBJECT_PREFIX": servers.prefix,
            "KEYLEDGER_EVENTS_STREAM": servers.events_stream,
            "KEYLEDGER_INVALIDATIONS_STREAM": servers.inv_stream,
            "KEYLEDGER_CONSUMER_PREFIX": f"bench-{servers.rand}",
            "KEYLEDGER_LOG_LEVEL": os.environ.get("KEYLEDGER_LOG_LEVEL", "WARNING"),
            **(extra_env or {}),
        }
        super().__init__([*keyledger_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port)], env, log_path,
                         port)

    def dev_session(self) -> str:
        out = subprocess.run([*keyledger_cmd(), "dev-session", "--email", EMAIL], env=self.env,
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            if line.startswith("Cookie: "):
                return line[len("Cookie: "):].strip()
        raise RuntimeError(f"dev-session printed no cookie (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


class CacheFleet(LoggedProcess):
    """``--caches N``: N reporting ``KeyCache`` instances in ONE separate process (bench/caches.py), so they share
    neither the service's event loop nor the load generator's. It runs with the service's environment: the same
    topology (KEYLEDGER_SUBJECT_PREFIX, KEYLEDGER_*_STREAM, read with ``Topology.from_env()``), NATS and
    ``keyledger`` (``--pythonpath``). ``wait_live`` waits until all N are live in ``receipt_caches`` (last seen
    within 5 s), as keyledger's receipts count them; with ``receipts=False`` (``--cache-receipts off``) the caches
    report nothing, and it waits until each holds a freshness proof."""

    ID_PREFIX = "bench-cache-"
    what = "cache process"
    grace = 10.0  # the caches close and print their counters

    def __init__(self, service: "Service", db_url: str, n: int, log_path: Path, *, receipts: bool = True) -> None:
        self.n, self.db_url, self.receipts = n, db_url, receipts
        super().__init__([sys.executable, str(HERE / "caches.py"), "--base", service.base, "--caches", str(n),
                          "--id-prefix", self.ID_PREFIX, *([] if receipts else ["--no-receipts"])],
                         service.env, log_path)
        self.stats: dict[str, Any] | None = None

    def live(self) -> int:
        with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM receipt_caches WHERE cache_id LIKE %s "
                                "AND last_seen_at > now() - interval '5 seconds'",
                                (self.ID_PREFIX + "%",)).fetchone()[0]

    def wait_live(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not self.receipts:  # silent caches: ready once each holds a freshness proof
                live = self.n if "CACHES READY" in self.log_tail(200) else 0
            else:
                try:
                    live = self.live()
                except psycopg.Error:
                    live = -1
            if live >= self.n:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"only {live} of {self.n} caches live in receipt_caches after {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def collect(self) -> dict[str, Any] | None:
        """Stop the caches: they close and print their counters (``CACHES STATS {json}``), returned here."""
        self.stop()
        for line in self.log_tail(200).splitlines():
            if line.startswith("CACHES STATS "):
                self.stats = json.loads(line[len("CACHES STATS "):])
        return self.stats


class RssSampler(threading.Thread):
    """Samples VmRSS every 100 ms; reads VmHWM (kernel's peak) on demand.

    Summed over the service process and its children, so ``serve --workers N`` is measured whole.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()

    def status(self) -> dict[str, int]:
        out = {"VmRSS": 0, "VmHWM": 0}
        pids = [self.pid]
        try:
            pids += [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.Error:
            pass
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith(("VmRSS:", "VmHWM:")):
                            key, value = line.split(":", 1)
                            out[key] += int(value.split()[0])
            except OSError:
                if pid == self.pid:
                    raise
        return out

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, self.status().get("VmRSS", 0))
            except OSError:
                return
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()


PG_BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum", "logical replication",
                 "stats collector", "archiver", "walsender", "startup")


class CpuMeter:
    """CPU used during a phase, by group: the service, OUR PostgreSQL (its postmaster's background processes
    plus the backends connected to the bench database), OUR nats-server, wrk (rusage of the reaped child),
    the reporting caches of ``--caches`` ("caches"), and everything else on the machine ("other", broken down
    by process name: a busy neighbour shows here).
    """

    def __init__(self, service_pid: int, dbname: str, nats_url: str) -> None:
        self.service_pid = service_pid
        self.dbname = dbname
        self.nats_port = urllib.parse.urlsplit(nats_url).port or 4222
        self.nats_pid = self._listener(self.nats_port)
        self.postmaster: int | None = None
        self.caches_pid: int | None = None  # --caches: the process of the reporting caches ("caches")

    @staticmethod
    def _listener(port: int) -> int | None:
        try:
            for c in psutil.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                    return c.pid
        except (psutil.AccessDenied, OSError):
            pass
        return None

    def _group(self, pid: int, name: str, ppid: int, cmd: str) -> str:
        if pid == self.service_pid or ppid == self.service_pid and "multiprocessing" in cmd:
            return "service"  # with --workers, the worker processes are the service's children
        if pid == self.nats_pid:
            return "nats"
        if self.caches_pid is not None and pid == self.caches_pid:
            return "caches"
        if name.startswith("postgres") or cmd.startswith("postgres"):
            if f" {self.dbname} " in cmd:
                self.postmaster = ppid
                return "postgres"
            if self.postmaster and (pid == self.postmaster or (ppid == self.postmaster and any(
                    b in cmd for b in PG_BACKGROUND))):
                return "postgres"
            return "other:postgres(other db/cluster)"
        return f"other:{name or '?'}"

    def snapshot(self) -> dict[int, tuple[str, float]]:
        procs = []
        for p in psutil.process_iter(["name", "ppid", "cmdline", "cpu_times"]):
            ct = p.info["cpu_times"]
            if ct is None:
                continue
            procs.append((p.pid, p.info["name"] or "", p.info["ppid"] or 0, " ".join(p.info["cmdline"] or []) + " ",
                          ct.user + ct.system))
            if p.pid == self.service_pid:  # the service's kernel share (syscalls: socket reads/writes)
                procs.append((-1, "service_sys", 0, "", ct.system))
        snap = {}
        for _ in range(2):  # the second pass knows the postmaster found through our backends
            snap = {pid: ("service_sys" if pid == -1 else self._group(pid, name, ppid, cmd), cpu)
                    for pid, name, ppid, cmd, cpu in procs}
        return snap

    @staticmethod
    def diff(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
             wall: float, wrk_cpu: float) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, (group, cpu) in after.items():
            prev = before[pid][1] if pid in before else 0.0  # started during the phase: all of it counts
            used[group] = used.get(group, 0.0) + max(0.0, cpu - prev)
        used["wrk"] = used.get("wrk", 0.0) + wrk_cpu  # wrk exited before `after`: its rusage
        pct = {g: 100.0 * s / wall for g, s in used.items()}
        out = {g: round(v, 1) for g, v in pct.items() if not g.startswith("other:")}
        others = sorted(((g[6:], v) for g, v in pct.items() if g.startswith("other:")), key=lambda kv: -kv[1])
        out["other"] = round(sum(v for _, v in others), 1)
        out["other_top"] = {n: round(v, 1) for n, v in others[:4] if v >= 1.0}
        return out


def cpu_line(cpu: dict[str, Any]) -> str:
    groups = "  ".join(f"{g} {cpu.get(g, 0):.0f}%" + (f" (sys {cpu.get('service_sys', 0):.0f}%)" if g == "service" else "")
                       for g in ("service", "postgres", "nats", "wrk", "caches", "other")
                       if g != "caches" or "caches" in cpu)
    top = cpu.get("other_top") or {}
    return groups + (f"  (other: {', '.join(f'{n} {v:.0f}%' for n, v in top.items())})" if top else "")


# ------------------------------------------------------------------------------------------------------------
# Seeding (HTTP create, concurrent)
# ------------------------------------------------------------------------------------------------------------
async def _create_keys(base: str, cookie: str, n: int, concurrency: int) -> tuple[list[tuple[str, str]], int]:
    headers = {"Cookie": cookie, "Origin": ORIGIN, "Content-Type": "application/json"}
    created: list[tuple[str, str]] = []
    errors = 0
    todo = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30.0) as client:
        async def worker() -> None:
            nonlocal todo, errors
            while todo > 0:
                todo -= 1
                r = await client.post("/api/auth/api-key/create", content=b'{"name":"bench"}')
                if r.status_code == 200:
                    body = r.json()
                    created.append((body["id"], body["key"]))
                else:
                    errors += 1
                    if errors > max(10, n // 100):
                        raise RuntimeError(f"create failed {errors} times; last: {r.status_code} {r.text[:300]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return created, errors


SERVICE_TOKEN = secrets.token_urlsafe(32)
# Limits that never bite during a run, so every verify does the full limited path (counted atomically).
LIMITS = {"remaining": 1_000_000_000, "rateLimitEnabled": True, "rateLimitMax": 1_000_000_000,
          "rateLimitTimeWindow": 60_000}


async def _create_limited_keys(base: str, n: int) -> list[tuple[str, str]]:
    """Keys with a usage limit and a rate limit, created by a server caller (Bearer service token)."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30.0) as client:
        created = []
        for _ in range(n):
            r = await client.post("/api/auth/api-key/create", json={"userId": "benchuser", **LIMITS})
            r.raise_for_status()
            created.append((r.json()["id"], r.json()["key"]))
    return created


class Seeder:
    def __init__(self, base: str, cookie: str, concurrency: int) -> None:
        self.base, self.cookie, self.concurrency = base, cookie, concurrency
        self.total_keys = 0
        self.total_s = 0.0
        self.errors = 0

    def create(self, n: int, what: str) -> list[tuple[str, str]]:
        t = time.monotonic()
        keys, errors = asyncio.run(_create_keys(self.base, self.cookie, n, self.concurrency))
        took = time.monotonic() - t
        self.total_keys += len(keys)
        self.total_s += took
        self.errors += errors
        say(f"  seeded {len(keys):,} keys for {what} in {took:.1f} s ({len(keys) / took:,.0f} creates/s"
            f"{f', {errors} errors' if errors else ''})")
        return keys


def import_keys(servers: Servers, service: "Service", n: int, what: str) -> list[str]:
    """The ids of ``n`` keys of the bench's dev-session user, adopted with ``keyledger import better-auth`` (the
    service's own code and database) from a better-auth apikey table made up for the purpose: seconds, where
    creating them through HTTP runs at ~400 keys/s. Their stored hashes are random, so they can be revoked (each
    stream one ``ApiKeyImported`` event where a created key has ``ApiKeyCreated``), not verified. Returns once the
    service has published every imported event (the outbox is empty)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from better_auth_schema import APIKEY_1_5  # tests/: the one copy of better-auth's DDL

    t = time.monotonic()
    src = f"{servers.dbname}_src"
    src_url = with_dbname(servers.admin_url, src)
    with psycopg.connect(servers.db_url, autocommit=True) as conn:
        user = conn.execute('SELECT id FROM "user" WHERE email = %s', (EMAIL,)).fetchone()[0]
    ids = [secrets.token_hex(16) for _ in range(n)]
    now = dt.datetime.now(dt.timezone.utc)
    with psycopg.connect(servers.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{src}"')
    try:
        with psycopg.connect(src_url, autocommit=True) as conn:
            conn.execute(APIKEY_1_5)
            with conn.cursor().copy('COPY apikey ("id", "configId", "name", "start", "referenceId", "key", '
                                    '"enabled", "createdAt", "updatedAt") FROM STDIN') as copy:
                for key_id in ids:
                    copy.write_row((key_id, "default", "bench", "bench_", user,
                                    base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
                                    True, now, now))
        out = subprocess.run([*keyledger_cmd(), "import", "better-auth", "--from", src_url], env=service.env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"keyledger import failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{src}" WITH (FORCE)')
    deadline = time.monotonic() + 300
    with psycopg.connect(servers.db_url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM outbox").fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the imported events were not all published within 300 s")
            time.sleep(0.5)
    took = time.monotonic() - t
    say(f"  imported {n:,} keys for {what} in {took:.1f} s ({n / took:,.0f} keys/s, published)")
    return ids


# ------------------------------------------------------------------------------------------------------------
# wrk
# ------------------------------------------------------------------------------------------------------------
LUA_COMMON = r"""
local counter = 0
local threads = {}
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
local function load_lines(file, nthreads)
  local out, i = {}, 0
  for line in io.lines(file) do
    if line ~= "" then
      if i % nthreads == tid then out[#out + 1] = line end
      i = i + 1
    end
  end
  return out
end
function done(summary, latency, requests)
  local bad, invalid, exhausted = 0, 0, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("bad") or 0)
    invalid = invalid + (t:get("invalid") or 0)
    exhausted = exhausted + (t:get("exhausted") or 0)
  end
  io.write(string.format("BENCH bad=%d invalid=%d exhausted=%d\n", bad, invalid, exhausted))
end
"""

LUA_REVOKE = r"""
local headers = { ["Content-Type"] = "application/json", ["Cookie"] = COOKIE, ["Origin"] = ORIGIN }
function init(args)
  ids = load_lines(IDS_FILE, NTHREADS)
  nxt, bad, invalid, exhausted = 1, 0, 0, 0
end
function request()
  local id = ids[nxt]
  if id == nil then
    -- out of fresh keys: never revoke one twice; stop this thread and flag the run
    exhausted = exhausted + 1
    wrk.thread:stop()
    id = "!exhausted"
  end
  nxt = nxt + 1
  return wrk.format("POST", "/api/auth/api-key/delete", headers, '{"keyId":"' .. id .. '"}')
end
function response(status, hdrs, body)
  if status ~= 200 then bad = bad + 1 end
end
"""

LUA_VERIFY = r"""
local headers = { ["Content-Type"] = "application/json" }
function init(args)
  local keys = load_lines(IDS_FILE, 1)
  reqs = {}
  for i, k in ipairs(keys) do
    reqs[i] = wrk.format("POST", "/api/auth/api-key/verify", headers, '{"key":"' .. k .. '"}')
  end
  nxt, bad, invalid, exhausted = tid, 0, 0, 0
end
function request()
  nxt = nxt % #reqs + 1
  return reqs[nxt]
end
function response(status, hdrs, body)
  if status ~= 200 then
    bad = bad + 1
  elseif not string.find(body, '"valid":true', 1, true) then
    invalid = invalid + 1
  end
end
"""


def lua_script(kind: str, path: Path, ids_file: Path, nthreads: int, cookie: str) -> Path:
    def q(s: str) -> str:
        return json.dumps(s)  # a JSON string literal is a valid Lua string literal for these values

    head = (f"COOKIE = {q(cookie)}\nORIGIN = {q(ORIGIN)}\nIDS_FILE = {q(str(ids_file))}\n"
            f"NTHREADS = {nthreads}\n")
    path.write_text(head + LUA_COMMON + (LUA_REVOKE if kind == "revoke" else LUA_VERIFY))
    return path


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    res["requests"] = int(m.group(1))
    res["seconds"] = round(_ms(m.group(2) + m.group(3)) / 1000.0, 3)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else res["requests"] / res["seconds"]
    pct = {}
    dist = out.split("Latency Distribution", 1)
    if len(dist) == 2:
        for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)", dist[1], re.M):
            pct[int(p)] = _ms(v)
    res["p50_ms"], res["p75_ms"], res["p90_ms"], res["p99_ms"] = (pct.get(p) for p in (50, 75, 90, 99))
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        res["avg_ms"], res["max_ms"] = _ms(m.group(1)), _ms(m.group(3))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"BENCH bad=(\d+) invalid=(\d+) exhausted=(\d+)", out)
    if m:
        res["bad_status"], res["invalid"], res["exhausted"] = (int(x) for x in m.groups())
    else:
        res["bad_status"], res["invalid"], res["exhausted"] = 0, 0, 0
    res["errors"] = res["non_2xx"] + res["socket_errors"] + res["invalid"]
    return res


class Runner:
    def __init__(self, base: str, cookie: str, work: Path, service_pid: int, profile: bool, cpu: CpuMeter,
                 db: DbStats) -> None:
        self.base, self.cookie, self.work = base, cookie, work
        self.db = db
        self.cpu = cpu
        self.service_pid = service_pid
        self.profile = profile
        self.n = 0
        self.revoke_2xx = 0  # 200s wrk counted on revoke runs (warm-ups included)
        self.revoke_runs_conns = 0  # in-flight requests at a run's end may have committed uncounted

    quiet_pattern = ""  # set from --quiet-*: measured phases first wait for quiet (wait_until_quiet)
    quiet_timeout = 600.0
    quiet_cpu = 15.0

    def run(self, kind: str, conc: int, duration: float, lines: list[str], label: str,
            profile_name: str | None = None, measured: bool = False) -> dict[str, Any]:
        if measured:
            self.db.checkpoint()
        quiet = wait_until_quiet(self.quiet_pattern, self.quiet_timeout, self.quiet_cpu) if measured else None
        self.n += 1
        threads = 1 if conc == 1 else min(2, conc)
        ids_file = self.work / f"{self.n:02d}-{kind}-c{conc}.txt"
        ids_file.write_text("\n".join(lines) + "\n")
        script = lua_script(kind, self.work / f"{self.n:02d}-{kind}.lua", ids_file, threads, self.cookie)
        cmd = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{duration:g}s", "--timeout", "5s", "--latency",
               "-s", str(script), self.base]
        spy = None
        if profile_name and self.profile and shutil.which("py-spy"):
            out_path = RESULTS / f"profile-{profile_name}.txt"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(self.service_pid), "--duration",
                                    str(max(1, int(duration) - 1)), "--rate", "200", "--format", "raw",
                                    "--nonblocking", "-o", str(out_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db_before = self.db.snapshot()
        before = self.cpu.snapshot()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=duration + 60)
        wall = time.monotonic() - t0
        after = self.cpu.snapshot()
        ru = psutil_children_cpu()
        if spy:
            spy.wait(timeout=duration + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
        res = parse_wrk(out)
        res["cpu_pct"] = CpuMeter.diff(before, after, wall, ru)
        time.sleep(1.1)  # let backends flush their pg_stat counters
        res["db"] = DbStats.diff(db_before, self.db.snapshot(), res["requests"])
        res.update(kind=kind, concurrency=conc, threads=threads, keys_available=len(lines) if kind == "revoke"
                   else None)
        if quiet is not None:
            res["quiet"] = quiet
        if kind == "revoke":
            self.revoke_2xx += res["requests"] - res["non_2xx"]
            self.revoke_runs_conns += conc
        say(f"  {label:<28} {res['rps']:>9,.0f} req/s  p50 {fmt_ms(res['p50_ms'])}  p99 {fmt_ms(res['p99_ms'])}"
            f"  errors {res['errors']}{'  EXHAUSTED' if res['exhausted'] else ''}"
            + (f"  (load avg 1 min before: {quiet['loadavg_1min']})" if quiet else ""))
        say(f"      cpu: {cpu_line(res['cpu_pct'])}")
        say(f"      {db_line(res['db'])}")
        return res


_children_cpu = [0.0]


def psutil_children_cpu() -> float:
    """CPU seconds of reaped children (wrk) since the last call."""
    r = os.times()
    total = r.children_user + r.children_system
    delta = total - _children_cpu[0]
    _children_cpu[0] = total
    return delta


DB_STATS = """
SELECT 'db' AS rel, xact_commit, xact_rollback, blks_hit + blks_read, tup_returned, tup_fetched, 0, 0
FROM pg_stat_database WHERE datname = current_database()
UNION ALL
SELECT relname, coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0),
       n_tup_ins, n_tup_del, n_dead_tup
FROM pg_stat_user_tables
UNION ALL
SELECT 'checkpoints', checkpoints_timed + checkpoints_req, 0, 0, 0, 0, 0, 0 FROM pg_stat_bgwriter
UNION ALL
SELECT 'wal', wal_sync, wal_records, 0, 0, 0, 0, 0 FROM pg_stat_wal
"""


class DbStats:
    """pg_stat deltas over a phase (approximate: backends flush their counters about once a second)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def checkpoint(self) -> None:
        """Before a measured phase: write out what the seeding left dirty, so that every run's phase starts from
        the same state, not one run paying for a checkpoint that another's seeding made due (``db_line`` says
        how many checkpoints fell inside a phase)."""
        try:
            with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error:
            pass  # not allowed for this role: the phase runs as before

    def snapshot(self) -> dict[str, tuple[int, ...]]:
        try:
            with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
                return {r[0]: tuple(int(x) for x in r[1:]) for r in conn.execute(DB_STATS).fetchall()}
        except psycopg.Error:
            return {}

    @staticmethod
    def diff(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]], requests: int) -> dict[str, Any]:
        if not before or not after or not requests:
            return {}
        d = {k: tuple(a - b for a, b in zip(v, before.get(k, (0,) * len(v)))) for k, v in after.items()}
        db = d.pop("db", (0,) * 7)
        out: dict[str, Any] = {"commits_per_req": round(db[0] / requests, 2),
                               "rollbacks": db[1], "buffer_accesses_per_req": round(db[2] / requests, 1),
                               "checkpoints": d.pop("checkpoints", (0,))[0], "tables": {}}
        wal = d.pop("wal", None)  # the server's, all databases: the bench's own service is all that writes
        if wal is not None:
            out["wal_syncs_per_req"] = round(wal[0] / requests, 3)
            out["wal_records_per_req"] = round(wal[1] / requests, 1)
        for rel, (seq, seq_read, idx, idx_fetch, ins, dele, _dead) in sorted(d.items()):
            if seq or idx or ins or dele:
                out["tables"][rel] = {"seq_scans": seq, "seq_rows_read_per_req": round(seq_read / requests, 1),
                                      "idx_scans_per_req": round(idx / requests, 2), "ins": ins, "del": dele,
                                      "dead_tuples_end": after[rel][6]}
        return out


def db_line(st: dict[str, Any]) -> str:
    if not st:
        return "db: n/a"
    hot = sorted(st["tables"].items(), key=lambda kv: -kv[1]["seq_rows_read_per_req"])[:3]
    scans = ", ".join(f"{t} {v['seq_scans']} seq scans ({v['seq_rows_read_per_req']:,.0f} rows/req)"
                      for t, v in hot if v["seq_scans"])
    return (f"db: {st['commits_per_req']} commits/req, {st['buffer_accesses_per_req']:,.0f} buffer accesses/req"
            + (f", {st['wal_syncs_per_req']} WAL flushes/req, {st['wal_records_per_req']} WAL records/req"
               if "wal_syncs_per_req" in st else "")
            + (f"; {st['checkpoints']} checkpoint(s) during the phase" if st.get("checkpoints") else "")
            + (f"; {scans}" if scans else ""))


def fmt_ms(v: float | None) -> str:
    return "   ?   " if v is None else f"{v:5.1f} ms"


# ------------------------------------------------------------------------------------------------------------
# Checks on the log after the revokes
# ------------------------------------------------------------------------------------------------------------
def integrity_after_revokes(servers: Servers, runner: "Runner") -> dict[str, Any]:
    """What must hold once the revokes are over: the outbox drained, the events stream holding every event of the
    log, and as many ApiKeyRevoked events as wrk counted 200s (up to the requests in flight when a run stopped:
    those may commit uncounted). ``ok`` says all three."""
    log = outbox_and_log(servers.db_url)
    try:
        stream = asyncio.run(servers.stream_messages())
    except Exception as exc:
        stream = None
        say(f"  stream_info failed: {exc}")
    revoked = log["events_by_type"].get("ApiKeyRevoked", 0)
    out = {**log, "stream_messages": stream, "stream_matches_log": stream == log["events"], "revoked_events": revoked,
           "revoke_200s_counted_by_wrk": runner.revoke_2xx,
           "revoked_matches_200s": 0 <= revoked - runner.revoke_2xx <= runner.revoke_runs_conns}
    out["ok"] = log["outbox_pending"] == 0 and out["stream_matches_log"] and out["revoked_matches_200s"]
    return out


def outbox_and_log(db_url: str, timeout: float = 10.0) -> dict[str, Any]:
    t0 = time.monotonic()
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            pending = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
            if pending == 0 or time.monotonic() - t0 > timeout:
                break
            time.sleep(0.05)
        drained_in = time.monotonic() - t0
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        by_type = dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type ORDER BY type").fetchall())
    return {"outbox_pending": pending, "outbox_drained_s": round(drained_in, 2) if pending == 0 else None,
            "events": events, "events_by_type": by_type}


def receipts_relation(conn: psycopg.Connection[Any]) -> str | None:
    """Where the receipts projection's revocations are read, a row each: its view ``receipts``, or its one table in
    revisions before the view; None where this revision has neither."""
    return conn.execute("SELECT coalesce(to_regclass('receipts'), to_regclass('revocations'))::text").fetchone()[0]


def revocation_receipts(db_url: str) -> dict[str, int] | None:
    """Revocations written by the receipts projection and how many of them every live cache confirmed; None where
    this revision has no receipts."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        if (relation := receipts_relation(conn)) is None:
            return None
        total, done = conn.execute(f"SELECT count(*), count(effective_everywhere_at) FROM {relation}").fetchone()
    return {"revocations": total, "effective_everywhere": done}


def hottest_frames(path: Path, top: int = 15) -> list[tuple[float, float, str]]:
    """(self %, inclusive %, frame) from a py-spy raw (folded) file."""
    if not path.exists():
        return []
    self_count: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        self_count[leaf] = self_count.get(leaf, 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return []
    ranked = sorted(self_count.items(), key=lambda kv: -kv[1])[:top]
    return [(100.0 * c / total, 100.0 * incl[f] / total, f) for f, c in ranked]


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# The phases, in the order they run ("revoke" is both revoke phases and the log checks after them;
# "revoke_c16" only the c=16 one and the checks).
PHASES = ("verify_c1", "verify_c16", "verify_limited_c16", "revoke", "revoke_c16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per c=16 phase (default 10)")
    ap.add_argument("--duration-c1", type=float, default=None, help="seconds per c=1 phase (default: --duration)")
    ap.add_argument("--warmup", type=float, default=2.0, help="verify warm-up seconds before measuring")
    ap.add_argument("--seed-concurrency", type=int, default=16)
    ap.add_argument("--verify-keys", type=int, default=200, help="distinct valid keys rotated by verify")
    ap.add_argument("--margin", type=float, default=1.4, help="seed this many times the calibrated need")
    ap.add_argument("--profile", action="store_true", help="py-spy the service during the c=16 phases")
    ap.add_argument("--keep-db", action="store_true", help="keep the bench database and streams (debugging)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep wrk scripts, id files and service log")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)} (default: all); a partial run judges "
                         "only the phases it ran. `KEYLEDGER_WORKERS=2` in the environment benches two workers")
    ap.add_argument("--pythonpath", metavar="DIR", default=None,
                    help="run the service with PYTHONPATH=DIR, i.e. the `keyledger` package in DIR (another "
                         "release's code, see bench/revoke_ab.py) instead of the venv's; the venv is not touched")
    ap.add_argument("--quiet-wait", metavar="PATTERN", default="pytest",
                    help="before each measured phase wait until `pgrep -f PATTERN` finds nothing (default: "
                         "pytest; '' = do not wait) and the machine is at most --quiet-cpu %% busy, at most "
                         "--quiet-timeout seconds; the load average is noted")
    ap.add_argument("--quiet-cpu", type=float, default=15.0,
                    help="%% of the whole machine busy over 2 s that still counts as quiet (default 15; 0: no check)")
    ap.add_argument("--quiet-timeout", type=float, default=600.0)
    ap.add_argument("--caches", type=int, default=0, metavar="N",
                    help="before the revoke phases start N reporting KeyCache instances (cache_id bench-cache-<i>) "
                         "in one separate process (bench/caches.py) with the service's topology; the phases wait "
                         "until all N are live in receipt_caches; their CPU is counted as 'caches' (default 0)")
    ap.add_argument("--cache-receipts", choices=("on", "off"), default="on",
                    help="off: the --caches report no receipts (the caches' own load, without the receipts)")
    args = ap.parse_args()
    if args.caches < 0:
        ap.error("--caches: N >= 0")
    wanted = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not wanted or wanted - set(PHASES):
        ap.error(f"--phases: choose among {', '.join(PHASES)}")
    d16 = args.duration
    d1 = args.duration_c1 if args.duration_c1 is not None else args.duration

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # clean up as on ^C: service, database, streams

    signal.signal(signal.SIGTERM, terminated)
    ensure_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kl-bench-"))
    servers = Servers()
    service: Service | None = None
    sampler: RssSampler | None = None
    fleet: CacheFleet | None = None
    result: dict[str, Any] = {"mode": servers.mode, "database": servers.dbname,
                              "streams": [servers.events_stream, servers.inv_stream], "caches": args.caches}
    rc = 1
    try:
        machine = machine_info(servers.pg_version, servers.pg_settings)
        result["machine"] = machine
        say("keyledger bench")
        say(f"  machine   {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_mb']:,} MB RAM, "
            f"kernel {machine['kernel']}")
        say(f"  software  PostgreSQL {machine['postgres']}, Python {machine['python']}, {machine['wrk']}")
        say("  postgres  " + ", ".join(f"{k}={v}" for k, v in sorted(servers.pg_settings.items())))
        if servers.pg_settings.get("autovacuum") == "off":
            say("  WARNING   autovacuum is off on this server: dead rows (outbox, active_api_keys) pile up all run")
        say(f"  date      {machine['date']}")
        say(f"  servers   {servers.mode}: database {servers.dbname}, NATS {servers.nats_url}, "
            f"streams {servers.events_stream}/{servers.inv_stream}")

        service = Service(servers, work / "service.log", pythonpath_env(args.pythonpath))
        origin = code_origin(service.env)
        result["code"] = {"pythonpath": args.pythonpath, **origin}
        say(f"  code      keyledger from {origin['file']}"
            + (f" (--pythonpath {args.pythonpath})" if args.pythonpath else ""))
        started = service.wait_ready()
        say(f"  service   pid {service.pid} on {service.base}, healthy after {started:.1f} s")
        sampler = RssSampler(service.pid)
        sampler.start()
        time.sleep(2.0)
        idle_kb = sampler.status()["VmRSS"]
        say(f"  idle RSS  {idle_kb / 1024:.1f} MB")
        cookie = service.dev_session()

        seeder = Seeder(service.base, cookie, args.seed_concurrency)
        runner = Runner(service.base, cookie, work, service.pid, args.profile,
                        CpuMeter(service.pid, servers.dbname, servers.nats_url), DbStats(servers.db_url))
        runner.quiet_pattern, runner.quiet_timeout = args.quiet_wait, args.quiet_timeout
        runner.quiet_cpu = args.quiet_cpu
        phases: dict[str, dict[str, Any]] = {}

        say("")
        say("verify")
        verify_keys = seeder.create(args.verify_keys, "verify")
        vlines = [k for _, k in verify_keys]
        runner.run("verify", 16, args.warmup, vlines, f"warm-up c=16 {args.warmup:g} s")
        if "verify_c1" in wanted:
            phases["verify_c1"] = runner.run("verify", 1, d1, vlines, f"verify c=1  {d1:g} s", measured=True)
        if "verify_c16" in wanted:
            phases["verify_c16"] = runner.run("verify", 16, d16, vlines, f"verify c=16 {d16:g} s", "verify-c16",
                                              measured=True)
        if "verify_limited_c16" in wanted:
            limited = [k for _, k in asyncio.run(_create_limited_keys(service.base, args.verify_keys))]
            runner.run("verify", 16, args.warmup, limited, f"warm-up limited c=16 {args.warmup:g} s")
            phases["verify_limited_c16"] = runner.run("verify", 16, d16, limited,
                                                      f"verify with usage + rate limits c=16 {d16:g} s",
                                                      "verify-limited-c16", measured=True)

        say("")
        say("revoke (every request revokes a different fresh key)")
        revokes = [(16, d16, 2.0)] if wanted & {"revoke", "revoke_c16"} else []
        if "revoke" in wanted:
            revokes.append((1, d1, 1.0))
        if args.caches and revokes:
            fleet = CacheFleet(service, servers.db_url, args.caches, work / "caches.log",
                               receipts=args.cache_receipts == "on")
            runner.cpu.caches_pid = fleet.pid
            took = fleet.wait_live()
            say(f"  caches    {args.caches} {'reporting' if fleet.receipts else 'silent (no receipts)'} KeyCache "
                f"instances in pid {fleet.pid} (topology {servers.prefix}/{servers.inv_stream}), ready after "
                f"{took:.1f} s")
        for conc, dur, calib in revokes:
            # Calibrate: a short run on a generous batch gives the rate; the real seed is sized from it. On a
            # quiet machine, like the phase: a rate calibrated beside a busy neighbour runs out of keys.
            wait_until_quiet(args.quiet_wait, args.quiet_timeout, args.quiet_cpu)
            calib_n = 2500 * calib if conc == 16 else 1200 * calib
            calib_keys = seeder.create(int(calib_n), f"calibration c={conc}")
            cal = runner.run("revoke", conc, calib, [i for i, _ in calib_keys], f"calibration c={conc} {calib:g} s")
            rate = max(cal["requests"] / max(cal["seconds"], 0.001), 50.0)
            if cal["exhausted"]:  # faster than the batch allowed: assume the batch/2 s pace was a floor
                rate = max(rate, calib_n / calib) * 1.5
            # c=1 is latency-bound and a busy neighbour during the 1 s calibration skews it: seed more
            margin = args.margin if conc > 1 else max(args.margin, 2.0)
            need = int(math.ceil(rate * dur * margin)) + 100
            keys = seeder.create(need, f"revoke c={conc} (~{rate:,.0f}/s x {dur:g} s x {margin:g})")
            phases[f"revoke_c{conc}"] = runner.run("revoke", conc, dur, [i for i, _ in keys],
                                                   f"revoke c={conc}  {dur:g} s", f"revoke-c{conc}", measured=True)

        say("")
        say("after the revokes")
        integrity = integrity_after_revokes(servers, runner)
        caches_info: dict[str, Any] = {"n": args.caches, "receipts": args.cache_receipts == "on"}
        if fleet is not None:
            time.sleep(1.0)  # the outbox is drained: let the last invalidations reach the caches and their receipts
            live_end = fleet.live()
            caches_info["revocations"] = revocation_receipts(servers.db_url)
            stats = fleet.collect() or {}
            applied = [c["invalidations_applied"] for c in stats.values()]
            caches_info.update(live_at_end=live_end, stats=stats,
                               invalidations_applied_min=min(applied) if applied else None,
                               invalidations_applied_max=max(applied) if applied else None)
            say(f"  caches    {live_end} of {args.caches} live in receipt_caches at the end; invalidations applied "
                f"per cache {caches_info['invalidations_applied_min']}..{caches_info['invalidations_applied_max']}"
                f", flushes {sum(c['flushes'] for c in stats.values())} (one per cache at its first connect, empty)")
        result["caches_detail"] = caches_info
        revoked = integrity["revoked_events"]
        say("  outbox    " + (f"drained in {integrity['outbox_drained_s']:.2f} s" if integrity["outbox_pending"] == 0
                               else f"NOT drained: {integrity['outbox_pending']} rows left after 10 s"))
        say(f"  JetStream {integrity['stream_messages']} event messages in {servers.events_stream}, "
            f"{integrity['events']} events in the log: {'match' if integrity['stream_matches_log'] else 'MISMATCH'}")
        if fleet is not None:
            # every revoke is one invalidation; each cache must have applied all of them
            caches_info["received_every_revoke"] = (caches_info["invalidations_applied_min"] or 0) >= revoked
            rv = caches_info["revocations"]
            say(f"  caches    every cache applied >= {revoked:,} invalidations (one per revoke): "
                f"{'yes' if caches_info['received_every_revoke'] else 'NO'}; receipts: "
                + (f"{rv['effective_everywhere']:,} of {rv['revocations']:,} revocations effective everywhere"
                   if rv else "n/a"))
        say(f"  revokes   {revoked:,} ApiKeyRevoked events, wrk counted {runner.revoke_2xx:,} 200s "
            f"(<= {runner.revoke_runs_conns} may be uncounted in flight): "
            f"{'consistent' if integrity['revoked_matches_200s'] else 'INCONSISTENT'}")

        sampler.stop()
        st = sampler.status()
        peak_kb = max(sampler.peak_kb, st["VmRSS"])
        rss = {"idle_mb": round(idle_kb / 1024, 1), "peak_sampled_mb": round(peak_kb / 1024, 1),
               "vmhwm_mb": round(st["VmHWM"] / 1024, 1), "end_mb": round(st["VmRSS"] / 1024, 1)}
        seeding = {"keys": seeder.total_keys, "seconds": round(seeder.total_s, 1), "errors": seeder.errors,
                   "creates_per_s": round(seeder.total_keys / seeder.total_s) if seeder.total_s else None}

        # ---------------------------------------------------------------- the table
        checks: dict[str, bool] = {}
        say("")
        say("=" * 110)
        say(f"keyledger bench  {machine['date']}  {machine['nproc']} CPUs {machine['cpu_model']}  "
            f"PostgreSQL {machine['postgres']}  ({servers.mode} servers)"
            + (f"  caches: {args.caches} {'reporting' if args.cache_receipts == 'on' else 'silent'}"
               if args.caches else ""))
        say("-" * 110)
        for name in ("revoke_c16", "revoke_c1", "verify_c16", "verify_c1"):
            if name not in phases:
                continue
            r = phases[name]
            kind, conc = r["kind"], r["concurrency"]
            note = ""
            if name == "revoke_c16":
                ok = (r["rps"] >= TARGETS["revoke_c16_rps"] and (r["p99_ms"] or 1e9) <= TARGETS["revoke_c16_p99_ms"]
                      and r["errors"] == 0 and not r["exhausted"])
                checks[name] = ok
                aim = "aim 1,200/s reached" if r["rps"] >= TARGETS["revoke_c16_rps_aim"] else "aim 1,200/s not reached"
                note = f"(target >= 900/s, p99 <= 25 ms: {verdict(ok)}; {aim})"
            elif name == "verify_c16":
                ok = r["rps"] >= TARGETS["verify_c16_rps"] and r["errors"] == 0
                checks[name] = ok
                note = f"(target >= 3,000/s: {verdict(ok)})"
            else:
                ok = r["errors"] == 0 and not r["exhausted"]
                checks[name] = ok
                note = "(no target)" if ok else "(ERRORS)"
            flags = "  EXHAUSTED KEYS" if r["exhausted"] else ""
            say(f"{kind:<7} c={conc:<3} {r['rps']:>7,.0f} req/s  p50 {fmt_ms(r['p50_ms'])}  p99 {fmt_ms(r['p99_ms'])}"
                f"  errors {r['errors']:<3} {note}{flags}   [{BETTER_AUTH[(kind, conc)]}]")
        r = phases.get("verify_limited_c16")
        if r is not None:
            ok = r["rps"] >= 2_200 and r["errors"] == 0
            checks["verify_limited_c16"] = ok
            say(f"verify  c=16  {r['rps']:>7,.0f} req/s  p50 {fmt_ms(r['p50_ms'])}  p99 {fmt_ms(r['p99_ms'])}"
                f"  errors {r['errors']:<3} (usage + rate limits on; target >= 2,200/s: {verdict(ok)})")
        rss_ok = max(rss["peak_sampled_mb"], rss["vmhwm_mb"]) <= TARGETS["rss_mb"]
        checks["rss"] = rss_ok
        say(f"RSS     idle {rss['idle_mb']:.1f} MB  peak {rss['peak_sampled_mb']:.1f} MB (VmHWM {rss['vmhwm_mb']:.1f} MB)"
            f"   (target <= 120 MB: {verdict(rss_ok)})")
        checks["outbox_drained"] = integrity["outbox_pending"] == 0
        checks["stream_matches_log"] = bool(integrity["stream_matches_log"])
        checks["revokes_consistent"] = bool(integrity["revoked_matches_200s"])
        say(f"outbox  {'drained' if checks['outbox_drained'] else 'NOT DRAINED'}; JetStream {integrity['stream_messages']} msgs vs "
            f"{integrity['events']} events: {verdict(checks['stream_matches_log'])}; revoked events vs 200s: "
            f"{verdict(checks['revokes_consistent'])}")
        say(f"seeding {seeding['keys']:,} keys via HTTP create in {seeding['seconds']} s "
            f"({seeding['creates_per_s']}/s, c={args.seed_concurrency})")
        say("CPU % during each phase (100 % = one core; 200 % = the whole machine):")
        for name in ("revoke_c16", "revoke_c1", "verify_c16", "verify_c1", "verify_limited_c16"):
            if name in phases:
                say(f"  {name:<11} " + cpu_line(phases[name]["cpu_pct"]))
        busiest = max(phases[n]["cpu_pct"].get("other", 0.0) for n in phases)
        if busiest >= 15.0:
            say(f"WARNING: other processes used up to {busiest:.0f}% CPU during a phase: the machine was not quiet, "
                "the figures above are pessimistic")
        result["machine_noise_max_other_cpu_pct"] = busiest
        say("=" * 110)
        all_ok = all(checks.values())
        say(f"overall: {'PASS' if all_ok else 'FAIL: ' + ', '.join(k for k, v in checks.items() if not v)}")

        if args.profile:
            for name in ("revoke-c16", "verify-c16", "verify-limited-c16"):
                frames = hottest_frames(RESULTS / f"profile-{name}.txt")
                if frames:
                    say(f"\npy-spy {name}: hottest frames (self %, inclusive %)")
                    for s, inc, f in frames:
                        say(f"  {s:5.1f}  {inc:5.1f}  {f[:150]}")

        result.update(phases=phases, rss=rss, integrity=integrity, seeding=seeding, checks=checks,
                      passed=all_ok, targets=TARGETS, profiled=args.profile,
                      config={"duration_c16": d16, "duration_c1": d1, "warmup": args.warmup,
                              "seed_concurrency": args.seed_concurrency, "verify_keys": args.verify_keys,
                              "caches": args.caches})
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        text = json.dumps(result, indent=2, default=str)
        (RESULTS / "latest.json").write_text(text)
        (RESULTS / f"run-{stamp}.json").write_text(text)
        say(f"results: {RESULTS / 'latest.json'}")
        rc = 0 if all_ok else 1
    except KeyboardInterrupt:
        say("bench: interrupted")
        rc = 130
    except Exception as exc:
        say(f"bench: FAILED: {type(exc).__name__}: {exc}")
        if service is not None:
            say("service log tail:\n" + service.log_tail())
        rc = 2
    finally:
        if sampler is not None:
            sampler.stop()
        if fleet is not None:
            fleet.stop()
        if service is not None:
            service.stop()
        if args.keep_db:
            servers.db_created = False
            servers.keep_streams = True
            say(f"kept: database {servers.db_url}, streams {servers.events_stream}/{servers.inv_stream}")
        servers.stop()
        if args.keep_workdir:
            say(f"workdir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
