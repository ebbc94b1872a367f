"""The revocation state on its own: what each kind of entry refuses, how long it is kept, merging in any order,
subsumption, and the memory bound (100,000 events). Pure: time is a number passed in."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from issuer.verifier.revocations import (
    AccountPurged,
    Revocation,
    RevocationState,
    SessionRevoked,
    TokenVersionRaised,
)

T = 1_800_000_000.0  # the issuer's time of the events
LIFETIME, LEEWAY, MARGIN = 900.0, 5.0, 60.0
RETENTION = LIFETIME + LEEWAY + MARGIN


def state(**options: float) -> RevocationState:
    return RevocationState(retention=RETENTION, margin=MARGIN, **options)  # type: ignore[arg-type]


def refusal(
    s: RevocationState, *, sub: str = "u1", sid: str | None = "s1", version: int | None = 0, iat: float = T - 1,
    now: float = T + 1,
) -> str | None:  # fmt: skip
    return s.refusal(sub=sub, sid=sid, token_version=version, iat=iat, now=now)


def test_a_revoked_session_refuses_that_sid_only() -> None:
    s = state()
    assert s.apply(SessionRevoked("u1", "s1", T), now=T)
    assert refusal(s, sid="s1") == "session_revoked"
    assert refusal(s, sid="s2") is None
    assert refusal(s, sid=None) is None
    # Another user's token with that sid (session ids are the issuer's, unique): refused all the same.
    assert refusal(s, sub="u2", sid="s1") == "session_revoked"


def test_a_token_version_refuses_lower_versions_of_that_user_only() -> None:
    s = state()
    s.apply(TokenVersionRaised("u1", 3, T), now=T)
    assert refusal(s, version=2) == "token_version"
    assert refusal(s, version=0) == "token_version"
    assert refusal(s, version=3) is None
    assert refusal(s, version=4) is None
    assert refusal(s, version=None) == "token_version"  # a token that cannot show its version
    assert refusal(s, sub="u2", version=0) is None


def test_a_purged_account_refuses_every_token_of_the_user() -> None:
    s = state()
    s.apply(AccountPurged("u1", T), now=T)
    for sid, version in [("s1", 0), ("s9", 99), (None, None)]:
        assert refusal(s, sid=sid, version=version) == "account_purged"
    assert refusal(s, sub="u2") is None


@pytest.mark.parametrize(
    "event",
    [SessionRevoked("u1", "s1", T), TokenVersionRaised("u1", 1, T), AccountPurged("u1", T)],
    ids=["session", "version", "purge"],
)
def test_an_entry_lasts_exactly_as_long_as_a_token_it_refuses_can_be_valid(event: Revocation) -> None:
    """The newest token the event can affect was issued at T, expires at T + lifetime, and is accepted until
    exp + leeway: the entry must still hold then, and may go once the margin has passed too."""
    s = state()
    s.apply(event, now=T)
    last_acceptable_moment = T + LIFETIME + LEEWAY
    assert refusal(s, now=last_acceptable_moment) is not None
    assert refusal(s, now=T + RETENTION - 0.001) is not None
    assert refusal(s, now=T + RETENTION) is None
    assert len(s) == 1
    assert s.expire(T + RETENTION - 0.001) == 0
    assert s.expire(T + RETENTION) == 1
    assert len(s) == 0


def test_an_event_too_old_to_matter_is_not_stored() -> None:
    s = state()
    assert not s.apply(SessionRevoked("u1", "s1", T), now=T + RETENTION)
    assert len(s) == 0


def test_reapplying_changes_nothing() -> None:
    s = state()
    events: list[Revocation] = [SessionRevoked("u1", "s1", T), TokenVersionRaised("u2", 2, T), AccountPurged("u3", T)]
    for event in events:
        assert s.apply(event, now=T)
    before = s.snapshot()
    for event in events:
        assert not s.apply(event, now=T + 1)
    assert s.snapshot() == before


def test_versions_merge_by_maximum_and_never_go_down() -> None:
    s = state()
    s.apply(TokenVersionRaised("u1", 5, T), now=T)
    assert not s.apply(TokenVersionRaised("u1", 2, T - 10), now=T)  # an older, lower one changes nothing
    assert refusal(s, version=4) == "token_version"
    s.apply(TokenVersionRaised("u1", 2, T + 100), now=T)  # a lower version cannot un-revoke; it may extend
    assert refusal(s, version=4, now=T + RETENTION + 50) == "token_version"


def test_a_purge_subsumes_the_users_session_entries() -> None:
    s = state()
    for i in range(50):
        s.apply(SessionRevoked("u1", f"s{i}", T - i), now=T)
    s.apply(SessionRevoked("u2", "other", T), now=T)
    s.apply(TokenVersionRaised("u1", 3, T), now=T)
    s.apply(AccountPurged("u1", T + 1), now=T + 1)
    assert s.sizes() == {"sessions": 1, "versions": 1, "purged": 1}
    assert refusal(s, sid="s7") == "account_purged"
    assert refusal(s, sub="u2", sid="other") == "session_revoked"
    # Sessions revoked later than the purge are not subsumed (they could not exist, but nothing is assumed).
    assert not s.apply(SessionRevoked("u1", "late", T), now=T + 2)


def test_a_version_subsumes_sessions_revoked_well_before_it_only() -> None:
    s = state()
    s.apply(SessionRevoked("u1", "old", T - MARGIN - 1), now=T)
    s.apply(SessionRevoked("u1", "recent", T - MARGIN + 1), now=T)
    s.apply(TokenVersionRaised("u1", 4, T), now=T)
    assert s.sizes()["sessions"] == 1
    # The session revoked just before (or, on a replica with a slow clock, just after) the logout-all stays:
    # its tokens may carry the new version.
    assert refusal(s, sid="recent", version=4) == "session_revoked"
    # The subsumed one is still refused through the version.
    assert refusal(s, sid="old", version=3) == "token_version"


def test_lookups_ignore_entries_past_their_time_even_before_expire_runs() -> None:
    s = state()
    s.apply(SessionRevoked("u1", "s1", T), now=T)
    assert refusal(s, now=T + RETENTION + 1) is None
    assert len(s) == 1


# ---------------------------------------------------------------- order independence

_users = st.sampled_from(["u1", "u2", "u3"])
_times = st.integers(min_value=0, max_value=3 * int(RETENTION)).map(lambda d: T + d)
# Session ids are unique across users at the issuer (they are family ids): "u1-s2" belongs to u1 only.
_sessions = st.builds(lambda user, n, at: SessionRevoked(user, f"{user}-s{n}", at), _users, st.integers(1, 3), _times)
_events = st.one_of(
    _sessions,
    st.builds(TokenVersionRaised, _users, st.integers(0, 5), _times),
    st.builds(AccountPurged, _users, _times),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events, max_size=12), seed=st.integers(), now=_times)
def test_any_order_and_any_repetition_gives_the_same_state(events: list[Revocation], seed: int, now: float) -> None:
    shuffled = events + random.Random(seed).sample(events, len(events))  # every event once more, in another order
    random.Random(seed + 1).shuffle(shuffled)
    a, b = state(), state()
    for event in events:
        a.apply(event, now=T)
    for event in shuffled:
        b.apply(event, now=T)
    assert a.snapshot() == b.snapshot()
    a.expire(now)
    b.expire(now)
    assert a.snapshot() == b.snapshot()


_no_versions = st.one_of(
    _sessions,
    st.builds(AccountPurged, _users, _times),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_no_versions, min_size=1, max_size=10), now=_times)
def test_subsumption_never_refuses_less_than_each_event_alone(events: list[Revocation], now: float) -> None:
    """Whatever one session or purge event refuses on its own, the merged state refuses too. (Version entries
    subsume sessions on the issuer's guarantee that a session's tokens predate a later logout-all's version;
    test_a_version_subsumes_sessions_revoked_well_before_it_only covers them.)"""
    merged = state()
    for event in events:
        merged.apply(event, now=T)
    for event in events:
        alone = state()
        alone.apply(event, now=T)
        for sub, n in itertools.product(["u1", "u2", "u3"], [1, 2, 3]):
            sid = f"{sub}-s{n}"
            if alone.refusal(sub=sub, sid=sid, token_version=0, iat=T, now=now) is not None:
                assert merged.refusal(sub=sub, sid=sid, token_version=0, iat=T, now=now) is not None, (event, sub, sid)


# ---------------------------------------------------------------- memory


def test_a_flood_of_100000_events_stays_under_the_cap_and_fails_closed_for_the_evicted() -> None:
    cap = 10_000
    s = state(max_entries=cap)
    for i in range(100_000):
        at = T + i / 100  # a thousand seconds of events, a hundred a second
        event: Revocation = (
            SessionRevoked(f"user{i}", f"sid{i}", at) if i % 3 else TokenVersionRaised(f"user{i}", 1, at)
        )
        s.apply(event, now=T)
        assert len(s) <= cap
    assert len(s) == cap
    assert len(s._heap) <= 2 * cap + 1024  # the expiry heap is bounded with the entries
    assert s.evictions == 100_000 - cap
    # The newest events are kept exactly; every token issued before the oldest kept one is refused instead.
    assert refusal(s, sub="user99998", sid="sid99998", iat=T + 999) == "session_revoked"
    assert s.floor is not None
    assert refusal(s, sub="someone", sid="x", iat=s.floor) == "evicted"
    assert refusal(s, sub="someone", sid="x", iat=s.floor + 1) is None
    assert refusal(s, sub="user1", sid="sid1", iat=s.floor) == "evicted"  # an evicted revocation: still refused


def test_expiry_empties_the_state_and_its_heap_after_a_flood() -> None:
    s = state()
    for i in range(20_000):
        s.apply(SessionRevoked("u1", f"s{i}", T + i / 20), now=T)
        s.apply(TokenVersionRaised(f"v{i % 100}", i, T + i / 20), now=T)  # extending entries leaves old heap items
    assert len(s._heap) <= 2 * len(s) + 1024
    s.expire(T + 2000 + RETENTION)
    assert len(s) == 0
    assert s._heap == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="retention"):
        RevocationState(retention=0)
    with pytest.raises(ValueError, match="max_entries"):
        RevocationState(retention=10, max_entries=0)
