"""The soak's checks, each computed from the clients' records (``soak.load.Record``) and the database, never
assumed from the schedule. Each gives a row of the report: what was checked, whether it held, what was seen.

Times: the records carry epoch seconds taken by the client around each request; the key revocation's time
is its ``revoked_at`` as the CLI wrote it inside the revoking transaction (so a little before its commit:
the 1 s bound is measured from a moment no later than the commit).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from soak.load import Record

BEARER_KINDS = {"me", "delete_session", "logout_all", "probe"}
TOKEN_KINDS = {"login", "refresh"}
KEY_BOUND = 1.0  # seconds after a key's revocation within which its tokens may still pass (the bound)


@dataclass(frozen=True)
class Window:
    """A fault, from its first action to the moment the cluster served normally again (plus the slack
    stated in the report)."""

    name: str
    start: float
    end: float

    def holds(self, record: Record) -> bool:
        return self.start <= record.received and record.sent <= self.end


@dataclass
class Facts:
    """What the run did, as the orchestrator observed it."""

    started: float
    rotated_kid: str | None = None
    rotated_at: float | None = None
    revoked_kid: str | None = None
    revoked_at: float | None = None
    windows: list[Window] = field(default_factory=list)
    rate_limit_per_minute: int = 0
    lockout_threshold: int = 0


@dataclass(frozen=True)
class Row:
    check: str
    ok: bool
    observed: str
    # Judged against a bound on wall-clock time (the 1 s, fault windows, the bucket's refill): make soak
    # enforces it; the short soak in make test reports it (tests never assert on wall-clock time).
    timed: bool = False


def check_all(records: list[Record], facts: Facts, database: DatabaseFacts) -> list[Row]:
    return [
        one_successor_per_token(records),
        database.overlapping_live_tokens,
        no_token_from_revoked_sessions(records),
        database.tokens_after_revoke,
        revoked_key_refused(records, facts),
        revoked_key_not_signing(records, facts),
        rotation_seamless(records, facts),
        no_5xx_outside_faults(records, facts),
        only_contract_503_in_faults(records, facts),
        no_live_session_refused(records, facts),
        ip_limit_across_replicas(records, facts),
        lockout_across_replicas(records, facts),
    ]


# ------------------------------------------------------------ refresh-token families


def one_successor_per_token(records: Iterable[Record]) -> Row:
    """A family holds two live tokens exactly when one token got two different successors."""
    successors: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.kind == "refresh" and r.status == 200 and r.presented and r.issued:
            successors[r.presented].add(r.issued)
    by_parent = Counter(r.presented for r in records if r.kind == "refresh" and r.status == 200 and r.presented)
    racing = sum(1 for count in by_parent.values() if count > 1)
    forks = sum(1 for issued in successors.values() if len(issued) > 1)
    return Row(
        "no family had two live tokens (records: one successor per token)",
        forks == 0 and bool(successors),
        f"{len(successors)} tokens rotated, {racing} by both tabs, {forks} with two successors",
    )


@dataclass
class DatabaseFacts:
    overlapping_live_tokens: Row
    tokens_after_revoke: Row


async def database_facts(url: str) -> DatabaseFacts:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT family_id, issued_at, consumed_at FROM refresh_tokens ORDER BY family_id, issued_at, token_hash"
        )
        late = await conn.fetchval(
            "SELECT count(*) FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id "
            "WHERE f.revoked_at IS NOT NULL AND t.issued_at > f.revoked_at"
        )
        revoked = await conn.fetchval("SELECT count(*) FROM refresh_families WHERE revoked_at IS NOT NULL")
    finally:
        await conn.close()
    families: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        families[row["family_id"]].append(row)
    overlapping = 0
    for tokens in families.values():
        # Each token's life is [issued_at, consumed_at); in a family they must follow one another.
        live_at_end = sum(1 for t in tokens if t["consumed_at"] is None)
        chained = all(
            a["consumed_at"] is not None and a["consumed_at"] <= b["issued_at"] for a, b in itertools.pairwise(tokens)
        )
        overlapping += live_at_end > 1 or not chained
    return DatabaseFacts(
        Row(
            "no family had two live tokens (database: token lifetimes never overlap)",
            overlapping == 0 and bool(families),
            f"{len(families)} families, {len(rows)} tokens, {overlapping} with overlapping lifetimes",
        ),
        Row(
            "no revoked session yielded a token (database: none issued after its family's revoke)",
            late == 0 and revoked > 0,
            f"{revoked} families revoked, {late} tokens issued after the revoke",
        ),
    )


def _revocations(records: list[Record]) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """From the records: each family's revoke time (the revoking answer's arrival), and each logout-all
    as (user, time, the version it made current)."""
    revoked: dict[str, float] = {}
    logins: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in records:
        if r.kind == "login" and r.status == 200 and r.issued_family:
            logins[r.user].append((r.received, r.issued_family))
    versions: list[tuple[str, float, int]] = []
    for r in sorted(records, key=lambda r: r.received):
        if r.kind in ("logout", "delete_session") and r.status == 204 and r.family:
            revoked.setdefault(r.family, r.received)
        if r.kind == "logout_all" and r.status == 204 and r.presented_version is not None:
            versions.append((r.user, r.received, r.presented_version + 1))
            for at, family in logins[r.user]:
                if at < r.sent:
                    revoked.setdefault(family, r.received)
    return revoked, versions


def no_token_from_revoked_sessions(records: list[Record]) -> Row:
    revoked, versions = _revocations(records)
    leaks = [
        r
        for r in records
        if r.kind == "refresh" and r.status == 200 and r.family in revoked and r.sent > revoked[r.family]
    ]
    tried = sum(1 for r in records if r.kind == "refresh" and r.family in revoked and r.sent > revoked[r.family])
    stale = 0
    for user, at, version in versions:
        for r in records:
            if r.user != user or r.sent <= at:
                continue
            if r.kind in TOKEN_KINDS and r.status == 200 and (r.issued_version or 0) < version:
                leaks.append(r)
            if r.kind in BEARER_KINDS and r.presented_version is not None and r.presented_version < version:
                stale += 1
                if r.status is not None and 200 <= r.status < 300:
                    leaks.append(r)
    return Row(
        "no revoked session or version yielded a token or was accepted again (records)",
        not leaks and tried > 0,
        f"{len(revoked)} sessions revoked ({len(versions)} logout-all); {tried} refreshes and {stale} Bearer "
        f"calls with them afterwards; {len(leaks)} succeeded",
    )


def no_live_session_refused(records: list[Record], facts: Facts) -> Row:
    """The other side: a refresh of a session nobody revoked is never refused."""
    revoked, _ = _revocations(records)
    refused = [
        r
        for r in records
        if r.kind == "refresh" and r.status == 401 and (r.family not in revoked or r.sent < revoked[r.family])
    ]
    total = sum(1 for r in records if r.kind == "refresh")
    return Row(
        "no refresh of a live session was refused",
        not refused,
        f"{total} refresh requests, {len(refused)} refused while their session was live",
    )


# ------------------------------------------------------------ signing keys


def revoked_key_refused(records: list[Record], facts: Facts) -> Row:
    kid, at = facts.revoked_kid, facts.revoked_at
    if kid is None or at is None:
        return Row("tokens of a revoked key refused within 1 s", False, "no key was revoked")
    presented = [r for r in records if r.kind in BEARER_KINDS and r.presented_kid == kid and r.status is not None]
    accepted = [r for r in presented if 200 <= r.status < 300 and r.sent > at]  # type: ignore[operator]
    late = [r for r in accepted if r.sent > at + KEY_BOUND]
    after = [r for r in presented if r.sent > at + KEY_BOUND]
    last = max((r.received - at for r in accepted), default=None)
    seen = "none accepted after the revoke" if last is None else f"last accepted {last * 1000:.0f} ms after it"
    return Row(
        "tokens of a revoked key refused within 1 s of the revoke",
        not late and bool(after),
        f"{len(presented)} Bearer calls with its tokens, {len(after)} sent > 1 s after the revoke, "
        f"{len(late)} of those accepted; {seen}",
        timed=True,
    )


def revoked_key_not_signing(records: list[Record], facts: Facts) -> Row:
    kid, at = facts.revoked_kid, facts.revoked_at
    if kid is None or at is None:
        return Row("no replica signed with a revoked key 1 s after the revoke", False, "no key was revoked")
    signed = [r for r in records if r.kind in TOKEN_KINDS and r.status == 200 and r.issued_kid == kid]
    late = [r for r in signed if r.sent > at + KEY_BOUND]
    last = max((r.received - at for r in signed), default=None)
    if last is None or last < 0:
        seen = "; none answered after the revoke"
    else:
        seen = f"; the last one answered {last * 1000:.0f} ms after the revoke"
    return Row(
        "no replica signed with a revoked key 1 s after the revoke",
        not late,
        f"{len(signed)} tokens signed with it in the run, {len(late)} requested > 1 s after the revoke{seen}",
        timed=True,
    )


def rotation_seamless(records: list[Record], facts: Facts) -> Row:
    """After ``keys rotate --now`` no replica refuses a token for naming a key it has not loaded yet."""
    unknown = [
        r
        for r in records
        if r.kind in BEARER_KINDS
        and r.status == 401
        and r.presented_kid != facts.revoked_kid
        and "unknown key" in (r.description or "")
    ]
    fresh = sum(1 for r in records if r.kind in BEARER_KINDS and r.presented_kid == facts.rotated_kid)
    return Row(
        "a rotated key's tokens accepted by every replica at once",
        facts.rotated_kid is not None and fresh > 0 and not unknown,
        f"{fresh} Bearer calls with the new key's tokens; {len(unknown)} refused as an unknown key",
    )


# ------------------------------------------------------------ faults


def _in_window(record: Record, windows: list[Window]) -> Window | None:
    return next((w for w in windows if w.holds(record)), None)


def _failed(record: Record) -> bool:
    return record.status is None or record.status >= 500


def no_5xx_outside_faults(records: list[Record], facts: Facts) -> Row:
    outside = [r for r in records if _in_window(r, facts.windows) is None]
    failed = [r for r in outside if _failed(r)]
    kinds = Counter(f"{r.status or r.error}" for r in failed)
    return Row(
        "zero 5xx (or broken connections) outside the fault windows",
        not failed,
        f"{len(outside)} requests outside the windows, {len(failed)} failed" + (f" ({dict(kinds)})" if kinds else ""),
        timed=True,
    )


def only_contract_503_in_faults(records: list[Record], facts: Facts) -> Row:
    parts = []
    wrong: list[Record] = []
    for window in facts.windows:
        inside = [r for r in records if window.holds(r)]
        failed = [r for r in inside if _failed(r)]
        bad = [r for r in failed if not (r.status == 503 and r.contract_error)]
        wrong += bad
        parts.append(
            f"{window.name} ({window.end - window.start:.1f} s): {len(inside)} requests, "
            f"{len(failed) - len(bad)} contract 503s, {len(bad)} other failures"
        )
    kinds = Counter(f"{r.status or r.error}" for r in wrong)
    return Row(
        "within the fault windows only the contract's 503",
        not wrong and bool(facts.windows),
        "; ".join(parts) + (f" ({dict(kinds)})" if kinds else ""),
        timed=True,
    )


# ------------------------------------------------------------ throttles


def ip_limit_across_replicas(records: list[Record], facts: Facts) -> Row:
    """One address's logins over every replica: the shared bucket lets through at most its capacity plus
    what it refilled between the first and the last take (each take happens between its request's sending
    and its answer's arrival, so that span bounds it)."""
    burst = [r for r in records if r.kind == "attack_ip" and r.status is not None]
    if not burst:
        return Row("per-IP limit held across replicas", False, "no burst was sent")
    span = max(r.received for r in burst) - min(r.sent for r in burst)
    capacity = facts.rate_limit_per_minute
    bound = math.floor(capacity + capacity / 60.0 * span)
    allowed = sum(1 for r in burst if r.status != 429)
    replicas = {r.replica for r in burst}
    return Row(
        "per-IP limit held across replicas",
        allowed <= bound and len(replicas) > 1 and allowed < len(burst),
        f"{len(burst)} logins from one address over {len(replicas)} replicas in {span:.1f} s: {allowed} let "
        f"through (bound {bound} = {capacity} + refill), {len(burst) - allowed} got 429",
        timed=True,
    )


def lockout_across_replicas(records: list[Record], facts: Facts) -> Row:
    """Parallel wrong passwords for one account from many addresses over every replica: at most the
    threshold of them are checked, plus one per lock that can have expired during the burst (1 s, 2 s, ...)."""
    burst = [r for r in records if r.kind == "attack_lockout" and r.status is not None]
    if not burst:
        return Row("account lock-out held across replicas", False, "no burst was sent")
    span = max(r.received for r in burst) - min(r.sent for r in burst)
    bound = facts.lockout_threshold + math.floor(math.log2(span + 1))
    checked = sum(1 for r in burst if r.status == 401)
    locked = sum(1 for r in burst if r.status == 429)
    replicas = {r.replica for r in burst}
    return Row(
        "account lock-out held across replicas",
        checked <= bound and locked > 0 and len(replicas) > 1 and checked + locked == len(burst),
        f"{len(burst)} wrong passwords from {len({r.user for r in burst})} addresses over {len(replicas)} "
        f"replicas in {span:.1f} s: {checked} checked (bound {bound}), {locked} got 429",
    )
