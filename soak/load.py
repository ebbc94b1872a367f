"""Virtual users and probes, each on its own loopback address, every response recorded with its times.

A user registers, then loops: log in (body transport), refresh a few times with two "tabs" presenting the
same refresh token at once (both must get the same successor), call /auth/me, and end the session one of
four ways: logout, DELETE /auth/sessions/{id}, logout-all, or leave it live. After a revoke it presents the
dead refresh token again (and, after logout-all, the old access token and every earlier live session),
so that a revoked session or version that still yields a token shows up in the records.

A 503 or a broken connection is retried after a short pause, as a client honouring Retry-After would: a
refresh retried inside the grace window gets the same successor. Nothing here judges a response; the
checks in ``soak.checks`` read the records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc import jws

PASSWORD = "soak password 1"  # noqa: S105 (a test account's password)
RETRY_PAUSE = 0.25
MAX_ATTEMPTS = 40  # 10 s of retries: longer than every fault window


@dataclass
class Record:
    """One HTTP exchange as the client saw it (times are epoch seconds of this machine's clock, the same
    clock PostgreSQL's timestamps use here)."""

    kind: str
    user: str
    sent: float
    received: float
    status: int | None  # None: no HTTP answer (the exception class is in ``error``)
    replica: str | None
    error: str | None = None  # the body's "error", or the transport exception's class
    description: str | None = None
    contract_error: bool = False  # the body is the contract's {"error", "error_description"}
    family: str | None = None
    presented: str | None = None  # SHA-256 of the refresh token sent
    presented_kid: str | None = None  # of the access token sent
    presented_version: int | None = None
    issued: str | None = None  # SHA-256 of the refresh token received
    issued_kid: str | None = None  # of the access token received
    issued_version: int | None = None
    issued_family: str | None = None


@dataclass
class Recorder:
    records: list[Record] = field(default_factory=list)

    def add(self, record: Record) -> None:
        self.records.append(record)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def access_parts(token: str) -> tuple[str | None, dict[str, Any]]:
    """The kid and claims of one of our access tokens (for the records; nothing is trusted from them)."""
    compact = jws.extract_compact(token.encode())
    kid = compact.headers().get("kid")
    claims = json.loads(compact.payload)
    return (kid if isinstance(kid, str) else None), claims


@dataclass
class Session:
    family: str
    refresh_token: str
    access_token: str


class Client:
    """One address's HTTP client and its recording."""

    def __init__(self, name: str, address: str, base_url: str, recorder: Recorder) -> None:
        self.name = name
        self.address = address
        self.recorder = recorder
        transport = httpx.AsyncHTTPTransport(local_address=address, retries=0)
        self.http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=15.0)

    async def close(self) -> None:
        await self.http.aclose()

    async def call(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        family: str | None = None,
    ) -> httpx.Response | None:
        """One request, recorded; None when no HTTP answer came back."""
        headers = {"authorization": f"Bearer {access_token}"} if access_token else {}
        record = Record(kind, self.name, 0.0, 0.0, None, None, family=family)
        if refresh_token is not None:
            record.presented = token_hash(refresh_token)
        if access_token is not None:
            record.presented_kid, claims = access_parts(access_token)
            record.presented_version = claims.get("tokenVersion")
            record.family = record.family or claims.get("sid")
        record.sent = time.time()
        try:
            response = await self.http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            record.received = time.time()
            record.error = type(exc).__name__
            self.recorder.add(record)
            return None
        record.received = time.time()
        record.status = response.status_code
        record.replica = response.headers.get("x-soak-replica")
        _read_body(record, response)
        self.recorder.add(record)
        return response

    async def retried(self, kind: str, method: str, path: str, **options: Any) -> httpx.Response | None:
        """``call`` until it gets an answer other than 503 (a fault window), at most MAX_ATTEMPTS times."""
        response = None
        for _ in range(MAX_ATTEMPTS):
            response = await self.call(kind, method, path, **options)
            if response is not None and response.status_code != 503:
                return response
            await asyncio.sleep(RETRY_PAUSE)
        return response


def _read_body(record: Record, response: httpx.Response) -> None:
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return
    if response.status_code >= 400:
        record.error = body.get("error") if isinstance(body.get("error"), str) else None
        record.description = body.get("error_description")
        record.contract_error = set(body) == {"error", "error_description"} and all(
            isinstance(v, str) for v in body.values()
        )
        return
    refresh, access = body.get("refresh_token"), body.get("access_token")
    if isinstance(refresh, str):
        record.issued = token_hash(refresh)
    if isinstance(access, str):
        record.issued_kid, claims = access_parts(access)
        record.issued_version = claims.get("tokenVersion")
        record.issued_family = claims.get("sid")


class VirtualUser(Client):
    def __init__(self, index: int, address: str, base_url: str, recorder: Recorder, seed: int) -> None:
        super().__init__(f"user{index}", address, base_url, recorder)
        self.email = f"user{index}-{seed}@soak.example"
        self.random = random.Random(seed * 1000 + index)  # noqa: S311 (a schedule, not a secret)
        self.live: list[Session] = []  # sessions left alive, revoked by a later logout-all
        self.current: Session | None = None

    async def run(self, until: float) -> None:
        await self.retried("register", "POST", "/auth/register", body={"email": self.email, "password": PASSWORD})
        while time.time() < until:
            session = await self.login()
            if session is None:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self.current = session
            for _ in range(self.random.randint(2, 6)):
                if time.time() >= until or not await self.refresh_in_two_tabs(session):
                    break
                await self.retried("me", "GET", "/auth/me", access_token=session.access_token)
                await asyncio.sleep(self.random.uniform(0.2, 0.6))
            await self.end(session)

    async def login(self) -> Session | None:
        body = {"email": self.email, "password": PASSWORD, "token_transport": "body"}
        response = await self.retried("login", "POST", "/auth/login", body=body)
        if response is None or response.status_code != 200:
            return None
        tokens = response.json()
        _, claims = access_parts(tokens["access_token"])
        return Session(claims["sid"], tokens["refresh_token"], tokens["access_token"])

    async def refresh(self, session: Session, token: str) -> httpx.Response | None:
        return await self.retried(
            "refresh",
            "POST",
            "/auth/refresh",
            body={"refresh_token": token},
            refresh_token=token,
            family=session.family,
        )

    async def refresh_in_two_tabs(self, session: Session) -> bool:
        """Both tabs present the same token at once; the session goes on with the successor."""
        token = session.refresh_token
        answers = await asyncio.gather(self.refresh(session, token), self.refresh(session, token))
        for response in answers:
            if response is not None and response.status_code == 200:
                tokens = response.json()
                session.refresh_token, session.access_token = tokens["refresh_token"], tokens["access_token"]
                return True
        return False

    async def end(self, session: Session) -> None:
        draw = self.random.random()
        if draw < 0.3:
            response = await self.retried(
                "logout", "POST", "/auth/logout", body={"refresh_token": session.refresh_token}, family=session.family
            )
            if response is not None and response.status_code == 204:
                await self.refresh(session, session.refresh_token)  # must be refused
        elif draw < 0.55:
            response = await self.retried(
                "delete_session", "DELETE", f"/auth/sessions/{session.family}", access_token=session.access_token
            )
            if response is not None and response.status_code == 204:
                await self.refresh(session, session.refresh_token)
        elif draw < 0.65:
            response = await self.retried("logout_all", "POST", "/auth/logout-all", access_token=session.access_token)
            if response is not None and response.status_code == 204:
                await self.retried("me", "GET", "/auth/me", access_token=session.access_token)  # old version
                for earlier in [session, *self.live]:
                    await self.refresh(earlier, earlier.refresh_token)
                self.live = []
        else:
            self.live.append(session)


def address(block: int, index: int) -> str:
    """A loopback address of its own for each client: 127.<block>.<index // 250>.<index % 250 + 1>."""
    return f"127.{block}.{index // 250}.{index % 250 + 1}"
