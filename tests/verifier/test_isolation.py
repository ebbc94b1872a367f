"""The shipped verifier works for a resource service that installed only what it needs.

Each check runs in a fresh interpreter whose import system refuses the server's dependencies, so a stray
import anywhere under ``issuer.verifier`` fails here instead of in somebody's gateway.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the server needs and a resource service must not: the server extra's packages (by import name)...
SERVER_DEPENDENCIES = ("sqlalchemy", "asyncpg", "argon2", "alembic", "prometheus_client", "uvicorn")
# ...and the issuer's own server modules: the app and the one database pool.
SERVER_MODULES = (*SERVER_DEPENDENCIES, "issuer.http.app", "issuer.storage.database")

CHECK = (
    "import issuer.verifier, sys; "
    f"bad=[m for m in {SERVER_MODULES!r} if m in sys.modules]; "
    "assert not bad, bad; "
    "assert callable(issuer.verifier.verify_access_token); "
    "print('verifier-ok')"
)

# Installed first in every script below: importing any of BLOCKED raises ModuleNotFoundError, as it would
# where the package was installed without the extra that brings it.
BLOCK = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None

assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED], "imported before the hook"
sys.meta_path.insert(0, Refuse())
"""

# A resource service's day: fetch the JWKS (over a mock transport), verify a token, refuse a bad one.
VERIFY = """
import asyncio, time
import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey
from issuer.verifier import AccessTokenVerifier, JWKSCache, WrongAudience

private = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
kid = private.thumbprint()
jwks = {"keys": [{**private.as_dict(private=False), "kid": kid, "use": "sig", "alg": "RS256"}]}
now = int(time.time())

def token(**changes):
    claims = {"iss": "https://issuer.test", "aud": "api", "sub": "u1", "iat": now, "exp": now + 60, "jti": "j",
              "role": "admin", **changes}
    return jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": kid}, claims, private, algorithms=["RS256"])

def handle(request):
    if request.url.path.endswith("oauth-authorization-server"):
        return httpx.Response(200, json={"issuer": "https://issuer.test",
                                         "jwks_uri": "https://issuer.test/.well-known/jwks.json"})
    return httpx.Response(200, json=jwks, headers={"Cache-Control": "max-age=300"})

http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
verifier = AccessTokenVerifier(issuer="https://issuer.test", audience="api",
                               jwks=JWKSCache(issuer="https://issuer.test", http_client=http))
"""

CORE = (
    VERIFY
    + """
async def main():
    assert (await verifier.verify(token())).sub == "u1"
    try:
        await verifier.verify(token(aud="other"))
    except WrongAudience:
        pass
    else:
        raise AssertionError("wrong audience accepted")
    await verifier.aclose()

asyncio.run(main())
print("core-ok")
"""
)

MIDDLEWARE = (
    VERIFY
    + """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from issuer.verifier.starlette import bearer_middleware, requires_role

@requires_role("admin")
async def admin(request):
    return PlainTextResponse(request.user.identity)

app = Starlette(routes=[Route("/admin", admin)], middleware=[bearer_middleware(verifier)])

async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r.test") as client:
        ok = await client.get("/admin", headers={"Authorization": "Bearer " + token()})
        assert (ok.status_code, ok.text) == (200, "u1"), ok.text
        anonymous = await client.get("/admin")
        assert anonymous.headers["www-authenticate"] == "Bearer", anonymous.headers

asyncio.run(main())
print("middleware-ok")
"""
)

CLI = """
from issuer.cli import main
raise SystemExit(main(["migrate"]))
"""


def run(
    code: str, blocked: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = f"BLOCKED = {set(blocked)!r}\n{textwrap.dedent(BLOCK)}\n{code}" if blocked else code
    # Fixed code, run with this interpreter in a fresh process: no untrusted input reaches the command line.
    return subprocess.run(  # noqa: S603
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_verifier_imports_no_server_modules() -> None:
    result = run(CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "verifier-ok"


def test_the_check_can_fail() -> None:
    """Control: importing the server side in the same way is detected."""
    for server_module in ("issuer.storage.database", "issuer.http.app"):
        result = run(CHECK.replace("import issuer.verifier,", f"import issuer.verifier, {server_module},"))
        assert result.returncode != 0, server_module
        assert "AssertionError" in result.stderr, result.stderr
        assert server_module in result.stderr


def test_verifier_and_jwks_cache_work_without_server_dependencies_or_starlette() -> None:
    result = run(CORE, blocked=(*SERVER_DEPENDENCIES, "starlette"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core-ok"


def test_the_middleware_works_with_starlette_alone() -> None:
    result = run(MIDDLEWARE, blocked=SERVER_DEPENDENCIES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "middleware-ok"


def test_the_example_imports_without_server_dependencies() -> None:
    code = "import examples.resource_service as ex; print(type(ex.app).__name__)"
    env = {"ISSUER_URL": "https://issuer.test", "PATH": "/usr/bin:/bin"}
    result = run(code, blocked=SERVER_DEPENDENCIES, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Starlette"


def test_the_block_is_real() -> None:
    """Control: the hook does refuse what it lists, so the passing tests above mean something."""
    result = run("import issuer.storage.database", blocked=SERVER_DEPENDENCIES)
    assert result.returncode != 0
    assert "No module named 'asyncpg' (refused by the test)" in result.stderr
    result = run("import issuer.verifier.starlette", blocked=("starlette",))
    assert result.returncode != 0
    assert "starlette" in result.stderr


def test_the_issuer_command_without_server_dependencies_says_what_to_install() -> None:
    result = run(CLI, blocked=SERVER_DEPENDENCIES)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == ["issuer: the issuer server needs: pip install 'issuer[server]' (sqlalchemy is missing)"], lines


def test_base_dependencies_are_what_a_resource_service_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}

    assert names(project["dependencies"]) == {"joserfc", "cryptography", "httpx"}
    extras = project["optional-dependencies"]
    assert names(extras["starlette"]) == {"starlette"}
    assert names(extras["server"]) >= {
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "asyncpg",
        "alembic",
        "argon2-cffi",
        "prometheus-client",
    }
