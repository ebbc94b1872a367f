"""Registered clients and calls to the client-authenticated endpoints."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx
import jwt as pyjwt

from tests.support.issuer import IssuerHarness


@dataclass(frozen=True)
class Credentials:
    client_id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": basic(self.client_id, self.secret)}


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")


async def new_client(issuer: IssuerHarness, *scopes: str, name: str = "gateway") -> Credentials:
    created = await issuer.services.clients.add(name, scopes or ("introspect", "revoke", "events"))
    return Credentials(created.client_id, created.client_secret)


async def introspect(http: httpx.AsyncClient, who: Credentials, token: str, **form: str) -> httpx.Response:
    return await http.post("/oauth2/introspect", data={"token": token, **form}, headers=who.headers)


async def revoke(http: httpx.AsyncClient, who: Credentials, token: str, **form: str) -> httpx.Response:
    return await http.post("/oauth2/revoke", data={"token": token, **form}, headers=who.headers)


async def poll(http: httpx.AsyncClient, who: Credentials, **body: Any) -> httpx.Response:
    return await http.post("/events/poll", json={"returnImmediately": True, **body}, headers=who.headers)


async def poll_all(http: httpx.AsyncClient, who: Credentials, cursor: str | None = None) -> tuple[list[str], str]:
    """Every SET after ``cursor`` (following moreAvailable), in order, and the last cursor."""
    sets: list[str] = []
    while True:
        body: dict[str, Any] = {"maxEvents": 1000}
        if cursor is not None:
            body["cursor"] = cursor
        response = await poll(http, who, **body)
        assert response.status_code == 200, response.text
        answer = response.json()
        sets.extend(answer["sets"].values())
        cursor = answer["cursor"]
        if not answer["moreAvailable"]:
            return sets, cursor


def decode_set(jwks: dict[str, Any], token: str, *, audience: str, issuer: str) -> dict[str, Any]:
    """What a verifier does with a SET (RFC 8417): the kid's key from the published JWKS, RS256 only,
    ``typ: secevent+jwt``, the issuer and our client id as audience; PyJWT, an independent implementation."""
    header = pyjwt.get_unverified_header(token)
    assert header["typ"] == "secevent+jwt", header
    assert header["alg"] == "RS256", header
    keys = {key["kid"]: key for key in jwks["keys"]}
    assert header["kid"] in keys, f"kid {header['kid']} is not in the JWKS"
    claims: dict[str, Any] = pyjwt.decode(
        token,
        key=pyjwt.PyJWK.from_dict(keys[header["kid"]]).key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["iss", "iat", "jti", "aud"], "verify_iat": False},
    )
    return claims
