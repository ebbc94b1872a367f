"""The baselines the issuer is measured against, written as plainly as the stack allows.

``trivial``: a Starlette JSON endpoint, the ceiling for any endpoint on this stack (JWKS, /auth/me).
``refresh``: a minimal refresh endpoint, Starlette + asyncpg, with the issuer's own rotation statement
and one RS256 signature with a key loaded once; nothing else (no validation beyond the body's shape, no
metrics, no logs, no rate limit). The ratio of the issuer to it is the product's overhead.
``login`` (same app): a minimal password login: read the account, argon2id verify on one thread per core
(the issuer's configured parameters), insert the family and its first token with the issuer's own
statement, one RS256 signature. No lock-out, no email rules, no logs. What it reaches next to argon2 alone
is what this box allows any login, however little else it does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import asyncpg
from argon2.exceptions import VerificationError
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from issuer.accounts.passwords import argon2id
from issuer.settings import Settings
from issuer.storage import sessions


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
    # does not pay either (``issuer.storage.database.Database``); the reference must be the best plain version.
    POOL["pool"] = await asyncpg.create_pool(os.environ["BENCH_PG_DSN"], min_size=10, max_size=10, reset=_no_reset)
    try:
        yield
    finally:
        await POOL["pool"].close()


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to undo: the statement runs in autocommit and changes no session state."""


def _access_token(user_id: str, family_id: str, token_version: int, email: str, role: str) -> str:
    iat = int(time.time())
    claims = {
        "iss": "http://reference",
        "aud": "api",
        "sub": user_id,
        "iat": iat,
        "exp": iat + 900,
        "jti": secrets.token_urlsafe(16),
        "sid": family_id,
        "tokenVersion": token_version,
        "email": email,
        "role": role,
    }
    return jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": "reference"}, claims, KEY)


async def refresh(request: Request) -> JSONResponse:
    token = (await request.json())["refresh_token"]
    mac = hmac.new(SECRET, token.encode(), hashlib.sha256).digest()
    successor = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    now = datetime.now(UTC)
    row = await POOL["pool"].fetchrow(
        sessions.ROTATE.sql,
        hashlib.sha256(token.encode()).digest(),
        now,
        hashlib.sha256(successor.encode()).digest(),
        now + REFRESH_TTL,
        request.client.host if request.client else None,
        request.headers.get("user-agent"),
        None,  # the token's route: the reference's tokens carry none
    )
    if row is None:
        return JSONResponse({"error": "invalid_grant"}, status_code=401)
    access = _access_token(row["id"], row["family_id"], row["token_version"], row["email"], row["role"])
    return JSONResponse({"access_token": access, "token_type": "Bearer", "expires_in": 900, "refresh_token": successor})


HASHER = argon2id(Settings.from_environ(os.environ).argon2)
HASHING = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # as the issuer: one hash per core at a time
USER_SQL = "SELECT id, email, password_hash, role, token_version FROM users WHERE email = $1"


def _verify(stored: str, password: str) -> bool:
    try:
        return HASHER.verify(stored, password)
    except VerificationError:
        return False


async def login(request: Request) -> JSONResponse:
    body = await request.json()
    user = await POOL["pool"].fetchrow(USER_SQL, body["email"])
    if user is None:
        return JSONResponse({"error": "invalid_credentials"}, status_code=401)
    ok = await asyncio.get_running_loop().run_in_executor(HASHING, _verify, user["password_hash"], body["password"])
    if not ok:
        return JSONResponse({"error": "invalid_credentials"}, status_code=401)
    family_id, token, now = str(uuid.uuid4()), secrets.token_urlsafe(32), datetime.now(UTC)
    expires = now + REFRESH_TTL
    await POOL["pool"].execute(
        sessions.START.sql,
        family_id,
        user["id"],
        now,
        now,
        now + timedelta(days=30),
        expires,
        request.headers.get("user-agent"),
        request.client.host if request.client else None,
        hashlib.sha256(token.encode()).digest(),
    )
    access = _access_token(user["id"], family_id, user["token_version"], user["email"], user["role"])
    return JSONResponse({"access_token": access, "token_type": "Bearer", "expires_in": 900, "refresh_token": token})


reference = Starlette(
    routes=[Route("/auth/refresh", refresh, methods=["POST"]), Route("/auth/login", login, methods=["POST"])],
    lifespan=lifespan,
)
