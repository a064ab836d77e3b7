"""A downstream service protected by keyledger keys: one route, ``GET /api/data``, behind ``KeyCache``.

Run it next to a keyledger instance:

    python examples/downstream.py --keyledger-url http://127.0.0.1:3000 --nats-url nats://127.0.0.1:4250 --port 3100
    curl -H "Authorization: Bearer $KEY" http://127.0.0.1:3100/api/data      # {"ok": true, "keyId": "..."}
    curl "http://127.0.0.1:3100/api/data?api_key=$KEY"                       # the same

A missing, invalid, revoked, disabled or expired key gets 401 ``{"error": "Unauthorized"}``. Revoking the
key in keyledger makes the next requests fail within milliseconds: the cache evicts it when keyledger's
invalidation arrives over NATS. Settings also come from the environment: ``KEYLEDGER_URL``, ``NATS_URL``,
``KEYLEDGER_SUBJECT_PREFIX`` and ``KEYLEDGER_INVALIDATIONS_STREAM`` (the same names the service reads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, get
from prometheus_client import CollectorRegistry, generate_latest

from keyledger.client import KeyCache, litestar_middleware
from keyledger.config import Topology, nats_connect_options


def create_app(cache: KeyCache) -> Litestar:
    """The app; its lifespan starts and closes ``cache``."""

    @get("/api/data")
    async def data(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"ok": True, "keyId": request.state.api_key["id"]}

    @get("/health")
    async def health() -> dict[str, Any]:
        # ``trusted``: the cache holds a freshness proof from keyledger's log (not just a live connection).
        return {"ok": True, "cacheTrusted": cache.trusted, "cacheCaughtUp": cache.caught_up}

    registry = CollectorRegistry()
    registry.register(cache.collector())

    @get("/metrics", media_type="text/plain; version=0.0.4")
    async def metrics() -> bytes:
        return generate_latest(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await cache.start()
        try:
            yield
        finally:
            await cache.close()

    return Litestar(
        route_handlers=[data, health, metrics],
        middleware=[litestar_middleware(cache, exclude=("/health", "/metrics"))],
        lifespan=[lifespan],
        logging_config=None,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="example downstream service using keyledger's KeyCache")
    parser.add_argument("--keyledger-url", default=os.environ.get("KEYLEDGER_URL", "http://127.0.0.1:3000"))
    # 4250: the embedded NATS of `./dev.sh run`; set NATS_URL for any other.
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4250"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--cache-id", default=None, help="this cache's name in keyledger's revocation receipts")
    parser.add_argument("--service", default="downstream-example", help="the service name in receipts")
    parser.add_argument("--staleness", type=float, default=1.0,
                        help="seconds a cached key may be served while invalidations cannot be proven")
    args = parser.parse_args(argv)
    # --keyledger-url and --nats-url take comma-separated lists (failover); credentials and TLS for NATS come
    # from NATS_CREDS_FILE, NATS_NKEY_SEED_FILE, NATS_TLS_* as for keyledger itself.
    cache = KeyCache(args.keyledger_url, args.nats_url or None, topology=Topology.from_env(),
                     staleness=args.staleness, nats_options=nats_connect_options(), cache_id=args.cache_id,
                     service=args.service)
    uvicorn.run(create_app(cache), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
