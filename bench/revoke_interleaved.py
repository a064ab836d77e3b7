#!/usr/bin/env python3
"""keyledger revoke throughput of two versions side by side: both served at once, measured in turns, one run.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 \\
        python bench/revoke_interleaved.py --a worktree --b 91bf6f9 --rounds 16 --duration 5 [--runs 3]
    python bench/revoke_interleaved.py --a worktree --b worktree --a-caches 10 --b-caches 10 --b-receipts off
                                             # the receipts' own cost: 10 reporting caches vs the same silent

Why beside ``revoke_ab.py``: that one runs ``bench/run.py`` once per side, minutes apart, each with its own
servers' warm-up; on a shared 2-core machine the rate of the SAME code drifts by 20-30 % between such runs, more
than the few per cent a comparison is after. Here both sides run for the whole measurement, on the same
PostgreSQL and NATS, each with its own database and streams (``run.py``'s ``Servers``): their keys are made
first, then the revoke c=16 phases alternate A B, B A, A B, ... (``--rounds`` of each, ``--duration`` seconds),
so drift falls on both sides alike and each round's ratio compares phases seconds apart. While one side is
measured the other is idle, but runs: its background work (the freshness checkpoints every 250 ms, the probes),
a few per cent of a core, is load on the measured side's machine, the same for A and B.

Each side is a git revision (extracted as in ``revoke_ab.py``) or ``worktree`` (the venv's install). Its keys are
imported by its own code (``run.py``'s ``import_keys``: ``keyledger import better-auth`` from a better-auth table made
up for the run: 156,032 per side in 23 s on machine A, so a run can have 16 rounds and more); ``--seed http``
creates them through the API instead (~400/s).
``--a-caches N`` / ``--b-caches N`` attach N ``KeyCache``s in a process of their own to that side
(``bench/caches.py``, as ``run.py --caches``); ``--a-receipts off`` / ``--b-receipts off`` make them silent.
Every phase is preceded by a CHECKPOINT and a wait until the machine is quiet (``run.py``'s ``Runner``; here at
most 8 % busy, the two idle services included: the side just measured finishes its background work first).

The figure is the geometric mean of the rounds' ratios. ``--runs N`` repeats the whole run N times, both services
and their keys afresh each time, and then reports the geometric mean of the runs' figures with their range: what
holds for a whole run (where the processes and their data landed) is not seen by its rounds, and two runs of the
same code minutes apart gave 0.972 and 0.854 on machine A, so one run is one sample, however many rounds. Measured
on machine A, the phase that comes first in a round ran faster than the second (in 5 of 6 rounds of one run, by
5-10%) whichever side it was: the order alternates, so the rounds with A first and those with B first lean opposite
ways, and the geometric mean of an even number of rounds weighs both alike; the median of six can land on either
lean. The side set up first (and measured first in round 1) leaned too: the same code, ten reporting caches on one
side and ten silent ones on the other, gave 0.895 with the reporting side first and 1.008 (silent / reporting) with
it second, one run each on machine C. ``--swap`` sets up and measures B first in every second run, so over an even
number of runs that lean falls on both sides alike (the ratio is always A/B). Also printed: each phase, each round's
ratio, their median, and the ratio of the total rates; ``bench/results/revoke-interleaved-latest.json`` keeps it
all. Without DATABASE_URL and NATS_URL it starts an embedded PostgreSQL and nats-server for the run
(keyledger.embedded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import revoke_ab  # noqa: E402  (bench/ is not a package)
import run as bench  # noqa: E402

CALIBRATION_KEYS = 5000
TARGET_RATIO = revoke_ab.TARGET_RATIO


class Side:
    """One version: its database and streams, its service, its seeded keys, its phases."""

    def __init__(self, name: str, info: dict[str, str], work: Path, caches: int, receipts: bool,
                 profile: bool, seed: str) -> None:
        self.name, self.info, self.work, self.profile, self.seed_with = name, info, work, profile, seed
        work.mkdir(parents=True)
        self.servers = bench.Servers()
        self.service: bench.Service | None = None
        self.fleet: bench.CacheFleet | None = None
        self.caches, self.receipts = caches, receipts
        self.phases: list[dict[str, Any]] = []
        self.keys: list[str] = []

    def start(self, seed_concurrency: int) -> None:
        self.service = bench.Service(self.servers, self.work / "service.log",
                                     bench.pythonpath_env(self.info["pythonpath"] or None))
        origin = bench.code_origin(self.service.env)
        if self.info["pythonpath"] and not origin["file"].startswith(self.info["pythonpath"]):
            raise RuntimeError(f"{self.name} runs keyledger from {origin['file']}, not {self.info['pythonpath']}")
        self.code = origin["file"]
        self.service.wait_ready()
        cookie = self.service.dev_session()
        self.seeder = bench.Seeder(self.service.base, cookie, seed_concurrency)
        self.runner = bench.Runner(self.service.base, cookie, self.work, self.service.pid, self.profile,
                                   bench.CpuMeter(self.service.pid, self.servers.dbname, self.servers.nats_url),
                                   bench.DbStats(self.servers.db_url))
        if self.caches:
            self.fleet = bench.CacheFleet(self.service, self.servers.db_url, self.caches, self.work / "caches.log",
                                          receipts=self.receipts)
            self.runner.cpu.caches_pid = self.fleet.pid
            self.fleet.wait_live()
        bench.say(f"  {self.name}: {self.info['rev']} ({self.info['commit'][:12]}), keyledger from {self.code}, "
                  f"service pid {self.service.pid}"
                  + (f", {self.caches} {'reporting' if self.receipts else 'silent'} caches" if self.caches else ""))

    def seed(self, n: int, what: str) -> list[str]:
        """``n`` fresh key ids: imported (``--seed import``, seconds) or created through HTTP (minutes)."""
        if self.seed_with == "import":
            assert self.service is not None
            return bench.import_keys(self.servers, self.service, n, what)
        return [i for i, _ in self.seeder.create(n, what)]

    def calibrate(self) -> float:
        keys = self.seed(CALIBRATION_KEYS, f"{self.name}'s calibration")
        cal = self.runner.run("revoke", 16, 2.0, keys, f"{self.name} calibration 2 s")
        return max(cal["requests"] / max(cal["seconds"], 0.001), 50.0)

    def measure(self, duration: float, chunk: int, label: str) -> dict[str, Any]:
        """One phase on its own slice of fresh keys (wrk's threads take alternate lines: disjoint slices are the
        only way to never revoke a key twice)."""
        lines, self.keys = self.keys[:chunk], self.keys[chunk:]
        res = self.runner.run("revoke", 16, duration, lines, label, measured=True,
                              profile_name=f"interleaved-{self.name}-{len(self.phases) + 1}")
        self.phases.append(res)
        return res

    def checks(self) -> dict[str, Any]:
        return bench.integrity_after_revokes(self.servers, self.runner)

    def stop(self) -> None:
        for part in (self.fleet, self.service):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:
                    bench.say(f"bench: stopping {self.name}: {exc}")
        self.servers.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="worktree", help="git revision, or 'worktree' (default): the candidate")
    ap.add_argument("--b", required=True, help="git revision, or 'worktree': the baseline")
    ap.add_argument("--rounds", type=int, default=6, help="measured phases per side, even (default 6)")
    ap.add_argument("--runs", type=int, default=1, help="whole runs, each with both services and their keys afresh "
                                                        "(default 1): one run is one sample")
    ap.add_argument("--swap", action="store_true",
                    help="every second run sets up and measures B first (A, the candidate, stays A): what favours "
                         "the side that comes first cancels over an even number of runs")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per phase (default 5)")
    ap.add_argument("--margin", type=float, default=1.6, help="keys seeded per phase: calibrated rate x duration x "
                                                                "this (default 1.6)")
    ap.add_argument("--seed", choices=("import", "http"), default="import",
                    help="how the keys are made: `keyledger import better-auth` from a made-up apikey table "
                         "(default; thousands per second), or created through HTTP (~400/s)")
    ap.add_argument("--seed-concurrency", type=int, default=16, help="with --seed http")
    ap.add_argument("--profile", action="store_true", help="py-spy each phase's service (bench/results/"
                                                           "profile-interleaved-<side>-<round>.txt, folded)")
    ap.add_argument("--quiet-wait", default="pytest", help="as run.py's (default pytest; '' = no wait)")
    ap.add_argument("--quiet-cpu", type=float, default=8.0, help="as run.py's (default 8)")
    for side in ("a", "b"):
        ap.add_argument(f"--{side}-caches", type=int, default=0, metavar="N", help=f"N KeyCaches on {side.upper()}")
        ap.add_argument(f"--{side}-receipts", choices=("on", "off"), default="on",
                        help=f"off: {side.upper()}'s caches report no receipts")
    args = ap.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        ap.error("--rounds: an even number (half the rounds start with A, half with B)")

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    bench.ensure_wrk()
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kl-il-"))
    embedded: list[Any] = []
    runs: list[dict[str, Any]] = []
    try:
        if not os.environ.get("DATABASE_URL") and not os.environ.get("NATS_URL"):
            from keyledger.embedded import start_nats, start_postgres

            embedded = [start_postgres(tmp / "pg"), start_nats(tmp / "nats")]
            os.environ.update(DATABASE_URL=embedded[0].url, NATS_URL=embedded[1].url)
        bench.Runner.quiet_pattern, bench.Runner.quiet_cpu = args.quiet_wait, args.quiet_cpu
        bench.Runner.quiet_timeout = 120.0
        infos = {}
        for name, rev in (("A", args.a), ("B", args.b)):
            if rev == "worktree":
                infos[name] = {"rev": "worktree", "commit": revoke_ab.git("rev-parse", "HEAD") + " + working tree",
                               "pythonpath": ""}
            else:
                infos[name] = revoke_ab.extract(rev, tmp / f"code-{name}")
        for n in range(args.runs):
            first = "B" if args.swap and n % 2 else "A"
            if args.runs > 1:
                bench.say(f"\n##### run {n + 1} of {args.runs}: both services started afresh, their keys made anew"
                          f", {first} first")
            runs.append(one_run(args, infos, tmp / f"run-{n + 1}", first))
            if runs[-1]["geometric_mean"] is None or not all(c["ok"] for c in runs[-1]["checks"].values()):
                return 1
    finally:
        for server in reversed(embedded):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    means = [r["geometric_mean"] for r in runs]
    out = {**runs[-1], "args": vars(args), "runs": runs, "geometric_mean": statistics.geometric_mean(means)}
    if args.runs > 1:
        # Each run is one sample of whatever holds for a whole run (where the processes and their data landed):
        # the figure is the geometric mean of the runs' means, and the spread that matters is theirs.
        bench.say("")
        bench.say("=" * 100)
        bench.say(f"{args.runs} runs, geometric means per run: {', '.join(f'{m:.3f}' for m in means)}")
        bench.say(f"geometric mean of the runs {out['geometric_mean']:.3f} (range {min(means):.3f}-{max(means):.3f})"
                  f"; target >= {TARGET_RATIO}: " + ("met" if out["geometric_mean"] >= TARGET_RATIO else "MISSED"))
        bench.say("=" * 100)
    (bench.RESULTS / "revoke-interleaved-latest.json").write_text(json.dumps(out, indent=2, default=str))
    return 0


def one_run(args: argparse.Namespace, infos: dict[str, dict[str, str]], work: Path, first: str) -> dict[str, Any]:
    """Both sides served afresh (their own databases, streams, services and keys), ``first`` set up, calibrated,
    seeded and measured first in odd rounds, measured in turns; returns the run's rounds, figures and checks (the
    ratios always A/B), having printed them."""
    sides: list[Side] = []
    failed = True
    try:
        for name, info in sorted(infos.items(), key=lambda item: item[0] != first):
            sides.append(Side(name, info, work / name, getattr(args, f"{name.lower()}_caches"),
                              getattr(args, f"{name.lower()}_receipts") == "on", args.profile, args.seed))
        machine = bench.machine_info(sides[0].servers.pg_version, sides[0].servers.pg_settings)
        bench.say(f"keyledger revoke, interleaved: {machine['nproc']} CPUs ({machine['cpu_model']}), "
                  f"PostgreSQL {machine['postgres']}, {machine['date']}")
        for side in sides:
            side.start(args.seed_concurrency)
        rates = {side.name: side.calibrate() for side in sides}
        chunk = int(math.ceil(max(rates.values()) * args.duration * args.margin)) + 100
        for side in sides:
            side.keys = side.seed(chunk * args.rounds, f"{side.name}'s {args.rounds} phases")
        bench.say("")
        rounds = []
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # A B, then B A: what a phase leaves behind hits both
            got = {side.name: side.measure(args.duration, chunk, f"round {r + 1} {side.name}") for side in order}
            ratio = got["A"]["rps"] / got["B"]["rps"]
            valid = all(g["errors"] == 0 and not g["exhausted"] for g in got.values())
            rounds.append({"A": got["A"]["rps"], "B": got["B"]["rps"], "ratio": round(ratio, 4), "valid": valid})
            bench.say(f"  round {r + 1}: A/B {ratio:.3f}" + ("" if valid else "  (INVALID: errors or keys exhausted)"))
        checks = {side.name: side.checks() for side in sides}
        ratios = [r["ratio"] for r in rounds if r["valid"]]
        total = {s.name: sum(p["requests"] for p in s.phases) / sum(p["seconds"] for p in s.phases) for s in sides}
        median = statistics.median(ratios) if ratios else None
        mean = statistics.geometric_mean(ratios) if ratios else None
        bench.say("")
        bench.say("=" * 100)
        for side in sides:
            ph = side.phases
            bench.say(f"{side.name} = {side.info['rev']} ({side.info['commit'][:12]})"
                      + (f" + {side.caches} {'reporting' if side.receipts else 'silent'} caches" if side.caches else "")
                      + f": {min(p['rps'] for p in ph):,.0f}-{max(p['rps'] for p in ph):,.0f} revokes/s, "
                      f"overall {total[side.name]:,.0f}/s; log, outbox and stream "
                      + ("consistent" if checks[side.name]["ok"] else f"NOT consistent: {checks[side.name]}"))
        bench.say(f"ratio A/B per round: {', '.join(f'{x:.3f}' for x in ratios)}")
        if mean is not None:
            bench.say(f"geometric mean {mean:.3f} (median {median:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; "
                      f"overall {total['A'] / total['B']:.3f}); target >= {TARGET_RATIO}: "
                      + ("met" if mean >= TARGET_RATIO else "MISSED"))
        bench.say("=" * 100)
        failed = mean is None or not all(c["ok"] for c in checks.values())
        return {"machine": machine, "first": first, "rounds": rounds, "geometric_mean": mean, "median": median,
                "overall": total["A"] / total["B"], "checks": checks,
                "sides": {s.name: {**s.info, "code": s.code, "caches": s.caches, "receipts": s.receipts,
                                   "phases": [{k: p[k] for k in ("rps", "p50_ms", "p99_ms", "requests", "seconds",
                                                                  "cpu_pct")} for p in s.phases]} for s in sides}}
    finally:
        for side in sides:
            if failed and side.service is not None:  # what the services said, before their directory goes
                bench.say(f"--- {side.name}'s service log (tail) ---\n{side.service.log_tail(40)}")
            side.stop()


if __name__ == "__main__":
    sys.exit(main())
