"""The pure domain core: decide/evolve, and the event encodings, without any server."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings, strategies as st

from keyledger.core import domain
from keyledger.core.domain import CreateKey, KeyNotFound, RevokeKey, UpdateKey, decide, evolve, fold
from keyledger.core.events import (
    ApiKeyCreated,
    ApiKeyDisabled,
    ApiKeyEnabled,
    ApiKeyRevoked,
    ApiKeyUpdated,
    RecordedEvent,
    decode_data,
    decode_envelope,
    encode_data,
    encode_envelope,
)

T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
OWNER, STRANGER = "owner", "stranger"


def created(**kw: object) -> domain.KeyState:
    command = CreateKey(actor_id=OWNER, now=T0, key_id="k1", key_hash="h" * 43, start="abcdef", **kw)
    (event,) = decide(command, None)
    return evolve(None, event, key_id="k1", version=1, at=T0)


def test_create_records_hash_owner_and_expiry() -> None:
    state = created(name="n", expires_in=86_400)
    assert state.reference_id == OWNER and state.key_hash == "h" * 43 and state.version == 1
    assert state.expires_at == T0 + dt.timedelta(days=1)
    with pytest.raises(domain.ExpiresInTooSmall):
        created(expires_in=86_399)
    with pytest.raises(domain.ExpiresInTooLarge):
        created(expires_in=365 * 86_400 + 1)


def test_revoke_is_owner_only_and_final() -> None:
    state = created()
    with pytest.raises(KeyNotFound):
        decide(RevokeKey(actor_id=STRANGER, now=T0, key_id="k1"), state)
    (event,) = decide(RevokeKey(actor_id=OWNER, now=T0, key_id="k1"), state)
    assert isinstance(event, ApiKeyRevoked) and event.key_hash == state.key_hash
    gone = evolve(state, event, key_id="k1", version=2, at=T0)
    for command in (RevokeKey(actor_id=OWNER, now=T0, key_id="k1"),
                    UpdateKey(actor_id=OWNER, now=T0, key_id="k1", name="x")):
        with pytest.raises(KeyNotFound):
            decide(command, gone)
    with pytest.raises(KeyNotFound):
        decide(RevokeKey(actor_id=OWNER, now=T0, key_id="nope"), None)


def test_update_records_flips_and_changes_separately() -> None:
    state = created(name="a")
    events = decide(UpdateKey(actor_id=OWNER, now=T0, key_id="k1", enabled=False, name="b"), state)
    assert [type(e) for e in events] == [ApiKeyDisabled, ApiKeyUpdated]
    assert events[1].name == "b"
    assert decide(UpdateKey(actor_id=OWNER, now=T0, key_id="k1", enabled=True, name="a"), state) == []
    with pytest.raises(domain.NoValuesToUpdate):
        decide(UpdateKey(actor_id=OWNER, now=T0, key_id="k1"), state)


commands = st.lists(
    st.one_of(
        st.builds(lambda who, v: ("enabled", who, v), st.sampled_from([OWNER, STRANGER]), st.booleans()),
        st.builds(lambda who, v: ("name", who, v), st.sampled_from([OWNER, STRANGER]), st.sampled_from("abc")),
        st.builds(lambda who, v: ("expires", who, v), st.sampled_from([OWNER, STRANGER]),
                  st.one_of(st.none(), st.integers(86_400, 365 * 86_400))),
        st.builds(lambda who: ("revoke", who, None), st.sampled_from([OWNER, STRANGER])),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_folding_the_log_equals_the_incremental_state(script: list[tuple[str, str, object]]) -> None:
    state = created(name="a")
    log = [(1, T0, state.created)]
    for step, (what, who, value) in enumerate(script, start=1):
        now = T0 + dt.timedelta(seconds=step)
        if what == "revoke":
            command: domain.Command = RevokeKey(actor_id=who, now=now, key_id="k1")
        else:
            field = {"enabled": "enabled", "name": "name", "expires": "expires_in"}[what]
            command = UpdateKey(actor_id=who, now=now, key_id="k1", **{field: value})
        try:
            events = decide(command, state)
        except KeyNotFound:
            assert who == STRANGER or state.revoked
            continue
        assert who == OWNER and not state.revoked
        for event in events:
            version = state.version + 1
            state = evolve(state, event, key_id="k1", version=version, at=now)
            log.append((version, now, event))
    assert fold(log, "k1") == state
    assert [v for v, _, _ in log] == list(range(1, len(log) + 1))
    assert sum(isinstance(e, ApiKeyRevoked) for _, _, e in log) <= 1
    # enabled flips are recorded only when they flip
    flips = [e for _, _, e in log if isinstance(e, (ApiKeyDisabled, ApiKeyEnabled))]
    assert all(type(a) is not type(b) for a, b in zip(flips, flips[1:]))


def test_event_encodings_round_trip_and_carry_no_tag_in_data() -> None:
    event = ApiKeyUpdated(key_hash="h", name="n", expires_at=None)
    data = encode_data(event)
    assert b'"type"' not in data and b'"metadata"' not in data  # unset fields are not written
    assert decode_data("ApiKeyUpdated", data) == event
    recorded = RecordedEvent(id="00000000-0000-0000-0000-000000000001", stream_id="k1", version=3, position=9,
                             recorded_at=T0, metadata={"userId": "u"}, event=event)
    assert decode_envelope(encode_envelope(recorded)) == recorded
    # An event stored before a field existed still decodes: new fields have defaults.
    old = decode_data("ApiKeyCreated", b'{"keyHash": "h", "referenceId": "u"}')
    assert isinstance(old, ApiKeyCreated) and old.config_id == "default" and old.enabled is True


def test_rotation_supersedes_the_secret_with_its_own_deadline_and_retires_it_once_due() -> None:
    state = created()
    with pytest.raises(KeyNotFound):
        decide(domain.RotateKey(actor_id=STRANGER, now=T0, key_id="k1", key_hash="n" * 43, start="n"), state)
    with pytest.raises(domain.GracePeriodOutOfRange):
        decide(domain.RotateKey(actor_id=OWNER, now=T0, key_id="k1", key_hash="n" * 43, start="n",
                                grace_seconds=domain.MAX_GRACE_PERIOD + 1), state)
    for version, (new_hash, grace) in enumerate((("m" * 43, 60), ("n" * 43, 0), ("o" * 43, 30)), start=2):
        (event,) = decide(domain.RotateKey(actor_id=OWNER, now=T0, key_id="k1", key_hash=new_hash, start=new_hash[:6],
                                           grace_seconds=grace), state)
        assert event.previous_key_hash == state.key_hash
        assert event.grace_until == (T0 + dt.timedelta(seconds=grace) if grace else None)
        state = evolve(state, event, key_id="k1", version=version, at=T0)
    assert state.key_hash == "o" * 43 and state.start == "oooooo"
    # The first secret (60 s) and the third's predecessor (30 s) are in grace; the one rotated without grace is not.
    assert state.superseded == (("h" * 43, T0 + dt.timedelta(seconds=60)), ("n" * 43, T0 + dt.timedelta(seconds=30)))

    retire = domain.RetireSecret(actor_id="system", now=T0 + dt.timedelta(seconds=45), key_id="k1", key_hash="h" * 43)
    assert decide(retire, state) == []  # its grace has not ended
    late = domain.RetireSecret(actor_id="system", now=T0 + dt.timedelta(seconds=61), key_id="k1", key_hash="h" * 43)
    (retired,) = decide(late, state)
    state = evolve(state, retired, key_id="k1", version=5, at=T0)
    assert state.superseded == (("n" * 43, T0 + dt.timedelta(seconds=30)),) and decide(late, state) == []

    disabled = evolve(state, ApiKeyDisabled(key_hash=state.key_hash), key_id="k1", version=6, at=T0)
    with pytest.raises(domain.KeyDisabled):
        decide(domain.RotateKey(actor_id=OWNER, now=T0, key_id="k1", key_hash="p" * 43, start="p"), disabled)
    expiring = created(expires_in=86_400)
    with pytest.raises(domain.KeyExpired):
        decide(domain.RotateKey(actor_id=OWNER, now=T0 + dt.timedelta(days=2), key_id="k1", key_hash="p" * 43,
                                start="p"), expiring)
