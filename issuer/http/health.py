"""Liveness, readiness and metrics.

``/healthz`` answers while the process lives: what a load balancer should check, because the JWKS, the
metadata and every token already issued keep working from memory while the database is down. ``/readyz``
answers 200 only when the database runs the hot statements and a key can sign (README, "Deploying").
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from issuer.services import Services
from issuer.storage import sessions, users
from issuer.storage.database import describe

# For the connection check and the statements together: a load balancer's probe must not hang on a stalled
# database, and a database that answers slower than this is not ready for traffic either.
READINESS_DB_TIMEOUT = 2.0

log = logging.getLogger("issuer")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc: Services = request.state.services
    problems = []
    database = await _database_problem(svc)
    if database is not None:
        problems.append(database)
    if svc.keys.signing_key(svc.clock()) is None:
        problems.append("no active signing key")
    if problems:
        return JSONResponse(
            {"status": "unavailable", "problems": problems},
            status_code=503,
            headers={"Retry-After": "2", "Cache-Control": "no-store"},
        )
    return JSONResponse({"status": "ready"}, headers={"Cache-Control": "no-store"})


async def _database_problem(svc: Services) -> str | None:
    """What keeps the database from serving requests, or None. The cause goes to the log, not the response.

    A connection that opens is not enough: a database that came back as a read-only standby after a
    failover, a schema behind the code, or a pooler that breaks prepared statements all answer ``SELECT 1``
    and fail every refresh. So after the ping the hot statements run as requests run them (prepared, on the
    pool): the refresh's rotation and its read for a token hash no token has, and the Bearer path's user
    read for an id no user has. They match no row and write nothing; each is one index lookup.
    """
    stage = "database unreachable"
    try:
        async with asyncio.timeout(READINESS_DB_TIMEOUT):
            await svc.db.ping()
            stage = "database statements failing"
            now = svc.clock()
            nothing = secrets.token_bytes(32)  # the SHA-256 of no token: no row matches it
            await sessions.rotate(svc.db, nothing, nothing, now, now)
            await sessions.inspect(svc.db, nothing, nothing, now)
            await users.by_ids(svc.db, [""])
    except Exception as exc:
        log.warning("not ready: %s (%s)", stage, describe(exc))
        return stage
    return None


async def metrics(request: Request) -> Response:
    svc: Services = request.state.services
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
