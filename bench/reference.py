"""The baselines the issuer is measured against, written as plainly as the stack allows.

``trivial``: a Starlette JSON endpoint, the ceiling for any endpoint on this stack (JWKS, /auth/me).
``refresh``: a minimal refresh endpoint, Starlette + asyncpg, with the issuer's own rotation statement
and one RS256 signature with a key loaded once; nothing else (no validation beyond the body's shape, no
metrics, no logs, no rate limit). The ratio of the issuer to it is the product's overhead.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from issuer.hotpath import ROTATE_SQL


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


trivial = Starlette(routes=[Route("/hello", hello)])

KEY = RSAKey.generate_key(2048, parameters={"kid": "reference", "alg": "RS256"})
SECRET = secrets.token_bytes(32)
REFRESH_TTL = timedelta(days=7)
POOL: dict[str, asyncpg.Pool] = {}


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # No reset on release: asyncpg's default reset is a second round trip per request, which the issuer
    # does not pay either (``issuer.hotpath.HotPool``); the reference must be the best plain version.
    POOL["pool"] = await asyncpg.create_pool(os.environ["BENCH_PG_DSN"], min_size=10, max_size=10, reset=_no_reset)
    try:
        yield
    finally:
        await POOL["pool"].close()


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to undo: the statement runs in autocommit and changes no session state."""


async def refresh(request: Request) -> JSONResponse:
    token = (await request.json())["refresh_token"]
    mac = hmac.new(SECRET, token.encode(), hashlib.sha256).digest()
    successor = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    now = datetime.now(UTC)
    row = await POOL["pool"].fetchrow(
        ROTATE_SQL,
        hashlib.sha256(token.encode()).digest(),
        now,
        hashlib.sha256(successor.encode()).digest(),
        now + REFRESH_TTL,
    )
    if row is None:
        return JSONResponse({"error": "invalid_grant"}, status_code=401)
    iat = int(time.time())
    claims = {
        "iss": "http://reference",
        "aud": "api",
        "sub": row["id"],
        "iat": iat,
        "exp": iat + 900,
        "jti": secrets.token_urlsafe(16),
        "sid": row["family_id"],
        "tokenVersion": row["token_version"],
        "email": row["email"],
        "role": row["role"],
    }
    access = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": "reference"}, claims, KEY)
    return JSONResponse({"access_token": access, "token_type": "Bearer", "expires_in": 900, "refresh_token": successor})


reference = Starlette(routes=[Route("/auth/refresh", refresh, methods=["POST"])], lifespan=lifespan)
