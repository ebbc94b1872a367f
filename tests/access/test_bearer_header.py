"""The Authorization header at the issuer's Bearer endpoints (RFC 6750 section 2.1 and 3): what counts as a
Bearer token, what counts as no credentials at all, and what a malformed header gets."""

from __future__ import annotations

import httpx
import pytest

from tests.access.conftest import Forge
from tests.support.http import assert_invalid_token, assert_no_credentials, bearer, me


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer    ", id="scheme-and-blanks"),
        pytest.param("Bearer not a token", id="bearer-garbage"),
        pytest.param("Bearer \u00e9\u00e9\u00e9.\u00e9.\u00e9", id="bearer-non-ascii"),
    ],
)
async def test_bad_authorization_headers(forge: Forge, client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/auth/me", headers={b"Authorization": header.encode("utf-8")})
    assert_invalid_token(response)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("", id="empty"),
        pytest.param("Basic YWxpY2U6cGFzc3dvcmQ=", id="basic"),
        pytest.param("Token abc.def.ghi", id="other-scheme"),
    ],
)
async def test_other_schemes_count_as_no_credentials(client: httpx.AsyncClient, header: str) -> None:
    """RFC 6750 section 3.1: an unsupported authentication method gets the bare challenge, no error code."""
    assert_no_credentials(await client.get("/auth/me", headers={"Authorization": header}))


@pytest.mark.parametrize("scheme", ["Basic", "Token", "MAC", "Bearer:", "Bearerx"])
async def test_real_token_under_another_scheme(forge: Forge, client: httpx.AsyncClient, scheme: str) -> None:
    response = await client.get("/auth/me", headers={"Authorization": f"{scheme} {forge.access_token}"})
    assert_no_credentials(response)


async def test_scheme_is_case_insensitive_control(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/me", headers={"Authorization": f"bearer {forge.access_token}"})
    assert response.status_code == 200


async def test_no_credentials_is_a_bare_challenge(forge: Forge, client: httpx.AsyncClient) -> None:
    assert_no_credentials(await client.get("/auth/me"))


async def test_huge_authorization_header(forge: Forge, client: httpx.AsyncClient) -> None:
    assert_invalid_token(await me(client, forge.access_token + "A" * 1_000_000))
    assert (await client.get("/auth/me", headers=bearer(forge.access_token))).status_code == 200
