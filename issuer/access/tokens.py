"""Minting access tokens (RFC 9068 profile, RS256)."""

from __future__ import annotations

import secrets
from datetime import datetime

from joserfc import jwt

from issuer.keys.ring import LoadedKey


def mint_access_token(
    key: LoadedKey,
    *,
    issuer: str,
    audience: str,
    ttl: int,
    now: datetime,
    user_id: str,
    email: str,
    role: str,
    token_version: int,
    session_id: str,
) -> str:
    iat = int(now.timestamp())
    header = {"alg": "RS256", "typ": "at+jwt", "kid": key.record.kid}
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": user_id,
        "iat": iat,
        "exp": iat + ttl,
        "jti": secrets.token_urlsafe(16),
        "sid": session_id,
        "tokenVersion": token_version,
        "email": email,
        "role": role,
    }
    return jwt.encode(header, claims, key.signing_key, algorithms=["RS256"])
