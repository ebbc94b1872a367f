"""issuer.client.IssuerAuth against a live issuer (in-process through ASGI, or on uvicorn for the threads).

The refresh count is taken at the server (every request path the issuer receives is recorded), and
REFRESH_REUSE_GRACE is 0, so a second refresh with one token would be reuse: it revokes the session and
the test sees SignedOut as well as the count. Time moves with the tests' FakeClock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from issuer.client import IssuerAuth, RateLimited, SignedOut, Tokens
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, register
from tests.support.issuer import CLIENT_IP, ISSUER_URL, IssuerHarness, running_issuer, with_settings

EMAIL = "alice@example.com"
TTL = 900  # the settings' ACCESS_TOKEN_TTL
EXPIRED = TTL + 60  # past exp and past the issuer's CLOCK_LEEWAY


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return with_settings(settings, refresh_reuse_grace=0)


class Recorder:
    """The issuer's ASGI app, recording each request path; ``/always-401`` plays a resource service that
    rejects every token with ``invalid_token``, ``/bare-401`` one that sends a challenge without an error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
            if scope["path"] == "/always-401":
                challenge = 'Bearer error="invalid_token", error_description="no token is good here"'
                body = {"error": "invalid_token", "error_description": "no token is good here"}
                await JSONResponse(body, 401, {"WWW-Authenticate": challenge})(scope, receive, send)
                return
            if scope["path"] == "/bare-401":
                body = {"error": "invalid_token", "error_description": "no credentials"}
                await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def count(self, path: str) -> int:
        return self.paths.count(path)


@pytest.fixture
def recorder(issuer: IssuerHarness) -> Recorder:
    return Recorder(issuer.app)


@pytest.fixture
async def http(recorder: Recorder) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=recorder, client=(CLIENT_IP, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER_URL) as client:
        yield client


class Saved:
    """An ``on_tokens`` hook that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[Tokens | None] = []

    def __call__(self, tokens: Tokens | None) -> None:
        self.calls.append(tokens)

    @property
    def refresh_tokens(self) -> list[str | None]:
        return [t.refresh_token if t is not None else None for t in self.calls]


async def signed_in(
    http: httpx.AsyncClient, clock: Callable[[], float], on_tokens: Saved | None = None, refresh_margin: float = 30
) -> IssuerAuth:
    await register(http, EMAIL)
    return await IssuerAuth.alogin(
        ISSUER_URL, EMAIL, PASSWORD, client=http, clock=clock, on_tokens=on_tokens, refresh_margin=refresh_margin
    )


async def test_fifty_concurrent_requests_on_an_expired_token_cause_one_refresh(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    saved = Saved()
    auth = await signed_in(http, clock.monotonic, on_tokens=saved)
    first_access = auth.access_token
    clock.advance(EXPIRED)  # expired for the client and for the issuer

    responses = await asyncio.gather(*(http.get("/auth/me", auth=auth) for _ in range(50)))

    assert [r.status_code for r in responses] == [200] * 50
    assert recorder.count("/auth/refresh") == 1
    assert recorder.count("/auth/me") == 50  # nobody went out with the expired token
    assert auth.access_token != first_access
    assert len(saved.calls) == 2  # login, then the one refresh
    assert saved.refresh_tokens[-1] == auth.refresh_token


async def test_threads_of_a_sync_client_share_one_refresh(issuer: IssuerHarness, clock: FakeClock) -> None:
    recorder = Recorder(issuer.app)
    async with serve(recorder) as url:
        await asyncio.to_thread(register_sync, url)
        auth = await asyncio.to_thread(
            lambda: IssuerAuth.login(url, EMAIL, PASSWORD, clock=clock.monotonic, on_tokens=Saved())
        )
        clock.advance(EXPIRED)
        threads = 20
        barrier = threading.Barrier(threads)
        with httpx.Client(auth=auth, base_url=url) as client:

            def call() -> int:
                barrier.wait()  # every thread asks at the same moment, all with the expired token
                return client.get("/auth/me").status_code

            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                # Every thread must finish before the pool is shut down: the pool's exit blocks this loop,
                # which is also the server's.
                futures = (loop.run_in_executor(pool, call) for _ in range(threads))
                statuses = await asyncio.gather(*futures, return_exceptions=True)

    assert statuses == [200] * threads
    assert recorder.count("/auth/refresh") == 1
    assert recorder.count("/auth/me") == threads


async def test_refreshes_shortly_before_expiry(http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock) -> None:
    auth = await signed_in(http, clock.monotonic, refresh_margin=30)
    clock.advance(TTL - 31)
    assert (await http.get("/auth/me", auth=auth)).status_code == 200
    assert recorder.count("/auth/refresh") == 0

    clock.advance(2)  # 29 s before exp: inside the margin, the token still valid at the issuer
    old = auth.access_token
    assert (await http.get("/auth/me", auth=auth)).status_code == 200
    assert recorder.count("/auth/refresh") == 1
    assert auth.access_token != old
    assert recorder.count("/auth/me") == 2  # refreshed before sending: no request met a 401


async def test_a_401_refreshes_once_and_retries_once_for_all_concurrent_callers(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    # The client's clock stands still, so only the issuer knows the token has expired: every request goes
    # out with it, gets 401 invalid_token, and one of them refreshes.
    auth = await signed_in(http, FakeClock().monotonic)
    clock.advance(EXPIRED)

    responses = await asyncio.gather(*(http.get("/auth/me", auth=auth) for _ in range(50)))

    assert [r.status_code for r in responses] == [200] * 50
    assert recorder.count("/auth/refresh") == 1
    assert recorder.count("/auth/me") == 100  # each request once with the old token, once retried
    # httpx keeps the flow's earlier responses: each request's 401, and for one of them the refresh too.
    assert [r.history[0].status_code for r in responses] == [401] * 50
    assert sorted(len(r.history) for r in responses) == [1] * 49 + [2]


async def test_a_second_401_after_the_refresh_is_returned_not_looped(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    auth = await signed_in(http, clock.monotonic)
    response = await http.get("/always-401", auth=auth)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert recorder.count("/always-401") == 2
    assert recorder.count("/auth/refresh") == 1


async def test_a_401_without_invalid_token_is_not_a_reason_to_refresh(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    auth = await signed_in(http, clock.monotonic)
    response = await http.get("/bare-401", auth=auth)
    assert response.status_code == 401
    assert recorder.count("/bare-401") == 1
    assert recorder.count("/auth/refresh") == 0


async def test_the_hook_receives_every_new_refresh_token_and_a_stored_one_resumes(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    saved = Saved()
    auth = await signed_in(http, clock.monotonic, on_tokens=saved)
    for _ in range(3):
        clock.advance(EXPIRED)
        assert (await http.get("/auth/me", auth=auth)).status_code == 200
    tokens = saved.refresh_tokens
    assert len(tokens) == 4
    assert len(set(tokens)) == 4
    assert tokens[-1] == auth.refresh_token
    assert all(isinstance(t, Tokens) and t.user["email"] == EMAIL for t in saved.calls)
    assert "***" in repr(saved.calls[0])
    assert str(tokens[0]) not in repr(saved.calls[0])

    # The next run of the app starts from the stored refresh token: it refreshes before its first request.
    resumed_saved = Saved()
    resumed = IssuerAuth(ISSUER_URL, refresh_token=tokens[-1], on_tokens=resumed_saved, clock=clock.monotonic)
    me = await http.get("/auth/me", auth=resumed)
    assert me.status_code == 200
    assert me.json()["email"] == EMAIL
    assert recorder.count("/auth/refresh") == 4
    assert resumed_saved.refresh_tokens == [resumed.refresh_token]


async def test_a_revoked_session_raises_signed_out_and_forgets_the_tokens(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    saved = Saved()
    auth = await signed_in(http, clock.monotonic, on_tokens=saved)
    other = await IssuerAuth.alogin(ISSUER_URL, EMAIL, PASSWORD, client=http, clock=clock.monotonic)
    await other.alogout_all(http)  # from another device: every session ends, the token version goes up
    assert not other.signed_in

    with pytest.raises(SignedOut) as raised:
        await http.get("/auth/me", auth=auth)  # 401 invalid_token, then the refresh answers invalid_grant
    assert raised.value.error == "invalid_grant"
    assert recorder.count("/auth/refresh") == 1
    assert not auth.signed_in
    assert auth.access_token is None
    assert saved.calls[-1] is None  # the app deletes its stored token

    with pytest.raises(SignedOut):
        await http.get("/auth/me", auth=auth)
    assert recorder.count("/auth/refresh") == 1  # no request goes out once signed out


async def test_logout_ends_the_session_at_the_issuer(
    http: httpx.AsyncClient, recorder: Recorder, clock: FakeClock
) -> None:
    saved = Saved()
    auth = await signed_in(http, clock.monotonic, on_tokens=saved)
    refresh_token = auth.refresh_token
    await auth.alogout(http)
    assert saved.calls[-1] is None
    assert not auth.signed_in
    dead = await http.post("/auth/refresh", json={"refresh_token": refresh_token})
    assert dead.status_code == 401
    assert dead.json()["error"] == "invalid_grant"
    await auth.alogout(http)  # idempotent, and sends nothing
    assert recorder.count("/auth/logout") == 1


async def test_wrong_password_raises_invalid_credentials(http: httpx.AsyncClient, clock: FakeClock) -> None:
    from issuer.client import InvalidCredentials

    await register(http, EMAIL)
    with pytest.raises(InvalidCredentials) as raised:
        await IssuerAuth.alogin(ISSUER_URL, EMAIL, "not the password", client=http)
    assert raised.value.status_code == 401


class FakeSleepAuth(IssuerAuth):
    """Waits out a 429 by moving the issuer's clock instead of sleeping."""

    server_clock: FakeClock
    waits: list[float]

    async def async_sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.server_clock.advance(seconds)


@pytest.mark.parametrize("max_wait", [60.0, 10.0])
async def test_a_429_on_refresh_is_waited_out_when_short_else_raised(
    settings: Settings, clock: FakeClock, max_wait: float
) -> None:
    limited = with_settings(settings, rate_limit_per_ip=2)  # two refreshes, then one every 30 s
    async with running_issuer(limited, clock, monotonic=clock.monotonic) as issuer:
        recorder = Recorder(issuer.app)
        transport = httpx.ASGITransport(app=recorder, client=(CLIENT_IP, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER_URL) as http:
            await register(http, EMAIL)
            client_clock = FakeClock()  # moves the client's view of expiry without refilling the bucket
            auth = await FakeSleepAuth.alogin(
                ISSUER_URL, EMAIL, PASSWORD, client=http, clock=client_clock.monotonic, max_retry_wait=max_wait
            )
            assert isinstance(auth, FakeSleepAuth)
            auth.server_clock, auth.waits = clock, []
            for _ in range(2):
                client_clock.advance(EXPIRED)
                assert (await http.get("/auth/me", auth=auth)).status_code == 200
            client_clock.advance(EXPIRED)
            if max_wait >= 30:
                assert (await http.get("/auth/me", auth=auth)).status_code == 200
                assert auth.waits == [30.0]
                assert recorder.count("/auth/refresh") == 4
            else:
                with pytest.raises(RateLimited) as raised:
                    await http.get("/auth/me", auth=auth)
                assert raised.value.retry_after == 30.0
                assert auth.signed_in  # a 429 is no reason to forget the session
                assert auth.waits == []


# --- a real server, for the threads and the README -------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(app: Recorder) -> AsyncIterator[str]:
    """uvicorn on a free port of 127.0.0.1, in this test's event loop (where the issuer's pool lives)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def register_sync(url: str) -> None:
    response = httpx.post(f"{url}/auth/register", json={"email": EMAIL, "password": PASSWORD})
    assert response.status_code == 201, response.text


def readme_snippet() -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


async def test_the_readme_snippet_works(
    issuer: IssuerHarness, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    recorder = Recorder(issuer.app)
    async with serve(recorder) as url:
        source = readme_snippet().replace("https://issuer.example", url)
        await asyncio.to_thread(register_sync, url)
        outputs: list[str] = []

        def run() -> None:
            namespace: dict[str, object] = {"print": lambda *args: outputs.append(" ".join(map(str, args)))}
            exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 (running the README is the test)

        await asyncio.to_thread(run)  # first run: signs in, stores the refresh token
        stored = tmp_path / ".config" / "myapp" / "refresh-token"
        first = stored.read_text()
        assert stored.stat().st_mode & 0o077 == 0
        await asyncio.to_thread(run)  # second run: resumes from the stored token
        assert stored.read_text() != first
        assert recorder.count("/auth/login") == 1
        assert recorder.count("/auth/refresh") == 1
    assert outputs == [f"signed in as {EMAIL}"] * 2
