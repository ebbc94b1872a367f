"""The soak's checks on hand-made records: each one fails on the violation it exists to catch (so a green
soak means the property held, not that the check could not see it), and passes on the same records without
the violation."""

from __future__ import annotations

from soak import checks
from soak.checks import Facts, Window
from soak.load import Record

T = 1_000_000.0  # an arbitrary epoch second; only differences matter


def rec(kind: str, at: float, status: int | None = 200, **fields: object) -> Record:
    record = Record(kind, fields.pop("user", "u1"), T + at, T + at + 0.01, status, fields.pop("replica", "r1"))
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_two_successors_of_one_token_fail_the_family_check() -> None:
    racing = [rec("refresh", 1, presented="a", issued="b"), rec("refresh", 1, presented="a", issued="b")]
    assert checks.one_successor_per_token(racing).ok
    forked = [*racing[:1], rec("refresh", 1, presented="a", issued="c")]
    assert not checks.one_successor_per_token(forked).ok


def test_a_refresh_after_its_sessions_revoke_fails() -> None:
    base = [
        rec("login", 0, issued_family="f1", issued_version=0),
        rec("logout", 2, status=204, family="f1"),
        rec("refresh", 3, status=401, family="f1", presented="x"),
    ]
    assert checks.no_token_from_revoked_sessions(base).ok
    leaked = [*base, rec("refresh", 4, family="f1", presented="x", issued="y", issued_version=0)]
    assert not checks.no_token_from_revoked_sessions(leaked).ok


def test_an_old_version_accepted_after_logout_all_fails() -> None:
    base = [
        rec("login", 0, issued_family="f1", issued_version=0),
        rec("logout_all", 2, status=204, presented_version=0, family="f1"),
        rec("refresh", 3, status=401, family="f1", presented="x"),
        rec("me", 3, status=401, presented_version=0),
    ]
    assert checks.no_token_from_revoked_sessions(base).ok
    assert not checks.no_token_from_revoked_sessions([*base, rec("me", 4, presented_version=0)]).ok


def test_a_revoked_keys_token_accepted_after_one_second_fails() -> None:
    facts = Facts(started=T, revoked_kid="k2", revoked_at=T + 10)
    base = [rec("probe", 10.5, presented_kid="k2"), rec("probe", 11.2, status=401, presented_kid="k2")]
    assert checks.revoked_key_refused(base, facts).ok
    assert not checks.revoked_key_refused([*base, rec("probe", 11.3, presented_kid="k2")], facts).ok
    signed = [rec("refresh", 10.2, issued_kid="k2")]
    assert checks.revoked_key_not_signing(signed, facts).ok
    assert not checks.revoked_key_not_signing([*signed, rec("login", 11.5, issued_kid="k2")], facts).ok


def test_an_unknown_key_refusal_after_a_rotation_fails() -> None:
    facts = Facts(started=T, rotated_kid="k2")
    base = [rec("me", 5, presented_kid="k2")]
    assert checks.rotation_seamless(base, facts).ok
    unknown = rec(
        "me", 5, status=401, presented_kid="k2", description="The access token is signed with an unknown key."
    )
    assert not checks.rotation_seamless([*base, unknown], facts).ok


def test_failures_outside_or_of_the_wrong_kind_inside_a_fault_window_fail() -> None:
    facts = Facts(started=T, windows=[Window("kill", T + 10, T + 12)])
    contract = rec("refresh", 11, status=503, contract_error=True)
    assert checks.no_5xx_outside_faults([rec("me", 1), contract], facts).ok
    assert checks.only_contract_503_in_faults([contract], facts).ok
    assert not checks.no_5xx_outside_faults([rec("me", 1, status=503, contract_error=True)], facts).ok
    assert not checks.no_5xx_outside_faults([rec("me", 1, status=None, error="ReadError")], facts).ok
    assert not checks.only_contract_503_in_faults([contract, rec("me", 11, status=502)], facts).ok
    assert not checks.only_contract_503_in_faults([rec("me", 11, status=None, error="RemoteProtocolError")], facts).ok


def test_a_bucket_or_a_lock_that_lets_too_many_through_fails() -> None:
    facts = Facts(started=T, rate_limit_per_minute=60, lockout_threshold=5)
    burst = [rec("attack_ip", i * 0.01, status=401, replica=f"r{i % 3}") for i in range(60)]
    refused = [rec("attack_ip", 1, status=429, replica="r1") for _ in range(10)]
    assert checks.ip_limit_across_replicas([*burst, *refused], facts).ok  # 60 + 1 s of refill (1)
    extra = [rec("attack_ip", 1, status=401, replica="r2") for _ in range(2)]
    assert not checks.ip_limit_across_replicas([*burst, *extra, *refused[2:]], facts).ok

    guesses = [rec("attack_lockout", 0, status=401, replica=f"r{i % 3}", user=f"g{i}") for i in range(5)]
    locked = [rec("attack_lockout", 0, status=429, replica="r2", user=f"g{i}") for i in range(5, 16)]
    assert checks.lockout_across_replicas([*guesses, *locked], facts).ok
    assert not checks.lockout_across_replicas([*guesses, rec("attack_lockout", 0, status=401), *locked[1:]], facts).ok
