"""Property: the key ring's memoized published set always equals the un-memoized computation.

``KeyRing._published_kids(now)`` answers from a remembered span ``[since, until)`` while ``now`` stays
inside it. Whatever the keys' timestamps and however ``now`` moves (forward, backward, repeated, landing
exactly on a boundary or a microsecond either side of one), ``verification_key_map(now)`` and
``jwks(now)`` must agree with ``issuer.keys.records.published_kids(records, now, grace)`` on a ring that remembers
nothing. Plain ``random`` with fixed seeds, so every run checks the same cases and a failure reproduces.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from functools import cache

from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from issuer.keys.records import KeyRecord, published_kids
from issuer.keys.ring import KeyRing, LoadedKey

START = datetime(2030, 1, 1, tzinfo=UTC)
HORIZON = 1000  # seconds: key timestamps fall in [START, START + HORIZON], so they collide often
TICK = timedelta(microseconds=1)
SECOND = timedelta(seconds=1)


@cache
def private_keys() -> tuple[rsa.RSAPrivateKey, ...]:
    """Two RSA keys shared by every record; each record gets its own RSAKey object (the ring maps by kid)."""
    return tuple(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))


def record(
    kid: str,
    publish: datetime,
    activate: datetime,
    retire: datetime | None = None,
    revoked: datetime | None = None,
) -> KeyRecord:
    jwk = {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": f"n-{kid}", "e": "AQAB"}
    return KeyRecord(kid, jwk, b"", publish, publish, activate, retire, revoked, 2048)


def ring_of(records: list[KeyRecord], grace: timedelta) -> KeyRing:
    keys = private_keys()
    loaded = tuple(
        LoadedKey(r, RSAKey.import_key(keys[i % len(keys)], {"kid": r.kid, "alg": "RS256"}))
        for i, r in enumerate(records)
    )
    return KeyRing(keys=loaded, retire_grace=grace)


def seconds(rng: random.Random, low: int, high: int) -> timedelta:
    """Whole seconds mostly; sometimes with microseconds, so boundaries are not all on the second."""
    value = timedelta(seconds=rng.randint(low, high))
    return value + timedelta(microseconds=rng.randint(1, 999_999)) if rng.random() < 0.2 else value


def random_records(rng: random.Random) -> list[KeyRecord]:
    records = []
    for i in range(rng.randint(0, 6)):
        publish = START + seconds(rng, 0, HORIZON)
        if rng.random() < 0.1:  # odd rows too: activation before publication
            activate = START + seconds(rng, 0, HORIZON)
        else:
            activate = publish + rng.choice([timedelta(0), seconds(rng, 0, HORIZON // 2)])
        retire = None if rng.random() < 0.3 else activate + rng.choice([timedelta(0), seconds(rng, 0, HORIZON // 2)])
        revoked = None if rng.random() < 0.6 else START + seconds(rng, -10, HORIZON)
        if revoked is not None and rng.random() < 0.3:  # often exactly on another boundary
            revoked = rng.choice([t for t in (publish, activate, retire) if t is not None])
        records.append(record(f"kid-{i}-{rng.getrandbits(32):08x}", publish, activate, retire, revoked))
    return records


def boundaries(records: list[KeyRecord], grace: timedelta) -> list[datetime]:
    moments = []
    for r in records:
        moments += [r.publish_at, r.activate_at]
        if r.retire_at is not None:
            moments += [r.retire_at, r.retire_at + grace]
        if r.revoked_at is not None:
            moments.append(r.revoked_at)
    return moments


def candidate_times(rng: random.Random, records: list[KeyRecord], grace: timedelta) -> list[datetime]:
    times = [START - timedelta(days=3650), START + timedelta(days=3650)]
    for moment in boundaries(records, grace):
        times += [moment, moment - TICK, moment + TICK, moment - SECOND, moment + SECOND]
    times += [START + seconds(rng, -HORIZON // 4, 2 * HORIZON) for _ in range(10)]
    return times


def walk(rng: random.Random, candidates: list[datetime], steps: int) -> list[datetime]:
    """A sequence of ``now``: jumps anywhere, small steps both ways, repeats."""
    now = rng.choice(candidates)
    sequence = [now]
    for _ in range(steps):
        move = rng.random()
        if move < 0.35:
            now = rng.choice(candidates)  # often exactly on a boundary, ahead or behind
        elif move < 0.55:
            now += rng.choice([TICK, SECOND, seconds(rng, 0, 120)])
        elif move < 0.75:
            now -= rng.choice([TICK, SECOND, seconds(rng, 0, 120)])
        elif move < 0.85:
            pass  # the same instant again
        else:
            # Back to an instant seen before (inside an earlier span, or just before it started).
            now = rng.choice(sequence) - rng.choice([timedelta(0), TICK])
        sequence.append(now)
    return sequence


class Tally:
    def __init__(self) -> None:
        self.checks = 0
        self.span_hits = 0
        self.backward_hits = 0
        self.recomputed = 0


def check(ring: KeyRing, records: list[KeyRecord], grace: timedelta, now: datetime, jwks_first: bool) -> None:
    expected = published_kids(records, now, grace)
    by_kid = {k.record.kid: k for k in ring.keys}
    if jwks_first:
        document = ring.jwks(now)
        mapping = ring.verification_key_map(now)
    else:
        mapping = ring.verification_key_map(now)
        document = ring.jwks(now)
    context = (now - START, sorted(expected), sorted(mapping))
    assert set(mapping) == expected, context
    for kid in expected:
        assert mapping[kid] is by_kid[kid].signing_key, context
    assert [key["kid"] for key in json.loads(document.body)["keys"]] == sorted(expected), context
    # A ring that has remembered nothing serves the same bytes and ETag.
    assert document == KeyRing(keys=ring.keys, retire_grace=grace).jwks(now), context


def run_case(seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    records = random_records(rng)
    grace = rng.choice([timedelta(0), TICK, SECOND, timedelta(seconds=30), seconds(rng, 0, HORIZON)])
    ring = ring_of(records, grace)
    previous: datetime | None = None
    for now in walk(rng, candidate_times(rng, records, grace), steps=60):
        span = ring._span
        if span is not None and span.since <= now < span.until:
            tally.span_hits += 1
            if previous is not None and now < previous:
                tally.backward_hits += 1
        else:
            tally.recomputed += 1
        check(ring, records, grace, now, jwks_first=rng.random() < 0.5)
        tally.checks += 1
        previous = now


def test_memoized_published_set_matches_the_plain_computation() -> None:
    tally = Tally()
    for seed in range(600):
        run_case(seed, tally)
    # The walk really exercised both paths, including answers from a span after moving backward.
    assert tally.checks == 600 * 61
    assert tally.span_hits > 5000, vars(tally)
    assert tally.backward_hits > 500, vars(tally)
    assert tally.recomputed > 5000, vars(tally)


def test_each_boundary_forward_and_backward() -> None:
    """One worked example: every kind of boundary, met from both sides, in a deliberately jumbled order."""
    grace = timedelta(seconds=5)
    old = record("old", START, START, retire=START + 20 * SECOND)  # published [0, 25): retiring from 20
    new = record("new", START + 10 * SECOND, START + 20 * SECOND, retire=START + 30 * SECOND)  # [10, 35)
    bad = record("bad", START + 10 * SECOND, START + 21 * SECOND, revoked=START + 23 * SECOND)  # [10, 23)
    records = [old, new, bad]
    ring = ring_of(records, grace)

    def published(seconds_: float) -> set[str]:
        now = START + timedelta(seconds=seconds_)
        check(ring, records, grace, now, jwks_first=False)
        return set(ring.verification_key_map(now))

    everything = {"old", "new", "bad"}
    expected = [
        (0, {"old"}),
        (9.999999, {"old"}),
        (10, everything),
        (19.999999, everything),
        (20, everything),  # old stops signing but stays published
        (22.999999, everything),
        (23, {"old", "new"}),  # revoked: out at once
        (22, everything),  # backward, before the span that started at 23
        (9, {"old"}),
        (23, {"old", "new"}),
        (23.000001, {"old", "new"}),
        (24.999999, {"old", "new"}),
        (22.999999, everything),
        (25, {"new"}),  # old: retired at 20, gone after the 5 s grace
        (30, {"new"}),  # new retires now, still published
        (34.999999, {"new"}),
        (35, set()),
        (29.999999, {"new"}),
        (1e6, set()),
        (-1, set()),
        (10, everything),
    ]
    for seconds_, kids in expected:
        assert published(seconds_) == kids, seconds_
