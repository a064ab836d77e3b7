"""The API-key lifecycle events: what the log stores and NATS carries.

Events are frozen, tagged msgspec Structs. Stored events are kept forever, so two rules hold for every change
to this file: a new field always gets a default (old rows lack it), and a field is never renamed or removed.

Only the key's *hash* (better-auth's ``base64url(sha256(key))``) ever appears in an event; the plaintext key
exists only in the create response.

This module is part of the pure domain core: it imports no framework, driver or client.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Union

import msgspec
from msgspec import UNSET, UnsetType


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type", rename="camel"):
    """Base of all events. ``key_hash`` lets consumers (caches) act without a lookup."""

    key_hash: str


class ApiKeyCreated(Event, frozen=True, kw_only=True, tag=True):
    config_id: str = "default"
    reference_id: str  # owner: the user id (or organization id for org keys)
    user_id: str | None = None  # the user who created it
    name: str | None = None
    start: str | None = None
    prefix: str | None = None
    enabled: bool = True
    expires_at: dt.datetime | None = None
    metadata: dict[str, Any] | None = None
    permissions: dict[str, list[str]] | None = None
    rate_limit_enabled: bool = False
    rate_limit_time_window: int | None = 86_400_000
    rate_limit_max: int | None = 10
    remaining: int | None = None
    refill_amount: int | None = None
    refill_interval: int | None = None


class ApiKeyImported(ApiKeyCreated, frozen=True, kw_only=True, tag=True):
    """A key that existed before keyledger (better-auth's ``apikey`` table), adopted with its stored hash.

    It behaves exactly like ``ApiKeyCreated`` (same fields), plus where it came from and when it was really
    created, so existing keys keep working without being reissued.
    """

    source: str = "better-auth"
    created_at: dt.datetime | None = None  # the source row's createdAt; None means "when imported"


class ApiKeyUpdated(Event, frozen=True, kw_only=True, tag=True):
    """Carries only the fields that changed; an absent field is unchanged (``null`` is a real value).

    The fields after ``metadata`` are the server-only ones (set by a server caller, never a browser).
    """

    name: str | None | UnsetType = UNSET
    expires_at: dt.datetime | None | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET
    permissions: dict[str, list[str]] | None | UnsetType = UNSET
    remaining: int | None | UnsetType = UNSET
    refill_amount: int | None | UnsetType = UNSET
    refill_interval: int | None | UnsetType = UNSET
    rate_limit_enabled: bool | UnsetType = UNSET
    rate_limit_time_window: int | None | UnsetType = UNSET
    rate_limit_max: int | None | UnsetType = UNSET


class ApiKeyExpired(Event, frozen=True, kw_only=True, tag=True):
    """Recorded once by the expiry sweeper when ``expiresAt`` has passed, so projections and caches learn it
    without anyone calling verify. Verify refuses an expired key from ``expiresAt`` on, event or not."""

    expires_at: dt.datetime | None = None  # the deadline that passed


class ApiKeyRotated(Event, frozen=True, kw_only=True, tag=True):
    """A new secret for the same key id. ``key_hash`` is the NEW secret's hash; the superseded one
    (``previous_key_hash``) keeps verifying until ``grace_until`` (``None``: it stopped at once). Each superseded
    secret keeps its own deadline, so rotating twice inside a grace period leaves two old secrets working.
    Rotation never changes the key's own ``expiresAt``."""

    previous_key_hash: str
    start: str | None = None  # the new secret's first characters
    previous_start: str | None = None  # the superseded secret's, so auditors can tell the two apart
    grace_until: dt.datetime | None = None


class ApiKeySecretRetired(Event, frozen=True, kw_only=True, tag=True):
    """Recorded once by the sweeper when a superseded secret's grace period has ended (``key_hash`` is that
    secret's hash), so caches drop it (reason ``rotated``) without anyone calling verify. Verify refuses the
    secret from ``grace_until`` on, event or not."""

    grace_until: dt.datetime | None = None


class ApiKeyDisabled(Event, frozen=True, kw_only=True, tag=True):
    pass


class ApiKeyEnabled(Event, frozen=True, kw_only=True, tag=True):
    pass


class ApiKeyRevoked(Event, frozen=True, kw_only=True, tag=True):
    pass


AnyEvent = Union[ApiKeyCreated, ApiKeyImported, ApiKeyUpdated, ApiKeyDisabled, ApiKeyEnabled, ApiKeyRevoked,
                 ApiKeyExpired, ApiKeyRotated, ApiKeySecretRetired]
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (ApiKeyCreated, ApiKeyImported, ApiKeyUpdated, ApiKeyDisabled, ApiKeyEnabled, ApiKeyRevoked,
                ApiKeyExpired, ApiKeyRotated, ApiKeySecretRetired)
}


def kind(event_type: str) -> str:
    """``ApiKeyRevoked`` -> ``revoked``: the subject token and the name people read."""
    return event_type.removeprefix("ApiKey").lower()


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as the log holds it: the domain event plus where and when it was recorded, and by whom."""

    id: str  # uuid, also the JetStream Nats-Msg-Id
    stream_id: str  # the key id
    version: int
    position: int
    recorded_at: dt.datetime
    metadata: dict[str, Any]
    event: Event

    @property
    def type(self) -> str:
        return type(self.event).__name__


class Envelope(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The public JSON shape of an event, on NATS, in ``history --json`` and in exports."""

    id: str
    type: str
    key_id: str
    version: int
    position: int
    occurred_at: dt.datetime
    actor: dict[str, Any]
    data: dict[str, Any]
    # Present (true) only on the reduced form the relay publishes when NATS refuses an event for its size: the
    # key hashes stay in ``data``, ``actor`` is empty, the rest is in the log (history, export).
    reduced: bool | UnsetType = UNSET


class EnvelopeHead(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What a consumer that reads the log itself needs of an envelope (decodes whole and reduced forms), without
    decoding its actor and data."""

    id: str
    type: str
    key_id: str
    version: int
    position: int
    occurred_at: dt.datetime | None = None
    reduced: bool = False


# One encoder/decoder pair, built once and reused.
_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)
_head_decoder = msgspec.json.Decoder(EnvelopeHead)
_data_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def encode_data(event: Event) -> bytes:
    """The ``data`` column / envelope ``data``: the event's fields without the ``type`` tag."""
    fields = msgspec.to_builtins(event)
    del fields["type"]
    return _encoder.encode(fields)


def decode_data(event_type: str, data: bytes | str) -> Event:
    try:
        decoder = _data_decoders[event_type]
    except KeyError:
        raise ValueError(f"unknown event type {event_type!r}") from None
    return decoder.decode(data)


def data_from_builtins(event_type: str, data: dict[str, Any]) -> Event:
    return msgspec.convert(data, EVENT_TYPES[event_type])


def to_envelope(recorded: RecordedEvent) -> Envelope:
    data = msgspec.to_builtins(recorded.event)
    del data["type"]
    return Envelope(
        id=recorded.id,
        type=recorded.type,
        key_id=recorded.stream_id,
        version=recorded.version,
        position=recorded.position,
        occurred_at=recorded.recorded_at,
        actor=recorded.metadata,
        data=data,
    )


def encode_envelope(recorded: RecordedEvent) -> bytes:
    return _encoder.encode(to_envelope(recorded))


# The fields a reduced envelope keeps of ``data``: enough for a cache to evict.
REDUCED_FIELDS = ("keyHash", "previousKeyHash")


def encode_reduced_envelope(recorded: RecordedEvent) -> bytes:
    env = to_envelope(recorded)
    data = {k: env.data[k] for k in REDUCED_FIELDS if k in env.data}
    return _encoder.encode(msgspec.structs.replace(env, actor={}, data=data, reduced=True))


def decode_envelope_head(payload: bytes) -> EnvelopeHead:
    return _head_decoder.decode(payload)


def decode_envelope(payload: bytes) -> RecordedEvent:
    env = _envelope_decoder.decode(payload)
    return RecordedEvent(
        id=env.id,
        stream_id=env.key_id,
        version=env.version,
        position=env.position,
        recorded_at=env.occurred_at,
        metadata=env.actor,
        event=data_from_builtins(env.type, env.data),
    )
