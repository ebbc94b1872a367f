"""Property: key rotation never breaks a valid token for a gateway that honours the JWKS Cache-Control.

Simulated time, no database and no RSA work: the rotation planner (issuer.keys.policy) and the state
functions (issuer.keys.records) are pure, so any sequence of operations can be replayed against them. At every
step a gateway fetches the JWKS and the issuer signs a token; then, at every later instant, every token
that has not expired (plus leeway) must find its kid in every JWKS fetch whose advertised max-age has not
run out. The only exemptions are the ones the contract accepts: tokens signed by a revoked key, and
tokens signed by a key that an emergency revocation had to activate before caches could know it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from issuer.keys.manager import KeyManager
from issuer.keys.policy import KeyPlan, RotationRefused, plan_revocation, plan_rotation, rotation_due
from issuer.keys.records import KeyRecord, KeyState, key_state, published_kids, signing_record
from issuer.settings import Settings

SETTINGS = Settings(
    access_token_ttl=900,
    refresh_token_ttl=86400,
    session_max_age=86400,
    clock_leeway=5,
    jwks_max_age=300,
    key_publish_lead=600,
    key_rotation_interval=3600,
)
GRACE = KeyManager.retire_grace(SETTINGS)
MAX_AGE = timedelta(seconds=KeyManager.jwks_max_age(SETTINGS))
LEAD = timedelta(seconds=SETTINGS.key_publish_lead)
TOKEN_LIFE = timedelta(seconds=SETTINGS.access_token_ttl + SETTINGS.clock_leeway)
START = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Token:
    issued: datetime
    kid: str


@dataclass(frozen=True)
class Fetch:
    at: datetime
    kids: frozenset[str]
    max_age: timedelta


class Simulation:
    def __init__(self, grace: timedelta = GRACE) -> None:
        self.grace = grace
        self.now = START
        self.records: list[KeyRecord] = []
        self.counter = 0
        self.emergency: set[str] = set()
        self.tokens: list[Token] = []
        self.fetches: list[Fetch] = []
        self.apply(plan_rotation([], self.fresh(), now=self.now, lead=LEAD, grace=self.grace, immediate=True))

    def fresh(self) -> KeyRecord:
        self.counter += 1
        kid = f"k{self.counter}"
        return KeyRecord(kid, {"kid": kid}, b"", self.now, self.now, self.now, None, None, 2048)

    def apply(self, plan: KeyPlan) -> None:
        by_kid = {r.kid: r for r in self.records}
        for kid, values in plan.updates.items():
            by_kid[kid] = replace(by_kid[kid], **values)
        if plan.insert is not None:
            by_kid[plan.insert.kid] = plan.insert
        self.records = sorted(by_kid.values(), key=lambda r: r.generation)
        generations = [r.generation for r in self.records]
        assert len(generations) == len(set(generations))

    def rotate(self) -> None:
        # With one rotation already waiting the planner refuses a second, which is the safe answer.
        with contextlib.suppress(RotationRefused):
            self.apply(
                plan_rotation(self.records, self.fresh(), now=self.now, lead=LEAD, grace=self.grace, immediate=False)
            )

    def scheduled(self) -> None:
        interval = timedelta(seconds=SETTINGS.key_rotation_interval)
        if rotation_due(self.records, now=self.now, interval=interval, grace=self.grace):
            self.apply(
                plan_rotation(self.records, self.fresh(), now=self.now, lead=LEAD, grace=self.grace, immediate=False)
            )

    def revoke_signer(self) -> None:
        signer = signing_record(self.records, self.now, self.grace)
        assert signer is not None
        plan = plan_revocation(self.records, signer.kid, self.fresh(), now=self.now, grace=self.grace)
        self.apply(plan)
        promoted = [kid for kid, values in plan.updates.items() if "activate_at" in values]
        newcomer = [plan.insert.kid] if plan.insert is not None else []
        for kid in promoted + newcomer:
            record = next(r for r in self.records if r.kid == kid)
            if self.now - record.publish_at < MAX_AGE:
                self.emergency.add(kid)

    def observe(self) -> None:
        """A gateway fetches the JWKS and the issuer signs a token, both at ``now``."""
        self.fetches.append(Fetch(self.now, published_kids(self.records, self.now, self.grace), MAX_AGE))
        signer = signing_record(self.records, self.now, self.grace)
        assert signer is not None, "the issuer must always have a key to sign with"
        self.tokens.append(Token(self.now, signer.kid))

    def check(self) -> None:
        t = self.now
        revoked = {r.kid for r in self.records if key_state(r, t, self.grace) is KeyState.REVOKED}
        # RFC 9111: a response is fresh while its age is below max-age.
        fresh_fetches = [f for f in self.fetches if f.at <= t < f.at + f.max_age]
        for token in self.tokens:
            if not (token.issued <= t < token.issued + TOKEN_LIFE):
                continue
            if token.kid in revoked or token.kid in self.emergency:
                continue
            for fetch in fresh_fetches:
                assert token.kid in fetch.kids, (
                    f"token signed at {token.issued - START} by {token.kid} is valid at {t - START} but the JWKS "
                    f"fetched at {fetch.at - START} (fresh until {fetch.at + fetch.max_age - START}) lacks it"
                )
        # The issuer itself accepts exactly what its current JWKS holds: revoked keys nowhere.
        assert not (published_kids(self.records, t, self.grace) & revoked)


operation = st.one_of(
    st.tuples(st.just("advance"), st.integers(min_value=0, max_value=4000)),
    st.tuples(st.just("rotate"), st.just(0)),
    st.tuples(st.just("scheduled"), st.just(0)),
    st.tuples(st.just("revoke"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, min_size=1, max_size=40))
def test_rotation_never_breaks_a_valid_token_for_a_caching_gateway(ops: list[tuple[str, int]]) -> None:
    sim = Simulation()
    sim.observe()
    for name, amount in ops:
        if name == "advance":
            # Walk in steps no longer than the smallest window, so no instant of interest is skipped.
            remaining = amount
            while remaining > 0:
                step = min(remaining, 60)
                sim.now += timedelta(seconds=step)
                remaining -= step
                sim.observe()
                sim.check()
        elif name == "rotate":
            sim.rotate()
        elif name == "scheduled":
            sim.scheduled()
        else:
            sim.revoke_signer()
        sim.observe()
        sim.check()


def test_the_simulation_can_fail() -> None:
    """Sanity: activating a rotated key without the lead is caught by the same check."""
    sim = Simulation()
    sim.observe()
    sim.apply(plan_rotation(sim.records, sim.fresh(), now=sim.now, lead=LEAD, grace=GRACE, immediate=True))
    sim.now += timedelta(seconds=1)
    sim.observe()
    try:
        sim.check()
    except AssertionError:
        return
    raise AssertionError("an immediate rotation must break a cached JWKS, or the check is blind")


def test_removing_the_retirement_window_is_caught() -> None:
    """Sanity: if an old key left the JWKS the moment it stopped signing, the check would fail."""
    sim = Simulation()
    sim.observe()
    sim.rotate()
    sim.now += LEAD + timedelta(seconds=1)
    sim.observe()
    sim.grace = timedelta(0)
    sim.fetches.append(Fetch(sim.now, published_kids(sim.records, sim.now, sim.grace), MAX_AGE))
    try:
        sim.check()
    except AssertionError:
        return
    raise AssertionError("a JWKS without the retiring key must fail the check")
