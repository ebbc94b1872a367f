"""Signing keys: encryption at rest, states over time, and the in-memory key ring.

A key's state is a pure function of its timestamps and ``now``, so every replica that has read the same
rows picks the same signing key and serves the same JWKS without talking to the others::

    publish_at <= now < activate_at                    published  (in the JWKS, not signing)
    activate_at <= now < retire_at (or no retire_at)   active     (newest activate_at signs)
    retire_at <= now < retire_at + grace               retiring   (in the JWKS until its tokens expired)
    revoked_at <= now, or past the retiring window     gone
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import RSAKey

from issuer.settings import Secret
from issuer.verifier.jwks import MAX_RSA_BITS, MIN_RSA_BITS

# MIN_RSA_BITS and MAX_RSA_BITS are the verifier's: the issuer signs only with keys its own verifier accepts.
# A 32768-bit key would sign, and every gateway running issuer.verifier would drop it from the JWKS and refuse
# its tokens as unknown_kid.
DEFAULT_RSA_BITS = 2048
_NONCE_BYTES = 12


class KeyDecryptionError(Exception):
    """The key-encryption key does not open a stored private key (wrong KEK, or tampered row)."""


class KeyState(enum.StrEnum):
    PENDING = "pending"
    PUBLISHED = "published"
    ACTIVE = "active"
    RETIRING = "retiring"
    GONE = "gone"
    REVOKED = "revoked"


@dataclass(frozen=True)
class KeyRecord:
    """One row of ``signing_keys``: what storage reads and writes."""

    kid: str
    public_jwk: dict[str, str]
    private_key_enc: bytes
    created_at: datetime
    publish_at: datetime
    activate_at: datetime
    retire_at: datetime | None
    revoked_at: datetime | None
    key_bits: int
    # Monotonic and unique per table: two replicas rotating at once pick the same number, one insert fails.
    generation: int = 0


def encrypt_private_key(kek: Secret, kid: str, private_key: rsa.RSAPrivateKey) -> bytes:
    der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(kek.reveal()).encrypt(nonce, der, kid.encode("ascii"))


def decrypt_private_key(kek: Secret, kid: str, blob: bytes) -> rsa.RSAPrivateKey:
    nonce, ciphertext = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
    try:
        der = AESGCM(kek.reveal()).decrypt(nonce, ciphertext, kid.encode("ascii"))
    except InvalidTag:
        raise KeyDecryptionError(f"ISSUER_KEK: does not decrypt signing key {kid}") from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyDecryptionError(f"signing key {kid} is not an RSA key")
    return key


def public_jwk(private_key: rsa.RSAPrivateKey) -> tuple[str, dict[str, str]]:
    """The RFC 7638 thumbprint (our kid) and the public JWK as served in the JWKS."""
    jwk = RSAKey.import_key(private_key.public_key())
    kid = jwk.thumbprint()
    members = jwk.as_dict(private=False)
    return kid, {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": members["n"], "e": members["e"]}


def new_key_record(
    kek: Secret,
    *,
    now: datetime,
    activate_at: datetime,
    private_key: rsa.RSAPrivateKey | None = None,
    bits: int = DEFAULT_RSA_BITS,
) -> KeyRecord:
    """Build (but do not store) a key published at ``now`` and signing from ``activate_at``."""
    if private_key is None:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if not MIN_RSA_BITS <= private_key.key_size <= MAX_RSA_BITS:
        raise ValueError(f"RSA key of {private_key.key_size} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} are allowed")
    kid, jwk = public_jwk(private_key)
    return KeyRecord(
        kid=kid,
        public_jwk=jwk,
        private_key_enc=encrypt_private_key(kek, kid, private_key),
        created_at=now,
        publish_at=now,
        activate_at=activate_at,
        retire_at=None,
        revoked_at=None,
        key_bits=private_key.key_size,
    )


def key_state(record: KeyRecord, now: datetime, retire_grace: timedelta) -> KeyState:
    if record.revoked_at is not None and record.revoked_at <= now:
        return KeyState.REVOKED
    if now < record.publish_at:
        return KeyState.PENDING
    if now < record.activate_at:
        return KeyState.PUBLISHED
    if record.retire_at is None or now < record.retire_at:
        return KeyState.ACTIVE
    if now < record.retire_at + retire_grace:
        return KeyState.RETIRING
    return KeyState.GONE


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
        published = tuple(sorted(k.record.kid for k in self.keys if _published(k.record, now, self.retire_grace)))
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


def signing_record(records: Iterable[KeyRecord], now: datetime, retire_grace: timedelta) -> KeyRecord | None:
    """The active key with the newest ``activate_at`` (kid breaks ties, so replicas agree)."""
    active = [r for r in records if key_state(r, now, retire_grace) is KeyState.ACTIVE]
    return max(active, key=lambda r: (r.activate_at, r.kid), default=None)


def published_kids(records: Iterable[KeyRecord], now: datetime, retire_grace: timedelta) -> frozenset[str]:
    """The kids a JWKS served at ``now`` contains."""
    return frozenset(r.kid for r in records if _published(r, now, retire_grace))


def _published(record: KeyRecord, now: datetime, retire_grace: timedelta) -> bool:
    return key_state(record, now, retire_grace) in {KeyState.PUBLISHED, KeyState.ACTIVE, KeyState.RETIRING}
