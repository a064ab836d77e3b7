"""Configuration, from the environment only. Every setting is listed in docs/operations.md."""

from __future__ import annotations

import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    pass


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def nats_servers(value: str) -> list[str]:
    """``NATS_URL``: one URL or a comma-separated list (a cluster's seed servers; nats-py tries each and learns
    the rest from the cluster). A URL that cannot be parsed is a ConfigError, never a silent retry loop.
    user:password@ or token@ in a URL are passed on to nats-py as is."""
    servers = [part.strip() for part in value.split(",") if part.strip()]
    if not servers:
        raise ConfigError("NATS_URL is empty")
    for url in servers:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018  (reading it is the check: a port out of range raises ValueError)
        except ValueError as exc:
            raise ConfigError(f"NATS_URL: cannot parse {_redact(url)!r} ({exc})") from None
        if parts.scheme not in NATS_SCHEMES or not parts.hostname:
            raise ConfigError(f"NATS_URL: {_redact(url)!r} is not a NATS URL (scheme://host[:port], scheme one of "
                              f"{', '.join(NATS_SCHEMES)})")
    return servers


def _redact(url: str) -> str:
    """A URL with its credentials hidden, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return urllib.parse.urlunsplit((parts.scheme, f"***@{host}" + (f":{parts.port}" if parts.port else ""),
                                        parts.path, parts.query, parts.fragment))
    return url


_PASSWORD_PAIR = re.compile(r"password\s*=\s*(?:'(?:\\.|[^'])*'|\S+)")  # libpq's key=value form


def redact_conninfo(value: str) -> str:
    """A PostgreSQL connection string for messages, in either of libpq's forms: a URL through ``_redact`` (and a
    ``password`` in its query hidden too), or ``key=value`` pairs with the password's value hidden."""
    if "://" in value:
        parts = urllib.parse.urlsplit(_redact(value))
        query = [(k, "***" if k == "password" else v) for k, v in urllib.parse.parse_qsl(parts.query)]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="*")))
    return _PASSWORD_PAIR.sub("password=***", value)


def nats_connect_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats-py ``connect`` options from the environment: credentials and TLS.

    ``NATS_CREDS_FILE`` (a .creds file: JWT + nkey seed), ``NATS_NKEY_SEED_FILE`` (an nkey seed),
    ``NATS_TLS_CA_FILE`` (trust this CA; with it, TLS is used), ``NATS_TLS_CERT_FILE`` + ``NATS_TLS_KEY_FILE``
    (a client certificate, for servers that verify clients). A file that does not exist is a ConfigError.
    """
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    for name, option in (("NATS_CREDS_FILE", "user_credentials"), ("NATS_NKEY_SEED_FILE", "nkeys_seed")):
        path = env.get(name)
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")
            options[option] = path
    ca, cert, key = env.get("NATS_TLS_CA_FILE"), env.get("NATS_TLS_CERT_FILE"), env.get("NATS_TLS_KEY_FILE")
    if bool(cert) != bool(key):
        raise ConfigError("NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE go together")
    if ca or cert:
        for name, path in (("NATS_TLS_CA_FILE", ca), ("NATS_TLS_CERT_FILE", cert), ("NATS_TLS_KEY_FILE", key)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key)
        options["tls"] = context
    return options


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
    def event_only_subjects(self) -> str:
        """The events, ``<prefix>.events.<kind>.<keyId>`` (key ids hold no dots): what every consumer takes. It
        leaves out ``<prefix>.events.checkpoint``, where earlier versions stored their checkpoints."""
        return f"{self.prefix}.events.*.*"

    @property
    def relay_checkpoint_subject(self) -> str:
        """The relay's checkpoints to the invalidation projection: core NATS, in no stream."""
        return f"{self.prefix}.relay.checkpoint"

    @property
    def checkpoint_subject(self) -> str:
        return f"{self.prefix}.cache.checkpoint"

    # Revocation receipts (projections/receipts.py): caches report positions; keyledger announces completion.
    @property
    def receipts_subject(self) -> str:
        return f"{self.prefix}.cache.receipts"

    @property
    def effective_subject(self) -> str:
        return f"{self.prefix}.revocation.effective"

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
    streams: "StreamSettings" = field(default_factory=lambda: StreamSettings())

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
        nats_servers(nats)  # a URL that cannot be parsed stops the start here
        nats_connect_options(env)  # so does a credentials or TLS file that is not there
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
            streams=StreamSettings.from_env(env),
        )


@dataclass(frozen=True)
class StreamSettings:
    """How keyledger declares its JetStream streams (bus.py). An existing stream is never changed silently: a
    difference is reported once at WARNING, and ``keyledger migrate --streams`` applies what JetStream allows.

    * ``replicas`` (``KEYLEDGER_STREAM_REPLICAS``, 1): 3 on a cluster, so one node can go.
    * ``invalidations_max_age`` (``KEYLEDGER_INVALIDATIONS_MAX_AGE``, 86400 s): a cache replays missed
      invalidations only across a short disconnect (``KeyCache.max_replay``) and flushes itself otherwise, so
      older ones are never read; a day covers any outage a cache would replay through, at ~350 B each.
    * ``events_max_age`` (``KEYLEDGER_EVENTS_MAX_AGE``, 0 = keep forever): PostgreSQL is the source of truth; a
      consumer that needs events older than the stream keeps reads them from the log (``keyledger audit
      export --since``, ``history``) and then follows the stream from there.
    * ``storage`` (``KEYLEDGER_STREAM_STORAGE``, file): ``memory`` only for throw-away setups.
    """

    replicas: int = 1
    invalidations_max_age: float = 86_400.0
    events_max_age: float = 0.0
    storage: str = "file"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "StreamSettings":
        try:
            replicas = int(env.get("KEYLEDGER_STREAM_REPLICAS", cls.replicas))
            inv_age = float(env.get("KEYLEDGER_INVALIDATIONS_MAX_AGE", cls.invalidations_max_age))
            ev_age = float(env.get("KEYLEDGER_EVENTS_MAX_AGE", cls.events_max_age))
        except ValueError as exc:
            raise ConfigError(f"stream settings: {exc}") from None
        storage = env.get("KEYLEDGER_STREAM_STORAGE", cls.storage).lower()
        if not 1 <= replicas <= 5:
            raise ConfigError("KEYLEDGER_STREAM_REPLICAS must be 1 to 5")
        if inv_age <= 0 or ev_age < 0:
            raise ConfigError("KEYLEDGER_INVALIDATIONS_MAX_AGE must be > 0 and KEYLEDGER_EVENTS_MAX_AGE >= 0")
        if storage not in ("file", "memory"):
            raise ConfigError("KEYLEDGER_STREAM_STORAGE must be file or memory")
        return cls(replicas, inv_age, ev_age, storage)
