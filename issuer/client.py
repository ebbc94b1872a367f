"""An ``httpx.Auth`` for native apps, CLIs and services that sign in to the issuer with body transport.

It imports httpx and the standard library only (it ships in the base install, without the server)::

    auth = IssuerAuth.login("https://issuer.example", "ada@example.org", "a long passphrase", on_tokens=save)
    with httpx.Client(auth=auth) as http:
        http.get("https://api.example/orders")

What it does for every request sent through a client that uses it:

- adds ``Authorization: Bearer <access token>``;
- refreshes the access token shortly before it expires (``expires_in`` of the token response, counted on
  a monotonic clock from the moment the refresh or login was sent, minus ``refresh_margin``);
- on a 401 whose ``WWW-Authenticate`` says ``error="invalid_token"``, refreshes once if the failed request
  used the current token (if another task or thread refreshed meanwhile, it just takes the newer token),
  and retries the request once; a second 401 is returned to the caller, never looped on;
- shares one refresh among concurrent asyncio tasks (an asyncio lock) and threads (a threading lock): a
  refresh token is presented once, so with ``REFRESH_REUSE_GRACE=0`` a burst of requests on an expired
  token still costs one ``/auth/refresh``;
- hands every new token pair to ``on_tokens`` (to store the refresh token in a keychain or a file), and
  ``None`` when the session ends, so the stored token can be deleted;
- raises :class:`SignedOut` (and forgets the tokens) when the issuer answers the refresh with 401
  ``invalid_grant``: the session was revoked, expired or logged out; sign in again;
- waits out a 429 on refresh when its ``Retry-After`` is at most ``max_retry_wait`` seconds, else raises
  :class:`RateLimited`.

The refresh request is sent through the same client (it is yielded from the auth flow), so the client's
transport, proxies, TLS settings and timeouts apply to it, and no second connection pool exists. The
``User-Agent`` of the request that needed the refresh is copied onto it, so the issuer's session binding
sees the same program it saw at login.

One instance serves either sync clients (any number of threads) or async clients (any number of tasks on
one event loop at a time); the two locks do not exclude each other, so do not drive one instance from
both at the same moment.

A lost refresh response (a network error after the issuer rotated the token) keeps the old refresh token:
presenting it again within the issuer's ``REFRESH_REUSE_GRACE`` is answered as a benign replay. With a
grace of 0 the issuer counts it as reuse and revokes the session; the next refresh then raises
:class:`SignedOut`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.request import parse_http_list, parse_keqv_list

import httpx

__all__ = [
    "InvalidCredentials",
    "IssuerAuth",
    "IssuerError",
    "RateLimited",
    "SignedOut",
    "Tokens",
]


class IssuerError(Exception):
    """The issuer answered with an error (the contract's ``{"error", "error_description"}`` body)."""

    def __init__(self, message: str, *, status_code: int | None = None, error: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error


class SignedOut(IssuerError):
    """There is no usable session any more: sign in again. The tokens have been forgotten."""


class InvalidCredentials(IssuerError):
    """The email or the password is wrong (login answered 401 ``invalid_credentials``)."""


class RateLimited(IssuerError):
    """The issuer answered 429 and asked for a longer wait than this client is allowed to sleep."""

    def __init__(self, message: str, *, retry_after: float | None, status_code: int = 429) -> None:
        super().__init__(message, status_code=status_code, error="too_many_requests")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Tokens:
    """A token response: what ``on_tokens`` receives. Store ``refresh_token``; it is a bearer secret."""

    access_token: str
    refresh_token: str
    expires_in: int
    user: Mapping[str, Any]

    def __repr__(self) -> str:
        # Never print a secret into a log or a traceback.
        return f"Tokens(access_token='***', refresh_token='***', expires_in={self.expires_in}, user={self.user!r})"


TokenHook = Callable[[Tokens | None], None]


@dataclass(frozen=True)
class _Sleep:
    """A step of a refresh flow: wait this many seconds, then go on (the drivers sleep their own way)."""

    seconds: float


_Step = httpx.Request | _Sleep
_Steps = Generator[_Step, httpx.Response | None, None]


def _issuer_error(response: httpx.Response, what: str) -> IssuerError:
    error, description = _error_fields(response)
    message = f"{what} failed: {response.status_code} {error or 'error'}"
    if description:
        message += f": {description}"
    return IssuerError(message, status_code=response.status_code, error=error)


def _error_fields(response: httpx.Response) -> tuple[str | None, str | None]:
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    error, description = body.get("error"), body.get("error_description")
    return (error if isinstance(error, str) else None), (description if isinstance(description, str) else None)


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (RFC 9110 delay-seconds); the issuer never sends the HTTP-date form."""
    value = response.headers.get("retry-after", "").strip()
    if not value.isdigit():
        return None
    return float(value)


def _bearer_error(response: httpx.Response) -> str | None:
    """The ``error`` parameter of a ``WWW-Authenticate: Bearer ...`` challenge (RFC 6750 section 3)."""
    challenge = response.headers.get("www-authenticate", "")
    scheme, _, params = challenge.strip().partition(" ")
    if scheme.lower() != "bearer" or not params:
        return None
    try:
        return parse_keqv_list(parse_http_list(params)).get("error")
    except ValueError:
        return None


def _parse_tokens(response: httpx.Response) -> Tokens:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise IssuerError("The issuer's token response is not a JSON object.", status_code=response.status_code)
    access, refresh, expires_in, user = (
        body.get("access_token"),
        body.get("refresh_token"),
        body.get("expires_in"),
        body.get("user"),
    )
    if not isinstance(access, str) or not isinstance(refresh, str):
        # A cookie-transport answer has no refresh_token in the body: this client must ask for "body".
        raise IssuerError("The issuer's token response has no access_token or refresh_token in its body.")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise IssuerError("The issuer's token response has no positive integer expires_in.")
    return Tokens(access, refresh, expires_in, user if isinstance(user, dict) else {})


class IssuerAuth(httpx.Auth):
    """Bearer authentication with the issuer's rotating refresh tokens, for ``httpx.Client`` and
    ``httpx.AsyncClient``.

    Build it with :meth:`login` / :meth:`alogin`, or directly from a stored refresh token::

        auth = IssuerAuth("https://issuer.example", refresh_token=stored, on_tokens=save)

    (the first request then refreshes before it is sent). ``issuer`` is the issuer's base URL; the
    endpoints are the contract's ``/auth/refresh``, ``/auth/logout`` and ``/auth/logout-all`` under it.
    ``clock`` is a monotonic clock in seconds (tests pass a fake one).
    """

    # The request body is read before the flow starts, so that the single retry after a refresh can send
    # it again (a streaming upload could not be replayed).
    requires_request_body = True

    def __init__(
        self,
        issuer: str,
        *,
        refresh_token: str | None = None,
        access_token: str | None = None,
        expires_in: float | None = None,
        on_tokens: TokenHook | None = None,
        refresh_margin: float = 30.0,
        max_retry_wait: float = 10.0,
        max_retries: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        base = issuer.rstrip("/")
        self.issuer = base
        self.refresh_url = f"{base}/auth/refresh"
        self.logout_url = f"{base}/auth/logout"
        self.logout_all_url = f"{base}/auth/logout-all"
        self._on_tokens = on_tokens
        self._margin = refresh_margin
        self._max_retry_wait = max_retry_wait
        self._max_retries = max_retries
        self._clock = clock
        self._refresh_token = refresh_token
        self._access_token = access_token if refresh_token is not None else None
        # When the access token must be replaced (monotonic seconds); unknown means "refresh first".
        self._renew_at = self._renew_deadline(clock(), expires_in) if expires_in is not None else None
        self._thread_lock = threading.Lock()
        self._async_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self.user: Mapping[str, Any] = {}
        self.refresh_count = 0  # refreshes this instance completed; for metrics and tests

    # --- state -----------------------------------------------------------------------------------------

    @property
    def signed_in(self) -> bool:
        return self._refresh_token is not None

    @property
    def refresh_token(self) -> str | None:
        return self._refresh_token

    @property
    def access_token(self) -> str | None:
        return self._access_token

    def _renew_deadline(self, sent_at: float, expires_in: float) -> float:
        # A tenth of the lifetime at most, so that a short ACCESS_TOKEN_TTL still leaves most of it usable.
        return sent_at + expires_in - min(self._margin, expires_in / 10)

    def _usable_token(self) -> str | None:
        """The current access token unless it is missing or due for renewal."""
        if self._access_token is None or self._renew_at is None or self._clock() >= self._renew_at:
            return None
        return self._access_token

    def _accept(self, tokens: Tokens, sent_at: float) -> None:
        self._access_token = tokens.access_token
        self._refresh_token = tokens.refresh_token
        self._renew_at = self._renew_deadline(sent_at, tokens.expires_in)
        self.user = tokens.user
        if self._on_tokens is not None:
            self._on_tokens(tokens)

    def _forget(self) -> None:
        had_tokens = self._refresh_token is not None
        self._access_token = self._refresh_token = self._renew_at = None
        if had_tokens and self._on_tokens is not None:
            self._on_tokens(None)

    def _async_lock(self) -> asyncio.Lock:
        # An asyncio.Lock belongs to the loop it first waits on; an app that runs asyncio.run twice gets a
        # fresh lock in the new loop instead of a RuntimeError.
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            self._async_locks = {k: v for k, v in self._async_locks.items() if not k.is_closed()}
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    # --- the refresh, as a sequence of steps shared by the sync and async drivers -------------------------

    def _refresh_steps(self, user_agent: str | None) -> _Steps:
        """Present the current refresh token once; store the successor or raise. Runs under the lock."""
        presented = self._refresh_token
        if presented is None:
            raise SignedOut("Not signed in: log in again.")
        headers = {"User-Agent": user_agent} if user_agent else {}
        retries = 0
        while True:
            sent_at = self._clock()
            request = httpx.Request("POST", self.refresh_url, json={"refresh_token": presented}, headers=headers)
            response = yield request
            assert response is not None
            if response.status_code == 200:
                self.refresh_count += 1
                self._accept(_parse_tokens(response), sent_at)
                return
            if response.status_code == 429:
                wait = _retry_after(response)
                if wait is None or wait > self._max_retry_wait or retries >= self._max_retries:
                    raise RateLimited(f"Refresh was rate limited (Retry-After: {wait}).", retry_after=wait)
                retries += 1
                yield _Sleep(wait)
                continue
            error, description = _error_fields(response)
            if response.status_code in (400, 401) and error == "invalid_grant":
                self._forget()
                raise SignedOut(
                    f"The session has ended ({description or error}): log in again.",
                    status_code=response.status_code,
                    error=error,
                )
            # A 5xx or anything unexpected: keep the tokens (the session may well be alive) and report.
            raise _issuer_error(response, "Refresh")

    # --- the flows httpx drives --------------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.requires_request_body:
            request.read()
        user_agent = request.headers.get("user-agent")
        token = self._usable_token()
        if token is None:
            with self._thread_lock:
                token = self._usable_token()
                if token is None:
                    yield from self._refresh_sync(user_agent)
                    token = self._current_or_signed_out()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401 or _bearer_error(response) != "invalid_token":
            return
        with self._thread_lock:
            # Only the token the failed request carried is refreshed; a thread that finds a newer one
            # (another thread refreshed while this request was in flight) retries with it.
            if self._access_token == token:
                yield from self._refresh_sync(user_agent)
            retry_token = self._current_or_signed_out()
        request.headers["Authorization"] = f"Bearer {retry_token}"
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self.requires_request_body:
            await request.aread()
        user_agent = request.headers.get("user-agent")
        token = self._usable_token()
        if token is None:
            async with self._async_lock():
                token = self._usable_token()
                if token is None:
                    steps = self._refresh_steps(user_agent)
                    pending = await self._advance_async(steps, None)
                    while pending is not None:
                        answer = yield pending
                        await answer.aread()
                        pending = await self._advance_async(steps, answer)
                    token = self._current_or_signed_out()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401 or _bearer_error(response) != "invalid_token":
            return
        async with self._async_lock():
            # As in sync_auth_flow: refresh only the token that failed, else retry with the newer one.
            if self._access_token == token:
                steps = self._refresh_steps(user_agent)
                pending = await self._advance_async(steps, None)
                while pending is not None:
                    answer = yield pending
                    await answer.aread()
                    pending = await self._advance_async(steps, answer)
            retry_token = self._current_or_signed_out()
        request.headers["Authorization"] = f"Bearer {retry_token}"
        yield request

    def _refresh_sync(self, user_agent: str | None) -> Generator[httpx.Request, httpx.Response, None]:
        steps = self._refresh_steps(user_agent)
        pending = self._advance_sync(steps, None)
        while pending is not None:
            answer = yield pending
            answer.read()
            pending = self._advance_sync(steps, answer)

    def _advance_sync(self, steps: _Steps, answer: httpx.Response | None) -> httpx.Request | None:
        """The next request of a refresh, after sleeping through any waits; None when it is done."""
        try:
            step = steps.send(answer)
            while isinstance(step, _Sleep):
                self.sleep(step.seconds)
                step = steps.send(None)
        except StopIteration:
            return None
        return step

    async def _advance_async(self, steps: _Steps, answer: httpx.Response | None) -> httpx.Request | None:
        """:meth:`_advance_sync` for the async flow (an async generator cannot ``yield from``)."""
        try:
            step = steps.send(answer)
            while isinstance(step, _Sleep):
                await self.async_sleep(step.seconds)
                step = steps.send(None)
        except StopIteration:
            return None
        return step

    def _current_or_signed_out(self) -> str:
        if self._access_token is None:
            raise SignedOut("Not signed in: log in again.")
        return self._access_token

    def sleep(self, seconds: float) -> None:
        """How the sync flow waits out a 429 (a method so that tests can move a fake clock instead)."""
        time.sleep(seconds)

    async def async_sleep(self, seconds: float) -> None:
        """How the async flow waits out a 429."""
        await asyncio.sleep(seconds)

    # --- signing in and out ------------------------------------------------------------------------------

    @classmethod
    def login(
        cls,
        issuer: str,
        email: str,
        password: str,
        *,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> IssuerAuth:
        """Sign in with email and password (body transport) and return an auth holding the new session.

        ``options`` are the constructor's (``on_tokens``, ``refresh_margin``, ...); ``on_tokens`` receives
        the first token pair. Raises :class:`InvalidCredentials`, :class:`RateLimited` (the issuer's
        per-account back-off: its ``retry_after`` says when to try again) or :class:`IssuerError`.
        """
        auth = cls(issuer, clock=clock, **options)
        request = auth._login_request(email, password)
        sent_at = clock()
        if client is None:
            with httpx.Client() as own:
                response = own.send(request)
        else:
            response = client.send(request)
        auth._finish_login(response, sent_at)
        return auth

    @classmethod
    async def alogin(
        cls,
        issuer: str,
        email: str,
        password: str,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> IssuerAuth:
        """:meth:`login` for asyncio."""
        auth = cls(issuer, clock=clock, **options)
        request = auth._login_request(email, password)
        sent_at = clock()
        if client is None:
            async with httpx.AsyncClient() as own:
                response = await own.send(request)
        else:
            response = await client.send(request)
        auth._finish_login(response, sent_at)
        return auth

    def _login_request(self, email: str, password: str) -> httpx.Request:
        body = {"email": email, "password": password, "token_transport": "body"}
        return httpx.Request("POST", f"{self.issuer}/auth/login", json=body)

    def _finish_login(self, response: httpx.Response, sent_at: float) -> None:
        # Login is not retried on 429: the issuer's back-off after failed passwords can be long, and a
        # person (or the calling program) should decide whether to wait.
        if response.status_code == 200:
            self._accept(_parse_tokens(response), sent_at)
            return
        error, description = _error_fields(response)
        if response.status_code == 401:
            raise InvalidCredentials(description or "Wrong email or password.", status_code=401, error=error)
        if response.status_code == 429:
            wait = _retry_after(response)
            raise RateLimited(f"Login was rate limited (Retry-After: {wait}).", retry_after=wait)
        raise _issuer_error(response, "Login")

    def logout(self, client: httpx.Client | None = None) -> None:
        """End this session at the issuer (``/auth/logout``) and forget the tokens (``on_tokens(None)``).

        The tokens are forgotten even if the request fails; the error is raised so the app can tell the
        user that the session may still be alive on the server until it expires.
        """
        with self._thread_lock:
            presented = self._refresh_token
            if presented is None:
                return
            try:
                request = self._logout_request(presented)
                if client is None:
                    with httpx.Client() as own:
                        response = own.send(request)
                else:
                    response = client.send(request)
                self._check_logout(response, "Logout")
            finally:
                self._forget()

    async def alogout(self, client: httpx.AsyncClient | None = None) -> None:
        """:meth:`logout` for asyncio."""
        async with self._async_lock():
            presented = self._refresh_token
            if presented is None:
                return
            try:
                request = self._logout_request(presented)
                if client is None:
                    async with httpx.AsyncClient() as own:
                        response = await own.send(request)
                else:
                    response = await client.send(request)
                self._check_logout(response, "Logout")
            finally:
                self._forget()

    def logout_all(self, client: httpx.Client | None = None) -> None:
        """End every session of this user (``/auth/logout-all``, Bearer) and forget the tokens."""
        try:
            if client is None:
                with httpx.Client() as own:
                    response = own.post(self.logout_all_url, auth=self)
            else:
                response = client.post(self.logout_all_url, auth=self)
            self._check_logout(response, "Logout everywhere")
        finally:
            with self._thread_lock:
                self._forget()

    async def alogout_all(self, client: httpx.AsyncClient | None = None) -> None:
        """:meth:`logout_all` for asyncio."""
        try:
            if client is None:
                async with httpx.AsyncClient() as own:
                    response = await own.post(self.logout_all_url, auth=self)
            else:
                response = await client.post(self.logout_all_url, auth=self)
            self._check_logout(response, "Logout everywhere")
        finally:
            async with self._async_lock():
                self._forget()

    def _logout_request(self, presented: str) -> httpx.Request:
        return httpx.Request("POST", self.logout_url, json={"refresh_token": presented})

    @staticmethod
    def _check_logout(response: httpx.Response, what: str) -> None:
        if response.status_code != 204:
            raise _issuer_error(response, what)
