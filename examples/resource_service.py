"""A resource service that trusts the issuer without calling it per request.

ISSUER_URL=http://127.0.0.1:8000 uvicorn examples.resource_service:app --port 8001
"""

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from issuer.verifier import AccessTokenVerifier
from issuer.verifier.starlette import bearer_middleware, requires_role, requires_token


@requires_token
async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"sub": request.user.identity, "role": request.user.role})


@requires_role("admin")
async def report(request: Request) -> JSONResponse:
    return JSONResponse({"report": "for admins only"})


def create_app(verifier: AccessTokenVerifier) -> Starlette:
    return Starlette(
        routes=[Route("/whoami", whoami), Route("/admin/report", report)],
        middleware=[bearer_middleware(verifier)],
        lifespan=verifier.lifespan,
    )


verifier = AccessTokenVerifier(issuer=os.environ["ISSUER_URL"], audience=os.environ.get("ISSUER_AUDIENCE", "api"))
app = create_app(verifier)
