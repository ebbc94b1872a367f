"""What the Bearer tests share: a signed-in user, the issuer's real signing key, and a forger built on both.

The forging primitives (hand-built compact tokens, RSA and HMAC signatures over any header) are in
``tests.support.jwt``; ``Forge`` adds the issuer's real key and a real access token, so that each attack can
change exactly one thing in an otherwise valid token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from issuer.keys.ring import LoadedKey
from issuer.settings import Settings
from issuer.verifier import verify_access_token
from tests.support.clock import FakeClock
from tests.support.http import login, me, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims, rsa_signed
from tests.support.verifier import changed

# What the issuer's own endpoints require (issuer/access/bearer.py), written out here rather than imported.
BEARER_REQUIRED = ("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion")

TOKEN_FAILURES = "issuer_token_verification_failures_total"


@dataclass
class Forge:
    """Everything an attack needs: a real signed-in user, the issuer's real key, and the verifier's inputs."""

    harness: IssuerHarness
    clock: FakeClock
    settings: Settings
    key: LoadedKey
    access_token: str
    refresh_token: str
    claims: dict[str, Any]
    other_user_id: str

    @property
    def kid(self) -> str:
        return self.key.record.kid

    @property
    def now(self) -> int:
        return int(self.clock.wall())

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        private = self.key.signing_key.private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        return private

    def header(self, **changes: Any) -> dict[str, Any]:
        return changed({"alg": "RS256", "typ": "at+jwt", "kid": self.kid}, changes)

    def payload(self, **changes: Any) -> dict[str, Any]:
        return changed(self.claims, changes)

    def sign(self, header: dict[str, Any] | None = None, payload: dict[str, Any] | bytes | None = None) -> str:
        """Validly signed by the issuer's own key: only the property under test is wrong."""
        return rsa_signed(header or self.header(), self.claims if payload is None else payload, self.private_key)

    def verify(self, token: str, *, required: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The shipped verifier, on the issuer's own verification keys and settings."""
        now = self.clock()
        keys = self.harness.services.keys.ring.verification_key_map(now)
        extra = {} if required is None else {"required_claims": required}
        return verify_access_token(
            token,
            keys,
            issuer=self.settings.issuer_url,
            audience=self.settings.audience,
            now=int(now.timestamp()),
            leeway=self.settings.clock_leeway,
            **extra,
        )

    def failures(self) -> dict[str, float]:
        """The issuer's count of refused Bearer tokens, by reason (only the reasons with a count)."""
        return {
            sample.labels["reason"]: sample.value
            for metric in self.harness.services.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == TOKEN_FAILURES and sample.value
        }


@pytest.fixture
async def forge(client: httpx.AsyncClient, issuer: IssuerHarness, clock: FakeClock) -> Forge:
    await register(client)
    other = await register(client, email="mallory@example.com")
    tokens = await login(client)
    key = issuer.services.keys.signing_key(clock())
    assert key is not None
    forge = Forge(
        harness=issuer,
        clock=clock,
        settings=issuer.services.settings,
        key=key,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        claims=jwt_claims(tokens["access_token"]),
        other_user_id=other["id"],
    )
    # The baseline is sound: the real token and a token re-signed by the real key both pass everywhere,
    # so every refusal below is caused by the one thing each attack changes.
    for token in (forge.access_token, forge.sign()):
        assert forge.verify(token, required=BEARER_REQUIRED)["sub"] == forge.claims["sub"]
        response = await me(client, token)
        assert response.status_code == 200, response.text
    assert forge.failures() == {}
    return forge
