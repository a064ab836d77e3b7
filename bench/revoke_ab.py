#!/usr/bin/env python3
"""keyledger A/B revoke benchmark: revoke c=16 throughput of two versions of the code, alternating, in one run.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 \\
        python bench/revoke_ab.py --a 0d4abcd --b 91bf6f9 --pairs 3 --duration 10
    python bench/revoke_ab.py --a HEAD --b HEAD --a-args "--caches 10" --pairs 4 --duration 10
                                             # the same code with 10 reporting caches (A) and none (B)

Each side is a git revision of this repository, or ``worktree`` (the venv's editable install, as it is). A
revision is extracted with ``git archive`` into a temporary directory laid out as the installed package
(``keyledger/`` = ``service/*`` with its ``schema.sql`` as a real file, ``keyledger/projections/`` =
``projections/*``) and served with ``bench/run.py --pythonpath DIR``; the venv is never touched, and run.py
checks that the service's ``keyledger`` comes from DIR with no module from elsewhere. The same revision on both
sides is extracted twice, into separate directories. ``--a-args`` / ``--b-args`` (split like a shell would) are
appended to that side's run.py command, e.g. ``--caches 10``.

Runs ``bench/run.py --phases revoke_c16`` (every request revokes a different fresh key; a fresh database and
streams per run) for A, B, then B, A, then A, B, ... with the same duration. Before each calibration and
measured phase run.py waits until ``pgrep -f pytest`` finds nothing and the machine is idle (``--quiet-wait``,
``--quiet-cpu``) and notes the load average. A pair with a run that was not quiet (other processes >= 15% CPU during the phase, or
the wait ran out) or not valid (errors, keys exhausted, log and stream disagreeing) is reported and another pair
is run, until ``--pairs`` quiet pairs or ``--max-pairs``. Prints each run, each pair's ratio A/B of revokes per
second and the median ratio of the quiet pairs; ``bench/results/revoke-ab-latest.json`` keeps it all, and each
run's full output is in ``bench/results/revoke-ab-<time>/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TARGET_RATIO = 0.97  # A's revoke throughput at most 3 % below B's (a change against the previous release, or
# the same code with and without something, e.g. reporting caches: --a-args "--caches 10")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def extract(rev: str, into: Path) -> dict[str, str]:
    """``rev``'s service as an importable package ``keyledger`` under ``into``; returns what it is."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "service", "projections",
                              "schema.sql"], check=True, capture_output=True).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(src, filter="tar")
    tar_path.unlink()
    pkg = into / "keyledger"
    shutil.copytree(src / "service", pkg, symlinks=True)
    # schema.sql is a symlink to the repository's top-level schema.sql (keyledger/schema.sql in older revisions,
    # keyledger/storage/schema.sql since the layout of issue 13): make it the real file
    # (rglob("*"): a dangling symlink, as these are once copied, is not matched by the name pattern itself)
    for link in [path for path in pkg.rglob("*") if path.name == "schema.sql" and path.is_symlink()]:
        link.unlink()
        shutil.copyfile(src / "schema.sql", link)
    shutil.copytree(src / "projections", pkg / "projections")
    shutil.rmtree(src)
    return {"rev": rev, "commit": sha, "subject": git("log", "-1", "--format=%s", sha), "pythonpath": str(into)}


def one_run(side: str, info: dict[str, str], duration: float, log_path: Path, extra: list[str],
            side_args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "run.py"), "--phases", "revoke_c16", "--duration", f"{duration:g}",
           "--margin", "1.8", *extra]
    if info.get("pythonpath"):
        cmd += ["--pythonpath", info["pythonpath"]]
    cmd += side_args
    latest = RESULTS / "latest.json"
    latest.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=1800 + 30 * duration)
        except BaseException:  # interrupted or too long: run.py cleans up (database, streams) on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    out: dict[str, Any] = {"side": side, "rc": proc.returncode, "log": str(log_path), "args": side_args}
    if not latest.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"run.py ({side}) wrote no results (rc {proc.returncode}):\n{tail}")
    res = json.loads(latest.read_text())
    r = res["phases"]["revoke_c16"]
    out.update(code=res["code"]["file"], rps=r["rps"], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], errors=r["errors"],
               exhausted=r["exhausted"], requests=r["requests"], cpu_pct=r["cpu_pct"],
               loadavg_1min_before=(r.get("quiet") or {}).get("loadavg_1min"),
               quiet_waited_s=(r.get("quiet") or {}).get("waited_s"),
               still_running=(r.get("quiet") or {}).get("still_running"),
               integrity_ok=all(res["checks"].get(k) for k in ("outbox_drained", "stream_matches_log",
                                                               "revokes_consistent")),
               date=res["machine"]["date"], machine=res["machine"], caches=res.get("caches", 0),
               caches_detail=res.get("caches_detail"))
    out["valid"] = out["errors"] == 0 and not out["exhausted"] and out["integrity_ok"]
    # run.py's own threshold for "not quiet" during the phase, or a machine that was not quiet before it
    out["noisy"] = out["cpu_pct"].get("other", 0.0) >= 15.0 or not (r.get("quiet") or {}).get("quiet", True)
    if info.get("pythonpath") and not out["code"].startswith(info["pythonpath"]):
        raise RuntimeError(f"{side} ran keyledger from {out['code']}, not from {info['pythonpath']}")
    cpu = out["cpu_pct"]
    say(f"  {side}  {out['rps']:>7,.0f} revokes/s  p50 {out['p50_ms']:5.1f} ms  p99 {out['p99_ms']:5.1f} ms  "
        f"errors {out['errors']}  load avg 1 min {out['loadavg_1min_before']}  "
        f"cpu: service {cpu.get('service', 0):.0f}%"
        f" postgres {cpu.get('postgres', 0):.0f}% nats {cpu.get('nats', 0):.0f}%"
        + (f" caches {cpu.get('caches', 0):.0f}%" if "caches" in cpu else "") + f" other {cpu.get('other', 0):.0f}%  "
        f"[{out['date']}, keyledger from {out['code']}]" + ("" if out["valid"] else "  INVALID RUN")
        + ("  NOISY (other processes >= 15% CPU)" if out["noisy"] else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="worktree", help="git revision, or 'worktree' (default): the candidate")
    ap.add_argument("--b", required=True, help="git revision, or 'worktree': the baseline")
    ap.add_argument("--pairs", type=int, default=3, help="quiet, valid pairs wanted (default 3)")
    ap.add_argument("--max-pairs", type=int, default=None,
                    help="stop after this many pairs even if some were noisy or invalid (default: 2 x --pairs)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of revoke c=16 per run (default 10)")
    ap.add_argument("--quiet-wait", default="pytest", help="passed to run.py (default pytest; '' = no wait)")
    ap.add_argument("--a-args", default="", help="more run.py arguments for A only (one string, split like a shell "
                                                 "would), e.g. \"--caches 10\"")
    ap.add_argument("--b-args", default="", help="more run.py arguments for B only, as --a-args")
    args = ap.parse_args()
    side_args = {"A": shlex.split(args.a_args), "B": shlex.split(args.b_args)}

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # stop the current run.py cleanly, remove the trees

    signal.signal(signal.SIGTERM, terminated)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / f"revoke-ab-{stamp}"
    logs.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="kl-ab-"))
    rc = 1
    try:
        sides: dict[str, dict[str, str]] = {}
        for side, rev in (("A", args.a), ("B", args.b)):
            if rev == "worktree":
                sides[side] = {"rev": "worktree", "commit": git("rev-parse", "HEAD") + " + working tree",
                               "subject": "the venv's editable install", "pythonpath": ""}
            else:
                sides[side] = extract(rev, tmp / side)
            s = sides[side]
            say(f"{side}: {s['rev']} = {s['commit'][:12]} {s['subject'][:80]}"
                + (f"  (PYTHONPATH {s['pythonpath']})" if s["pythonpath"] else "")
                + f"  run.py args: {shlex.join(side_args[side]) or '(none)'}")
        say(f"{args.pairs} quiet pairs (at most {args.max_pairs or 2 * args.pairs} in all), A B then B A, "
            f"revoke c=16 for {args.duration:g} s each; full outputs in {logs}")
        extra = ["--quiet-wait", args.quiet_wait]
        pairs = []
        max_pairs = args.max_pairs or 2 * args.pairs
        i = 0
        while sum(1 for p in pairs if p["valid"] and not p["noisy"]) < args.pairs and i < max_pairs:
            i += 1
            say(f"pair {i}")
            # A B, then B A, ...: whatever the run before leaves behind (the previous database being dropped, the
            # WAL it wrote) falls on each side equally often.
            if i % 2:
                a = one_run("A", sides["A"], args.duration, logs / f"{i:02d}-A.log", extra, side_args["A"])
                b = one_run("B", sides["B"], args.duration, logs / f"{i:02d}-B.log", extra, side_args["B"])
            else:
                b = one_run("B", sides["B"], args.duration, logs / f"{i:02d}-B.log", extra, side_args["B"])
                a = one_run("A", sides["A"], args.duration, logs / f"{i:02d}-A.log", extra, side_args["A"])
            pairs.append({"a": a, "b": b, "ratio": round(a["rps"] / b["rps"], 4), "valid": a["valid"] and b["valid"],
                          "noisy": a["noisy"] or b["noisy"]})
            say(f"  ratio A/B {pairs[-1]['ratio']:.3f}" + ("" if pairs[-1]["valid"] else "  (a run was invalid)")
                + ("  (noisy)" if pairs[-1]["noisy"] else ""))
        quiet = [p["ratio"] for p in pairs if p["valid"] and not p["noisy"]]
        valid = [p["ratio"] for p in pairs if p["valid"]]
        ratios = quiet or valid  # the quiet pairs when there are any
        median = statistics.median(ratios) if ratios else None
        say("")
        say("=" * 100)
        say(f"revoke c=16, {args.duration:g} s per run: A = {sides['A']['rev']} "
            f"[{shlex.join(side_args['A']) or 'no extra args'}], B = {sides['B']['rev']} "
            f"[{shlex.join(side_args['B']) or 'no extra args'}]")
        for i, p in enumerate(pairs, 1):
            say(f"  pair {i}: A {p['a']['rps']:>7,.0f}/s (p99 {p['a']['p99_ms']:.1f} ms)  B {p['b']['rps']:>7,.0f}/s "
                f"(p99 {p['b']['p99_ms']:.1f} ms)  ratio {p['ratio']:.3f}" + ("" if p["valid"] else "  INVALID")
                + ("  noisy" if p["noisy"] else ""))
        if median is not None:
            met = median >= TARGET_RATIO
            say(f"median ratio A/B {median:.3f} over {len(ratios)} {'quiet' if quiet else 'valid (none quiet)'} pairs "
                f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target >= {TARGET_RATIO} (A at most 3 % below B): "
                f"{'met' if met else 'NOT met'}")
            if quiet and len(valid) != len(quiet):
                say(f"  all {len(valid)} valid pairs, noisy ones included: median {statistics.median(valid):.3f}")
        say("=" * 100)
        result = {"sides": sides, "side_args": side_args, "duration_s": args.duration, "pairs": pairs,
                  "median_ratio": median,
                  "median_over": "quiet" if quiet else "valid",
                  "target_ratio": TARGET_RATIO, "logs": str(logs)}
        (RESULTS / "revoke-ab-latest.json").write_text(json.dumps(result, indent=2, default=str))
        say(f"results: {RESULTS / 'revoke-ab-latest.json'}")
        rc = 0 if median is not None else 1
    except KeyboardInterrupt:
        say("revoke_ab: interrupted")
        rc = 130
    except Exception as exc:
        say(f"revoke_ab: FAILED: {type(exc).__name__}: {exc}")
        rc = 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
