"""The pure domain core: ``decide(command, state) -> events`` and ``evolve(state, event) -> state``.

No I/O, no framework, driver or client imports: the clock and the key material arrive inside the command, so
every rule here can be tested by folding lists of events. The store loads a key's events, folds them with
``evolve``, asks ``decide`` what happens, and appends the answer at the next version (the unique
``(stream_id, version)`` index turns a concurrent writer into a retry, never a double write).

Authorization is a domain rule: a key belongs to its ``reference_id``; anyone else is told the key does not
exist (better-auth answers 404 ``KEY_NOT_FOUND`` for another user's key, never 403).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from .events import (
    ApiKeyCreated,
    ApiKeyDisabled,
    ApiKeyEnabled,
    ApiKeyExpired,
    ApiKeyRevoked,
    ApiKeyRotated,
    ApiKeySecretRetired,
    ApiKeyUpdated,
    Event,
)

# better-auth's bounds for ``expiresIn`` (seconds).
MIN_EXPIRES_IN = 86_400
MAX_EXPIRES_IN = 365 * 86_400
# The longest a superseded secret may keep working after a rotation (seconds).
MAX_GRACE_PERIOD = 7 * 86_400


class DomainError(Exception):
    """A rule refused the command. ``status``/``code``/``message`` are better-auth's wire values."""

    status = 400
    code = "BAD_REQUEST"
    message = "Bad request"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


class KeyNotFound(DomainError):
    status = 404
    code = "KEY_NOT_FOUND"
    message = "API Key not found"


class NoValuesToUpdate(DomainError):
    code = "NO_VALUES_TO_UPDATE"
    message = "No values to update."


class ExpiresInTooSmall(DomainError):
    code = "EXPIRES_IN_IS_TOO_SMALL"
    message = "The expiresIn is smaller than the predefined minimum value."


class ExpiresInTooLarge(DomainError):
    code = "EXPIRES_IN_IS_TOO_LARGE"
    message = "The expiresIn is larger than the predefined maximum value."


class KeyDisabled(DomainError):
    code = "KEY_DISABLED"
    message = "API Key is disabled"


class KeyExpired(DomainError):
    code = "KEY_EXPIRED"
    message = "API Key has expired"


class GracePeriodOutOfRange(DomainError):
    """The invariant, and also what the handler answers when it checks the input before authenticating."""

    code = "VALIDATION_ERROR"
    expected = f"an integer from 0 to {MAX_GRACE_PERIOD}"
    message = f"[body.gracePeriodSeconds] Invalid input: expected {expected}"


class KeyState(msgspec.Struct, frozen=True, kw_only=True):
    """What the log says about one key: the fold of its events."""

    id: str
    version: int
    key_hash: str
    reference_id: str
    config_id: str
    name: str | None
    start: str | None
    prefix: str | None
    enabled: bool
    expires_at: dt.datetime | None
    metadata: dict[str, Any] | None
    permissions: dict[str, list[str]] | None
    created: ApiKeyCreated
    created_at: dt.datetime
    updated_at: dt.datetime
    remaining: int | None = None
    remaining_version: int | None = None  # the version of the event that last set `remaining`
    refill_amount: int | None = None
    refill_interval: int | None = None
    rate_limit_enabled: bool = False
    rate_limit_time_window: int | None = 86_400_000
    rate_limit_max: int | None = 10
    expired: bool = False  # ApiKeyExpired recorded (and no later expiry change)
    revoked: bool = False
    # Secrets a rotation superseded that are not retired yet: (hash, grace deadline), oldest first.
    superseded: tuple[tuple[str, dt.datetime], ...] = ()


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
class Command(msgspec.Struct, frozen=True, kw_only=True):
    actor_id: str  # the user acting
    now: dt.datetime
    # Whose keys the actor acts on: itself by default, or an organization the HTTP layer found it may manage
    # (owner or admin; membership lives in better-auth's tables, outside this pure core). A key is visible to
    # a command only if both its referenceId and its configId match: user and org keys never see each other.
    owner_id: str | None = None
    config_id: str = "default"

    @property
    def owner(self) -> str:
        return self.owner_id or self.actor_id


# Fields only a server caller may set (better-auth's "server-only properties").
SERVER_FIELDS = ("permissions", "remaining", "refill_amount", "refill_interval", "rate_limit_enabled",
                 "rate_limit_time_window", "rate_limit_max")


class CreateKey(Command, frozen=True, kw_only=True):
    key_id: str
    key_hash: str
    start: str
    prefix: str | None = None
    name: str | None = None
    expires_in: int | None = None
    metadata: dict[str, Any] | None = None
    # server-only
    permissions: dict[str, list[str]] | None = None
    remaining: int | None = None
    refill_amount: int | None = None
    refill_interval: int | None = None
    rate_limit_enabled: bool = False
    rate_limit_time_window: int | None = 86_400_000
    rate_limit_max: int | None = 10


class UpdateKey(Command, frozen=True, kw_only=True):
    key_id: str
    name: str | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    expires_in: int | None | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET
    # server-only
    permissions: dict[str, list[str]] | None | UnsetType = UNSET
    remaining: int | None | UnsetType = UNSET
    refill_amount: int | None | UnsetType = UNSET
    refill_interval: int | None | UnsetType = UNSET
    rate_limit_enabled: bool | UnsetType = UNSET
    rate_limit_time_window: int | None | UnsetType = UNSET
    rate_limit_max: int | None | UnsetType = UNSET


class RevokeKey(Command, frozen=True, kw_only=True):
    key_id: str


class RotateKey(Command, frozen=True, kw_only=True):
    """A new secret for the key; the current one keeps working for ``grace_seconds`` (0: stops at once)."""

    key_id: str
    key_hash: str  # of the new secret
    start: str
    grace_seconds: int = 0


class RetireSecret(Command, frozen=True, kw_only=True):
    """The sweeper's command: records ApiKeySecretRetired once, when a superseded secret's grace has ended."""

    key_id: str
    key_hash: str  # the superseded secret


class ExpireKey(Command, frozen=True, kw_only=True):
    """The expiry sweeper's command: not owner-bound; records ApiKeyExpired once, when the deadline passed."""

    key_id: str


# ----------------------------------------------------------------------------------------------------------
# evolve: state + event -> state
# ----------------------------------------------------------------------------------------------------------
def evolve(state: KeyState | None, event: Event, *, key_id: str, version: int, at: dt.datetime) -> KeyState:
    if isinstance(event, ApiKeyCreated):  # ApiKeyImported too (a subclass)
        created_at = getattr(event, "created_at", None) or at
        return KeyState(
            id=key_id,
            version=version,
            key_hash=event.key_hash,
            reference_id=event.reference_id,
            config_id=event.config_id,
            name=event.name,
            start=event.start,
            prefix=event.prefix,
            enabled=event.enabled,
            expires_at=event.expires_at,
            metadata=event.metadata,
            permissions=event.permissions,
            created=event,
            created_at=created_at,
            updated_at=at,
            remaining=event.remaining,
            remaining_version=version,
            refill_amount=event.refill_amount,
            refill_interval=event.refill_interval,
            rate_limit_enabled=event.rate_limit_enabled,
            rate_limit_time_window=event.rate_limit_time_window,
            rate_limit_max=event.rate_limit_max,
        )
    if state is None:
        raise ValueError(f"{type(event).__name__} before ApiKeyCreated for key {key_id}")
    changes: dict[str, Any] = {"version": version, "updated_at": at}
    if isinstance(event, ApiKeyUpdated):
        for field in ("name", "expires_at", "metadata", *SERVER_FIELDS):
            value = getattr(event, field)
            if value is not UNSET:
                changes[field] = value
        if event.expires_at is not UNSET:
            changes["expired"] = False
        if event.remaining is not UNSET:
            changes["remaining_version"] = version  # a new deadline: the sweeper will record its passing again
    elif isinstance(event, ApiKeyExpired):
        changes["expired"] = True
    elif isinstance(event, ApiKeyDisabled):
        changes["enabled"] = False
    elif isinstance(event, ApiKeyEnabled):
        changes["enabled"] = True
    elif isinstance(event, ApiKeyRevoked):
        changes["revoked"] = True
        changes["superseded"] = ()
    elif isinstance(event, ApiKeyRotated):
        changes["key_hash"] = event.key_hash
        changes["start"] = event.start
        if event.grace_until is not None:
            changes["superseded"] = (*state.superseded, (event.previous_key_hash, event.grace_until))
    elif isinstance(event, ApiKeySecretRetired):
        changes["superseded"] = tuple(s for s in state.superseded if s[0] != event.key_hash)
    return msgspec.structs.replace(state, **changes)


def fold(events: list[tuple[int, dt.datetime, Event]], key_id: str) -> KeyState | None:
    """Fold ``(version, recorded_at, event)`` triples, in version order, into the key's state."""
    state: KeyState | None = None
    for version, at, event in events:
        state = evolve(state, event, key_id=key_id, version=version, at=at)
    return state


# ----------------------------------------------------------------------------------------------------------
# decide: command + state -> events
# ----------------------------------------------------------------------------------------------------------
def _owned(state: KeyState | None, command: Command) -> KeyState:
    # Unknown, revoked and someone else's key are the same answer, so ids cannot be probed.
    if state is None or state.revoked or state.reference_id != command.owner or state.config_id != command.config_id:
        raise KeyNotFound()
    return state


def _expires_at(now: dt.datetime, expires_in: int | None) -> dt.datetime | None:
    if expires_in is None:
        return None
    if expires_in < MIN_EXPIRES_IN:
        raise ExpiresInTooSmall()
    if expires_in > MAX_EXPIRES_IN:
        raise ExpiresInTooLarge()
    return now + dt.timedelta(seconds=expires_in)


def decide(command: Command, state: KeyState | None) -> list[Event]:
    if isinstance(command, CreateKey):
        if state is not None:  # a 32-letter random id collided: astronomically unlikely, never silent
            raise DomainError("Key id already exists")
        return [
            ApiKeyCreated(
                key_hash=command.key_hash,
                reference_id=command.owner,
                config_id=command.config_id,
                user_id=command.actor_id,
                name=command.name,
                start=command.start,
                prefix=command.prefix,
                expires_at=_expires_at(command.now, command.expires_in),
                metadata=command.metadata,
                **{field: getattr(command, field) for field in SERVER_FIELDS},
            )
        ]

    if isinstance(command, ExpireKey):
        if state is None or state.revoked or state.expired or state.expires_at is None:
            return []
        if state.expires_at > command.now:
            return []
        return [ApiKeyExpired(key_hash=state.key_hash, expires_at=state.expires_at)]

    if isinstance(command, RevokeKey):
        key = _owned(state, command)
        return [ApiKeyRevoked(key_hash=key.key_hash)]

    if isinstance(command, RotateKey):
        key = _owned(state, command)
        if not key.enabled:
            raise KeyDisabled()
        if key.expired or (key.expires_at is not None and key.expires_at <= command.now):
            raise KeyExpired()
        if not 0 <= command.grace_seconds <= MAX_GRACE_PERIOD:
            raise GracePeriodOutOfRange()
        grace_until = command.now + dt.timedelta(seconds=command.grace_seconds) if command.grace_seconds else None
        return [ApiKeyRotated(key_hash=command.key_hash, previous_key_hash=key.key_hash, start=command.start,
                              previous_start=key.start, grace_until=grace_until)]

    if isinstance(command, RetireSecret):
        if state is None or state.revoked:
            return []
        for key_hash, grace_until in state.superseded:
            if key_hash == command.key_hash and grace_until <= command.now:
                return [ApiKeySecretRetired(key_hash=key_hash, grace_until=grace_until)]
        return []  # not superseded, already retired, or its grace has not ended

    if isinstance(command, UpdateKey):
        key = _owned(state, command)
        if all(getattr(command, f) is UNSET for f in ("name", "enabled", "expires_in", "metadata", *SERVER_FIELDS)):
            raise NoValuesToUpdate()
        changed: dict[str, Any] = {}
        if command.name is not UNSET and command.name != key.name:
            changed["name"] = command.name
        if command.expires_in is not UNSET:
            # Like better-auth, setting expiresIn restarts the clock from now, so it is always a change.
            changed["expires_at"] = _expires_at(command.now, command.expires_in)
        if command.metadata is not UNSET and command.metadata != key.metadata:
            changed["metadata"] = command.metadata
        for field in SERVER_FIELDS:
            value = getattr(command, field)
            if value is not UNSET and value != getattr(key, field):
                changed[field] = value
        events: list[Event] = []
        if command.enabled is not UNSET and command.enabled != key.enabled:
            flip = ApiKeyEnabled if command.enabled else ApiKeyDisabled
            events.append(flip(key_hash=key.key_hash))
        if changed:
            events.append(ApiKeyUpdated(key_hash=key.key_hash, **changed))
        return events

    raise TypeError(f"unknown command {type(command).__name__}")
