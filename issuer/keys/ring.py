"""The in-memory key ring: the decrypted keys one process holds, the signing key and the JWKS at ``now``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from joserfc.jwk import RSAKey

from issuer.keys.material import decrypt_private_key
from issuer.keys.records import KeyRecord, KeyState, is_published, key_state, signing_record
from issuer.settings import Secret


@dataclass(frozen=True)
class LoadedKey:
    record: KeyRecord
    signing_key: RSAKey


@dataclass(frozen=True)
class JwksDocument:
    body: bytes
    etag: str


@dataclass(frozen=True, slots=True)
class _StableSpan:
    """The published kids, which stay the same for every ``now`` in ``[since, until)``."""

    since: datetime
    until: datetime
    published: tuple[str, ...]


@dataclass
class KeyRing:
    """The decrypted keys one process holds; replaced wholesale when the table changes."""

    keys: tuple[LoadedKey, ...]
    retire_grace: timedelta
    _jwks_cache: dict[tuple[str, ...], JwksDocument] = field(default_factory=dict, repr=False)
    _verify_cache: dict[tuple[str, ...], Mapping[str, RSAKey]] = field(default_factory=dict, repr=False)
    _span: _StableSpan | None = field(default=None, repr=False)

    @classmethod
    def load(cls, records: Iterable[KeyRecord], kek: Secret, retire_grace: timedelta) -> KeyRing:
        """Decrypt every key that can still matter; raises :class:`KeyDecryptionError` on a wrong KEK."""
        loaded = []
        for record in records:
            private = decrypt_private_key(kek, record.kid, record.private_key_enc)
            loaded.append(LoadedKey(record, RSAKey.import_key(private, {"kid": record.kid, "alg": "RS256"})))
        return cls(tuple(loaded), retire_grace)

    def signing_key(self, now: datetime) -> LoadedKey | None:
        chosen = signing_record([k.record for k in self.keys], now, self.retire_grace)
        return None if chosen is None else next(k for k in self.keys if k.record.kid == chosen.kid)

    def recently_retired(self, now: datetime, within: timedelta) -> LoadedKey | None:
        """The key that stopped signing less than ``within`` ago (not revoked).

        Used only when no key is active in this process's view: right after an immediate rotation on
        another replica, before this one has re-read the table. The retiring key is still published.
        """
        candidates = [
            k
            for k in self.keys
            if key_state(k.record, now, self.retire_grace) is KeyState.RETIRING
            and k.record.retire_at is not None
            and now - k.record.retire_at < within
        ]
        return max(candidates, key=lambda k: (k.record.retire_at, k.record.kid), default=None)

    def verification_key_map(self, now: datetime) -> Mapping[str, RSAKey]:
        """Keys whose signatures the issuer accepts now (everything in the JWKS), as kid -> key.

        Built once per distinct published set, like the JWKS bytes, not once per request."""
        published = self._published_kids(now)
        mapping = self._verify_cache.get(published)
        if mapping is None:
            by_kid = {k.record.kid: k.signing_key for k in self.keys}
            mapping = MappingProxyType({kid: by_kid[kid] for kid in published})
            self._verify_cache[published] = mapping
        return mapping

    def jwks(self, now: datetime) -> JwksDocument:
        published = self._published_kids(now)
        document = self._jwks_cache.get(published)
        if document is None:
            by_kid = {k.record.kid: k.record.public_jwk for k in self.keys}
            body = json.dumps({"keys": [by_kid[kid] for kid in published]}, separators=(",", ":")).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            document = JwksDocument(body, etag)
            self._jwks_cache[published] = document
        return document

    def _published_kids(self, now: datetime) -> tuple[str, ...]:
        """Asked on every bearer call and JWKS request: worked out again only when a key changes state."""
        span = self._span
        if span is not None and span.since <= now < span.until:
            return span.published
        published = tuple(sorted(k.record.kid for k in self.keys if is_published(k.record, now, self.retire_grace)))
        self._span = _StableSpan(now, _next_transition(self.keys, now, self.retire_grace), published)
        return published


def _next_transition(keys: Iterable[LoadedKey], now: datetime, retire_grace: timedelta) -> datetime:
    """The first moment after ``now`` at which any key's state may change (see ``key_state``)."""
    moments = []
    for key in keys:
        r = key.record
        retired_gone = None if r.retire_at is None else r.retire_at + retire_grace
        changes = (r.publish_at, r.activate_at, r.retire_at, retired_gone, r.revoked_at)
        moments += [t for t in changes if t is not None and t > now]
    return min(moments, default=_END_OF_TIME)


_END_OF_TIME = datetime.max.replace(tzinfo=UTC)
