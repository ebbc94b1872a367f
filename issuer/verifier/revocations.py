"""What the revocation feed has said, kept only while it can still matter. Pure: no I/O, time is passed in.

Three kinds of entry, each about tokens issued *before* the event's time ``T`` (the issuer mints no token for
a revoked session, below a user's new token version, or for a deleted user after ``T``):

- a revoked session ``sid``: refuse tokens carrying that ``sid``;
- a user's minimum token version ``N`` (logout-all): refuse that user's tokens whose ``tokenVersion`` < ``N``;
- a purged user (account deletion): refuse every token of that user.

**How long an entry is kept.** A token the event affects was issued at or before ``T``, so it expires at the
latest at ``T + token_lifetime`` (the issuer's ``ACCESS_TOKEN_TTL``), and the verifier accepts it until its
``exp`` plus its leeway. Both ``T``/``exp`` come from the issuer's clock and are compared with the same local
clock, so an entry kept until ``T + token_lifetime + leeway + margin`` (the *retention*) outlives every token
it could refuse; ``margin`` covers clock differences between issuer replicas (``iat`` from one, ``T`` from
another). After that it is dropped: every token it refused is refused for being expired anyway. The caller
must also refuse tokens that live longer than ``token_lifetime`` (``exp - iat``), or this argument fails.

**Merging is order-independent and idempotent**: versions merge by maximum, expiries by maximum, sessions and
purged users by union. For versions, keeping the largest ``N`` until the latest expiry never refuses a valid
token: a token below ``N`` was minted before the version reached ``N``, so it has expired by then.

**User-level entries subsume that user's older session entries**, which are then dropped: a purge subsumes
every session entry of the user that expires no later; a version ``N`` at ``T`` subsumes sessions revoked
before ``T - margin`` (their tokens were all minted before the version reached ``N``; the margin keeps a
session revoked just after the logout-all, on a replica whose clock is behind, from being dropped).

**Hard cap.** Entries are also bounded in number (``max_entries``). When a new entry would exceed it, the
entry that expires first is evicted and replaced by a *floor*: from then on every token issued at or before
the evicted event's time is refused. That fails closed for a bounded time (those tokens expire within
``token_lifetime``), costs one number, and only affects tokens older than the oldest event still kept;
clients get a 401 and refresh. ``RevocationState.evictions`` counts it: size the cap so it stays zero.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# Which rule refused a token; also the keys of the per-reason counters.
RefusalRule = Literal["session_revoked", "token_version", "account_purged", "evicted"]


@dataclass(frozen=True, slots=True)
class SessionRevoked:
    """One session (refresh-token family) revoked: logout, session delete, reuse detection, RFC 7009."""

    user: str
    sid: str
    at: float


@dataclass(frozen=True, slots=True)
class TokenVersionRaised:
    """Logout-all (or reuse detection revoking the user): tokens below ``version`` are dead."""

    user: str
    version: int
    at: float


@dataclass(frozen=True, slots=True)
class AccountPurged:
    """The account was deleted: every token of ``user`` is dead (user ids are never reused)."""

    user: str
    at: float


Revocation = SessionRevoked | TokenVersionRaised | AccountPurged

_SID, _VERSION, _PURGED = 0, 1, 2


@dataclass(slots=True)
class _Sid:
    user: str
    until: float


@dataclass(slots=True)
class _Version:
    version: int
    until: float


@dataclass
class RevocationState:
    """The merged revocations, each until its token could no longer be valid anyway.

    ``retention`` is ``token_lifetime + leeway + margin`` (see the module docstring); ``margin`` is also the
    clock-skew allowance when a version entry subsumes session entries.
    """

    retention: float
    margin: float = 60.0
    max_entries: int = 100_000
    evictions: int = 0
    # Tokens issued at or before this issuer time are refused (set only by evictions under the cap).
    floor: float | None = None
    _sids: dict[str, _Sid] = field(default_factory=dict, repr=False)
    _sids_by_user: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _versions: dict[str, _Version] = field(default_factory=dict, repr=False)
    _purged: dict[str, float] = field(default_factory=dict, repr=False)
    # (until, kind, key) for expiry and eviction; an item whose entry changed or left is skipped lazily.
    _heap: list[tuple[float, int, str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.retention <= 0 or self.margin < 0 or self.max_entries < 1:
            raise ValueError("need retention > 0, margin >= 0 and max_entries >= 1")

    def __len__(self) -> int:
        return len(self._sids) + len(self._versions) + len(self._purged)

    # ------------------------------------------------------------ merging

    def apply(self, event: Revocation, now: float) -> bool:
        """Merge one event; False when it changed nothing (already known, subsumed, or too old to matter)."""
        until = event.at + self.retention
        if until <= now:
            return False
        if isinstance(event, AccountPurged):
            changed = self._apply_purge(event.user, until)
        elif isinstance(event, TokenVersionRaised):
            changed = self._apply_version(event.user, event.version, until)
        else:
            changed = self._apply_sid(event.user, event.sid, until)
        if changed:
            self._enforce_cap()
        return changed

    def _apply_purge(self, user: str, until: float) -> bool:
        if self._purged.get(user, -1.0) >= until:
            return False
        self._purged[user] = until
        self._push(until, _PURGED, user)
        self._drop_sids(user, lambda sid_until: sid_until <= until)
        return True

    def _apply_version(self, user: str, version: int, until: float) -> bool:
        # Not subsumed by a purge: the two merge differently, and dropping one entry per user is not worth
        # the order dependence it would bring.
        entry = self._versions.get(user)
        if entry is not None and entry.version >= version and entry.until >= until:
            return False
        if entry is None:
            entry = self._versions[user] = _Version(version, until)
            self._push(until, _VERSION, user)
        else:
            entry.version = max(entry.version, version)
            if until > entry.until:
                entry.until = until
                self._push(until, _VERSION, user)
        limit = entry.until - self.margin
        self._drop_sids(user, lambda sid_until: sid_until <= limit)
        return True

    def _apply_sid(self, user: str, sid: str, until: float) -> bool:
        if self._purged.get(user, -1.0) >= until:
            return False
        version = self._versions.get(user)
        if version is not None and until <= version.until - self.margin:
            return False
        entry = self._sids.get(sid)
        if entry is not None and entry.until >= until:
            return False
        if entry is not None and entry.user != user:
            self._unindex_sid(entry.user, sid)
        self._sids[sid] = _Sid(user, until)
        self._sids_by_user.setdefault(user, set()).add(sid)
        self._push(until, _SID, sid)
        return True

    def _drop_sids(self, user: str, subsumed: Callable[[float], bool]) -> None:
        sids = self._sids_by_user.get(user)
        if not sids:
            return
        for sid in [sid for sid in sids if subsumed(self._sids[sid].until)]:
            del self._sids[sid]
            sids.discard(sid)
        if not sids:
            del self._sids_by_user[user]

    def _unindex_sid(self, user: str, sid: str) -> None:
        sids = self._sids_by_user.get(user)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._sids_by_user[user]

    def _push(self, until: float, kind: int, key: str) -> None:
        heapq.heappush(self._heap, (until, kind, key))
        if len(self._heap) > 2 * len(self) + 1024:  # superseded items pile up when entries are extended
            self._heap = [item for item in self._heap if self._current(item)]
            heapq.heapify(self._heap)

    # ------------------------------------------------------------ forgetting

    def expire(self, now: float) -> int:
        """Drop every entry whose time is over; returns how many. Lookups never rely on this having run."""
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            if self._current(item):
                self._remove(item)
                dropped += 1
        return dropped

    def _enforce_cap(self) -> None:
        while len(self) > self.max_entries and self._heap:
            item = heapq.heappop(self._heap)
            if not self._current(item):
                continue
            self._remove(item)
            self.evictions += 1
            event_time = item[0] - self.retention
            self.floor = event_time if self.floor is None else max(self.floor, event_time)

    def _current(self, item: tuple[float, int, str]) -> bool:
        until, kind, key = item
        if kind == _SID:
            sid = self._sids.get(key)
            return sid is not None and sid.until == until
        if kind == _VERSION:
            version = self._versions.get(key)
            return version is not None and version.until == until
        return self._purged.get(key) == until

    def _remove(self, item: tuple[float, int, str]) -> None:
        _, kind, key = item
        if kind == _SID:
            self._unindex_sid(self._sids.pop(key).user, key)
        elif kind == _VERSION:
            del self._versions[key]
        else:
            del self._purged[key]

    # ------------------------------------------------------------ the hot path

    def refusal(
        self, *, sub: str, sid: str | None, token_version: int | None, iat: float | None, now: float
    ) -> RefusalRule | None:
        """Which rule refuses this token now, or None. A few dict reads; entries past their time are ignored."""
        if self.floor is not None and (iat is None or iat <= self.floor):
            return "evicted"
        purged = self._purged.get(sub)
        if purged is not None and now < purged:
            return "account_purged"
        version = self._versions.get(sub)
        if version is not None and now < version.until and (token_version is None or token_version < version.version):
            return "token_version"
        if sid is not None:
            entry = self._sids.get(sid)
            if entry is not None and now < entry.until:
                return "session_revoked"
        return None

    # ------------------------------------------------------------ introspection

    def sizes(self) -> dict[str, int]:
        """Entry counts per kind, for stats and metrics."""
        return {"sessions": len(self._sids), "versions": len(self._versions), "purged": len(self._purged)}

    def snapshot(self) -> tuple[dict[str, tuple[str, float]], dict[str, tuple[int, float]], dict[str, float]]:
        """Every entry as plain values: two states that compare equal refuse exactly the same tokens."""
        return (
            {sid: (entry.user, entry.until) for sid, entry in self._sids.items()},
            {user: (entry.version, entry.until) for user, entry in self._versions.items()},
            dict(self._purged),
        )
