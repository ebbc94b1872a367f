"""Key material: generating keys, their public JWK and kid, and encrypting private keys at rest (AES-256-GCM
under the KEK, with the kid as associated data, so a row copied onto another kid does not decrypt)."""

from __future__ import annotations

import secrets
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import RSAKey

from issuer.keys.records import KeyRecord
from issuer.settings import Secret
from issuer.verifier.jwks import MAX_RSA_BITS, MIN_RSA_BITS

# MIN_RSA_BITS and MAX_RSA_BITS are the verifier's: the issuer signs only with keys its own verifier accepts.
# A 32768-bit key would sign, and every gateway running issuer.verifier would drop it from the JWKS and refuse
# its tokens as unknown_kid.
DEFAULT_RSA_BITS = 2048
_NONCE_BYTES = 12


class KeyDecryptionError(Exception):
    """The key-encryption key does not open a stored private key (wrong KEK, or tampered row)."""


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
    n, e = members["n"], members["e"]
    assert isinstance(n, str)
    assert isinstance(e, str)
    return kid, {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": e}


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
