"""Reading an operator-provided RSA private key (PEM, PKCS#8 or PKCS#1) with clear refusals."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from issuer.verifier.jwks import MAX_RSA_BITS, MIN_RSA_BITS

MAX_PEM_BYTES = 64 * 1024


class KeyImportError(Exception):
    """The file is not an acceptable signing key; the message says why."""


def load_rsa_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyImportError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise KeyImportError(f"{path} is too large to be a PEM private key")
    if b"-----BEGIN" not in data:
        raise KeyImportError(f"{path} is not a PEM file (expected '-----BEGIN PRIVATE KEY-----')")
    if b"ENCRYPTED" in data:
        raise KeyImportError(f"{path} is an encrypted private key; decrypt it first (openssl pkey -in ... -out ...)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyImportError(f"{path} is password-protected; decrypt it first") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyImportError(f"{path} does not hold a readable private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey").lstrip("_") or "non-RSA"
        raise KeyImportError(f"{path} holds an {kind} key, not RSA; only RSA keys can sign RS256")
    if key.key_size < MIN_RSA_BITS:
        raise KeyImportError(f"{path} holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are required")
    if key.key_size > MAX_RSA_BITS:
        raise KeyImportError(f"{path} holds a {key.key_size}-bit RSA key; verifiers accept at most {MAX_RSA_BITS} bits")
    return key
