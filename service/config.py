"""Configuration, from the environment only. See the README's configuration table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


# TCP keepalives on every Postgres connection: the relay's and the background leader's advisory locks live as
# long as their connection, so a peer that vanished without closing the socket must be noticed in seconds.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class ConfigError(Exception):
    pass


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip().rstrip("/") for v in (value or "").split(",") if v.strip())


def _positive(value: str | None, default: float, name: str) -> float:
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not number > 0:
        raise ConfigError(f"{name} must be more than 0 seconds")
    return number


@dataclass(frozen=True)
class Topology:
    """NATS names. The defaults are the public contract; tests override them to isolate themselves."""

    prefix: str = "apikey"  # subjects: <prefix>.events.<kind>.<keyId>, <prefix>.cache.invalidate, ...
    events_stream: str = "APIKEY_EVENTS"
    invalidations_stream: str = "APIKEY_INVALIDATIONS"
    consumer_prefix: str = "keyledger"

    @property
    def events_subjects(self) -> str:
        return f"{self.prefix}.events.>"

    def event_subject(self, kind: str, key_id: str) -> str:
        return f"{self.prefix}.events.{kind}.{key_id}"

    @property
    def invalidation_subject(self) -> str:
        return f"{self.prefix}.cache.invalidate"

    # The freshness proof (freshness.py): probes from caches, checkpoints on the events stream (one subject,
    # rolled up to the newest) and forwarded to caches after the invalidations they vouch for.
    @property
    def probe_subject(self) -> str:
        return f"{self.prefix}.cache.probe"

    @property
    def checkpoint_event_subject(self) -> str:
        return f"{self.prefix}.events.checkpoint"

    @property
    def checkpoint_subject(self) -> str:
        return f"{self.prefix}.cache.checkpoint"

    def consumer(self, name: str) -> str:
        return f"{self.consumer_prefix}-{name}"

    @classmethod
    def from_env(cls) -> "Topology":
        env = os.environ
        return cls(
            prefix=env.get("KEYLEDGER_SUBJECT_PREFIX", cls.prefix),
            events_stream=env.get("KEYLEDGER_EVENTS_STREAM", cls.events_stream),
            invalidations_stream=env.get("KEYLEDGER_INVALIDATIONS_STREAM", cls.invalidations_stream),
            consumer_prefix=env.get("KEYLEDGER_CONSUMER_PREFIX", cls.consumer_prefix),
        )


@dataclass(frozen=True)
class Settings:
    database_url: str
    nats_url: str
    secret: str
    trusted_origins: tuple[str, ...] = ()
    topology: Topology = field(default_factory=Topology)
    service_token: str | None = None  # KEYLEDGER_SERVICE_TOKEN: Bearer token of trusted backend callers
    enable_metadata: bool = False  # better-auth's default: metadata on create is refused unless enabled
    max_body_bytes: int = 64 * 1024
    pool_min: int = 2
    # A request holds its connection across its Python work between round trips, so fewer connections than
    # requests in flight leaves requests queueing while connections sit idle: at 16 concurrent revokes, 16
    # beat 10 in four back-to-back pairs of bench runs (971/1,033, 994/1,127, 673/841, 945/1,294 req/s).
    pool_max: int = 16
    relay_poll_s: float = 0.5  # the relay also polls, for writers in other processes that cannot nudge it
    last_request_flush_s: float = 1.0  # how often lastRequest of keys without limits is written (usage.py)
    run_relay: bool = True
    run_projections: bool = True

    @classmethod
    def from_env(cls, *, database_url: str | None = None, nats_url: str | None = None,
                 secret: str | None = None, default_origins: tuple[str, ...] = ()) -> "Settings":
        env = os.environ
        secret = secret or env.get("BETTER_AUTH_SECRET") or env.get("AUTH_SECRET")
        if not secret:
            raise ConfigError("BETTER_AUTH_SECRET (or AUTH_SECRET) must be set: it signs the session cookies")
        db = database_url or env.get("DATABASE_URL")
        nats = nats_url or env.get("NATS_URL")
        if not db or not nats:
            raise ConfigError("DATABASE_URL and NATS_URL must both be set (or neither, for the embedded mode)")
        return cls(
            database_url=db,
            nats_url=nats,
            secret=secret,
            trusted_origins=_csv(env.get("TRUSTED_ORIGINS")) or default_origins,
            topology=Topology.from_env(),
            service_token=env.get("KEYLEDGER_SERVICE_TOKEN") or None,
            enable_metadata=env.get("KEYLEDGER_ENABLE_METADATA", "").lower() in ("1", "true", "yes"),
            pool_max=int(env.get("KEYLEDGER_POOL_MAX", cls.pool_max)),
            relay_poll_s=float(env.get("KEYLEDGER_RELAY_POLL_S", cls.relay_poll_s)),
            last_request_flush_s=_positive(env.get("KEYLEDGER_LAST_REQUEST_FLUSH_S"), cls.last_request_flush_s,
                                           "KEYLEDGER_LAST_REQUEST_FLUSH_S"),
            run_relay=env.get("KEYLEDGER_RUN_RELAY", "1") != "0",
            run_projections=env.get("KEYLEDGER_RUN_PROJECTIONS", "1") != "0",
        )
