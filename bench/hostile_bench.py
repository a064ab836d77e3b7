#!/usr/bin/env python3
"""keyledger hostile-input benchmark: legitimate verify while 64 connections send worst-case requests.

    python bench/hostile_bench.py [--duration 10]
    DATABASE_URL=... NATS_URL=... python bench/hostile_bench.py    # external servers (see bench/run.py)

One ``keyledger serve`` (bench/run.py's Service). Two phases of ``--duration`` seconds in one run, in this order:
quiet (8 concurrent legitimate verifies of valid keys), then the same verifies while 64 raw connections loop over
the worst inputs documented to cost nothing: a 20 KiB header (431 before the app), a 1 MiB Cookie (431 after
16 KiB), a 64 KiB body of nested JSON (400), and a body nested past msgspec's own limit (400). Every hostile answer
is checked (431 or 400, never 5xx). Prints verify throughput and p50 in both phases and their ratio (aim: within
2x). Everything on loopback; the load generator shares the two cores with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ORIGIN, Servers, Service  # noqa: E402

HOSTILE = [
    b"GET /api/auth/api-key/list HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * 20_480 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * (1 << 20) + b"\r\n\r\n",
]
DEEP = b"[" * 32_000 + b"]" * 32_000  # 64 KB
TOO_DEEP = b'{"key":' + b"[" * 2_000 + b"]" * 2_000 + b"}"
for body in (DEEP, TOO_DEEP):
    HOSTILE.append(b"POST /api/auth/api-key/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def legit(base: str, keys: list[str], seconds: float, concurrency: int = 8) -> tuple[int, float]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            n = i
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await http.post("/api/auth/api-key/verify", json={"key": keys[n % len(keys)]})
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["valid"], r.text
                n += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies), statistics.median(latencies) * 1000


async def hostile(port: int, stop: asyncio.Event, answers: dict[bytes, int]) -> None:
    n = 0
    while not stop.is_set():
        request = HOSTILE[n % len(HOSTILE)]
        n += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await writer.drain()
            except ConnectionError:
                pass
            head = await asyncio.wait_for(reader.read(12), 10)
            status = head[9:12] or b"closed"
            answers[status] = answers.get(status, 0) + 1
            writer.close()
        except (ConnectionError, asyncio.TimeoutError):
            # The server answered 431 and closed while the rest of a 1 MiB header was still being sent: the
            # reset can overtake the answer. Never a 5xx.
            answers[b"closed"] = answers.get(b"closed", 0) + 1


async def run(service: Service, duration: float) -> None:
    cookie = service.dev_session()
    headers = {"cookie": cookie, "origin": ORIGIN}
    async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
        keys = [(await http.post("/api/auth/api-key/create", headers=headers, json={})).json()["key"]
                for _ in range(50)]
    await legit(service.base, keys, 2.0)  # warm-up
    quiet_n, quiet_p50 = await legit(service.base, keys, duration)
    # The attackers run in a process of their own, so they do not slow this process's legitimate client.
    attacker = await asyncio.create_subprocess_exec(sys.executable, __file__, "--attack", str(service.port),
                                                    str(duration + 1.0), stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)
    loud_n, loud_p50 = await legit(service.base, keys, duration)
    out, _ = await attacker.communicate()
    answers = {k.encode(): int(v) for k, v in (item.split("=") for item in out.decode().split())}
    bad = {k: v for k, v in answers.items() if k not in (b"431", b"400", b"closed")}
    print(f"quiet:   {quiet_n / duration:,.0f} verifies/s, p50 {quiet_p50:.2f} ms")
    print(f"hostile: {loud_n / duration:,.0f} verifies/s, p50 {loud_p50:.2f} ms, while 64 connections got "
          + ", ".join(f"{v:,} x {k.decode()}" for k, v in sorted(answers.items())))
    print(f"ratio:   throughput {quiet_n / max(loud_n, 1):.2f}x lower, p50 {loud_p50 / quiet_p50:.2f}x higher "
          f"(aim: within 2x)")
    if bad:
        raise RuntimeError(f"hostile requests got unexpected answers: {bad}")


async def attack(port: int, seconds: float) -> None:
    stop, answers = asyncio.Event(), {}
    attackers = [asyncio.create_task(hostile(port, stop, answers)) for _ in range(64)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*attackers)
    print(" ".join(f"{k.decode()}={v}" for k, v in answers.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--attack", nargs=2, metavar=("PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:
        asyncio.run(attack(int(args.attack[0]), float(args.attack[1])))
        return 0
    servers = Servers()
    service = Service(servers, Path("/tmp") / f"hostile-bench-{servers.rand}.log")
    try:
        service.wait_ready(lambda r: r.status_code == 200)
        asyncio.run(run(service, args.duration))
    finally:
        service.stop()
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
