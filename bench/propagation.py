"""Revocation propagation (issue 17): how fast a revocation reaches verifiers that follow the feed, a late
verifier catching up with a flood, and what following the feed costs the refresh and login figures.

Run by ``bench.run`` after the other figures (``measure``), or alone: ``python -m bench.propagation``.

1. **Propagation.** The issuer (``issuer serve``, 1 worker, ``REFRESH_REUSE_GRACE=0`` so that a repeat is
   reuse) and ``FOLLOWERS`` verifiers in this process, each an ``AccessTokenVerifier`` with its own
   ``RevocationFeed`` and its own HTTP connections on loopback. ``EVENTS_PER_KIND`` revocations of each kind
   (logout-all, session delete, account deletion, reuse detection, logout, RFC 7009), one at a time in a
   shuffled order: the tokens are prepared first (logins), every verifier accepts the token, the revoking
   request is sent, and from its answer each verifier's ``verify`` is polled every millisecond until it
   refuses the token as ``revoked``. A delay is one (event, verifier) pair; an event's delay is its slowest
   verifier's. Target: p99 under 2 s.
2. **Events on vs off.** The refresh and the login figures on one issuer, each in rounds taken in turn
   (``bench.wrk.interleaved``): with a verifier long-polling the feed and ``BACKGROUND_RATE`` logouts per
   second in the background (a thread of this process), and without. Target: on >= 0.95x of off.
3. **A flood.** ``QUEUED`` revocation events appended with the storage layer's ``events.append`` (1,000 per
   transaction), then a verifier that starts late: the time until its first sync (``moreAvailable`` false)
   for a client whose SETs the issuer has not signed yet (every SET costs the issuer an RSA signature) and for
   a second verifier of the same client (the issuer's SET cache), the issuer's ``/healthz`` latency meanwhile
   (signing blocks its event loop), and the late verifier's memory (``tracemalloc``, the second run: peak
   while catching up, and what it keeps).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from bench import servers, wrk
from issuer.storage import events
from issuer.storage.database import Database
from issuer.verifier import AccessTokenVerifier, RevocationFeed, Revoked

if TYPE_CHECKING:
    from bench.run import Bench

FOLLOWERS = 4
EVENTS_PER_KIND = 40  # six kinds: 240 events, 960 (event, verifier) delays
QUEUED = 10_000
BACKGROUND_RATE = 10.0  # revocations per second while the "events on" figures run
TARGET_P99_S = 2.0
REFUSAL_BOUND = 30.0  # an event not refused by then is counted as lost (and fails the figure)
PASSWORD = "correct horse battery staple"  # noqa: S105  # the bench accounts' (bench.run.PASSWORD)
KINDS = ("logout-all", "session delete", "account deletion", "reuse detection", "logout", "RFC 7009")


class Comparison(NamedTuple):
    """A throughput figure against its baseline, in the order of ``bench.run.Row``'s fields."""

    name: str
    what: str
    result: dict[str, Any]
    baseline_name: str
    baseline: dict[str, Any]
    target: float | None


@dataclass
class Measured:
    comparisons: list[Comparison] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- wiring


@contextlib.contextmanager
def issuer_server(bench: Bench) -> Iterator[tuple[str, int]]:
    """``issuer serve`` on 1 worker on the bench database, with every repeat of a refresh token counted as reuse."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**bench.env, "ISSUER_URL": url, "REFRESH_REUSE_GRACE": "0"}
    with servers.serving(servers.issuer_command(port, 1), env, f"{url}/readyz", bench.log) as group:
        yield url, group


def add_client(bench: Bench, url: str, name: str, scopes: str) -> tuple[str, str]:
    """``issuer clients add`` (the operator's way): the new client's id and secret."""
    out = subprocess.run(  # noqa: S603  # the project's own console script on fixed arguments
        [str(servers.BIN / "issuer"), "clients", "add", name, "--scope", scopes],
        env={**bench.env, "ISSUER_URL": url, "PATH": str(servers.BIN)},
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(out.stdout.strip().splitlines()[-1])
    return created["client_id"], created["client_secret"]


@contextlib.asynccontextmanager
async def followers(
    url: str, client: tuple[str, str], count: int, **feed_options: Any
) -> AsyncIterator[list[AccessTokenVerifier]]:
    """``count`` verifiers following the feed as ``client``, each on its own connections; synchronised."""
    async with contextlib.AsyncExitStack() as stack:
        verifiers = []
        for _ in range(count):
            feed = RevocationFeed(*client, **feed_options)
            verifier = AccessTokenVerifier(issuer=url, audience="api", events=feed)
            await stack.enter_async_context(verifier.lifespan())
            if not verifier.ready:
                raise SystemExit(f"propagation: a verifier did not synchronise: {verifier.status()}")
            verifiers.append(verifier)
        yield verifiers


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# ---------------------------------------------------------------- 1. propagation


@dataclass
class Prepared:
    kind: str
    token: str  # the access token the revocation must kill
    revoke: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
    status: int


async def _register(http: httpx.AsyncClient, email: str) -> None:
    response = await http.post("/auth/register", json={"email": email, "password": PASSWORD})
    if response.status_code not in (201, 409):
        raise SystemExit(f"propagation: register answered {response.status_code}: {response.text}")


async def _login(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    response = await http.post("/auth/login", json={"email": email, "password": PASSWORD, "token_transport": "body"})
    response.raise_for_status()
    tokens: dict[str, Any] = response.json()
    return tokens


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sid(access_token: str) -> str:
    """The ``sid`` claim, read without verifying (the issuer minted it; the harness only needs the id)."""
    payload = access_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sid: str = claims["sid"]
    return sid


async def _prepare(http: httpx.AsyncClient, kind: str, number: int, run: str, revoker: tuple[str, str]) -> Prepared:
    """Tokens for one revocation of ``kind``; logout-all and deletion get a user of their own per event."""
    shared = f"propagation-{run}@example.com"
    if kind == "logout-all":
        email = f"propagation-{run}-all-{number}@example.com"
        await _register(http, email)
        token = (await _login(http, email))["access_token"]
        return Prepared(kind, token, lambda h: h.post("/auth/logout-all", headers=_bearer(token)), 204)
    if kind == "account deletion":
        email = f"propagation-{run}-gone-{number}@example.com"
        await _register(http, email)
        token = (await _login(http, email))["access_token"]
        body = {"password": PASSWORD}
        return Prepared(
            kind, token, lambda h: h.request("DELETE", "/auth/account", json=body, headers=_bearer(token)), 204
        )
    tokens = await _login(http, shared)
    token, refresh = tokens["access_token"], tokens["refresh_token"]
    if kind == "session delete":
        caller = (await _login(http, shared))["access_token"]
        path = f"/auth/sessions/{_sid(token)}"
        return Prepared(kind, token, lambda h: h.delete(path, headers=_bearer(caller)), 204)
    if kind == "reuse detection":
        rotated = await http.post("/auth/refresh", json={"refresh_token": refresh})
        rotated.raise_for_status()
        return Prepared(kind, token, lambda h: h.post("/auth/refresh", json={"refresh_token": refresh}), 401)
    if kind == "logout":
        return Prepared(kind, token, lambda h: h.post("/auth/logout", json={"refresh_token": refresh}), 204)
    assert kind == "RFC 7009"
    auth = httpx.BasicAuth(*revoker)
    form = {"token": refresh, "token_type_hint": "refresh_token"}
    return Prepared(kind, token, lambda h: h.post("/oauth2/revoke", data=form, auth=auth), 200)


async def _refused_after(verifier: AccessTokenVerifier, token: str, answered: float) -> float:
    async with asyncio.timeout(REFUSAL_BOUND):
        while True:
            try:
                await verifier.verify(token)
            except Revoked:
                return time.perf_counter() - answered
            await asyncio.sleep(0.001)


async def propagation(url: str, feed_client: tuple[str, str], revoker: tuple[str, str]) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    plan = [kind for kind in KINDS for _ in range(EVENTS_PER_KIND)]
    random.Random(17).shuffle(plan)  # noqa: S311  # a fixed order of kinds, not a secret
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _register(http, f"propagation-{run}@example.com")
        control = (await _login(http, f"propagation-{run}@example.com"))["access_token"]
        prepare_started = time.perf_counter()
        gate = asyncio.Semaphore(4)  # logins hash on every core; a few in flight keep them busy

        async def prepared(number: int, kind: str) -> Prepared:
            async with gate:
                return await _prepare(http, kind, number, run, revoker)

        prepared_all = await asyncio.gather(*(prepared(number, kind) for number, kind in enumerate(plan)))
        prepare_s = time.perf_counter() - prepare_started
        by_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
        per_event: list[float] = []
        samples: list[float] = []
        async with followers(url, feed_client, FOLLOWERS) as verifiers:
            for event in prepared_all:
                for verifier in verifiers:
                    await verifier.verify(event.token)  # accepted before
                response = await event.revoke(http)
                answered = time.perf_counter()
                if response.status_code != event.status:
                    raise SystemExit(f"propagation: {event.kind} answered {response.status_code}: {response.text}")
                try:
                    delays = await asyncio.gather(*(_refused_after(v, event.token, answered) for v in verifiers))
                except TimeoutError:
                    raise SystemExit(f"propagation: a {event.kind} was not refused within {REFUSAL_BOUND} s") from None
                samples.extend(delays)
                per_event.append(max(delays))
                by_kind[event.kind].append(max(delays))
                await asyncio.sleep(random.uniform(0.01, 0.05))  # noqa: S311  # spacing, not a secret
            for verifier in verifiers:
                await verifier.verify(control)  # a session nothing revoked is still accepted
            status = [verifier.status()["events"] for verifier in verifiers]
    if any(one["errors"] or one["sets_refused"] for one in status):
        raise SystemExit(f"propagation: a follower had errors: {status}")
    result: dict[str, Any] = {
        "events": len(per_event),
        "followers": FOLLOWERS,
        "prepare_s": round(prepare_s, 1),
        "every_verifier": _spread(per_event),
        "each_verifier": _spread(samples),
        "by_kind": {kind: _spread(values) for kind, values in by_kind.items()},
        "target_p99_ms": TARGET_P99_S * 1000,
        "meets_target": percentile(per_event, 99) < TARGET_P99_S,
    }
    every = result["every_verifier"]
    print(
        f"  propagation: {len(per_event)} events, {FOLLOWERS} verifiers: every verifier refused after "
        f"p50 {every['p50_ms']} ms, p99 {every['p99_ms']} ms, max {every['max_ms']} ms "
        f"(each verifier: p50 {result['each_verifier']['p50_ms']} ms, p99 {result['each_verifier']['p99_ms']} ms)"
    )
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_ms": _ms(percentile(values, 50)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(max(values)),
        "mean_ms": _ms(statistics.fmean(values)),
    }


# ---------------------------------------------------------------- 2. events on vs off


class Background:
    """A verifier long-polling the feed and ``rate`` logouts per second, on a thread with its own event loop,
    while the block runs."""

    def __init__(self, url: str, client: tuple[str, str], tokens: list[str], rate: float) -> None:
        self.url, self.client, self.tokens, self.rate = url, client, tokens, rate
        self.revoked = 0
        self.applied = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bench-events-background", daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            self._stop.set()
            raise SystemExit(f"propagation: the background follower did not start: {self._error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._error is not None:
            raise SystemExit(f"propagation: the background failed: {self._error!r}")

    def _main(self) -> None:
        try:
            asyncio.run(self._go())
        except BaseException as exc:  # reported to the main thread
            self._error = exc
            self._ready.set()

    async def _go(self) -> None:
        async with (
            followers(self.url, self.client, 1) as (verifier,),
            httpx.AsyncClient(base_url=self.url, timeout=30) as http,
        ):
            self._ready.set()
            started = time.monotonic()
            while not self._stop.is_set() and self.tokens:
                due = started + self.revoked / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                response = await http.post("/auth/logout", json={"refresh_token": self.tokens.pop()})
                response.raise_for_status()
                self.revoked += 1
            await asyncio.sleep(0.2)  # the last ones' SETs
            assert verifier.events is not None
            self.applied = verifier.events.stats.sets_applied


def on_off(bench: Bench, url: str, group: int, client: tuple[str, str], logins: Path) -> list[Comparison]:
    from bench.run import LOGIN_CONNECTIONS, LOGIN_ROUND_SECONDS, LOGIN_ROUNDS, Server

    server = Server(url, group)
    background: list[Background] = []
    longest = max(bench.warmup, bench.seconds // bench.rounds, LOGIN_ROUND_SECONDS)

    def with_events(run_once: Callable[[], wrk.LoadResult]) -> wrk.LoadResult:
        # Enough sessions for the longest run; the bench user's, seeded through the storage layer.
        tokens = bench.seed_refresh_tokens(int(BACKGROUND_RATE * (longest + 5)))
        sessions = tokens.read_text().split()
        with Background(url, client, sessions, BACKGROUND_RATE) as running:
            result = run_once()
        background.append(running)
        return result

    def refresh(seconds: int) -> wrk.LoadResult:
        bench.vacuum()
        chains = bench.seed_refresh_tokens(bench.connections * 4)
        return bench.requests(server, "/auth/refresh", wrk.REFRESH, chains)(seconds)

    def refresh_on(seconds: int) -> wrk.LoadResult:
        return with_events(lambda: refresh(seconds))

    def login(seconds: int) -> wrk.LoadResult:
        return bench.requests(server, "/auth/login", wrk.LOGIN, logins, LOGIN_CONNECTIONS)(seconds)

    def login_on(seconds: int) -> wrk.LoadResult:
        return with_events(lambda: login(seconds))

    figures = bench.interleaved({"refresh, events on": refresh_on, "refresh, events off": refresh})
    figures |= bench.interleaved(
        {"login, events on": login_on, "login, events off": login}, seconds=LOGIN_ROUND_SECONDS, rounds=LOGIN_ROUNDS
    )
    revoked = sum(one.revoked for one in background)
    applied = sum(one.applied for one in background)
    print(f"  events on: {revoked} logouts in the background, {applied} SETs applied by the follower")
    what = f"with a verifier long-polling the feed and {BACKGROUND_RATE:.0f} logouts/s"
    return [
        Comparison(
            "refresh_events_on",
            f"POST /auth/refresh, 1 worker, {what}",
            figures["refresh, events on"],
            "the same, events off",
            figures["refresh, events off"],
            0.95,
        ),
        Comparison(
            "login_events_on",
            f"POST /auth/login, 1 worker, {what}",
            figures["login, events on"],
            "the same, events off",
            figures["login, events off"],
            0.95,
        ),
    ]


# ---------------------------------------------------------------- 3. a flood, and a verifier starting late


async def queue_events(dsn: str, count: int) -> float:
    """``count`` events appended as the revocations do (``events.append``), 1,000 per transaction; seconds."""
    db = Database(dsn, size=2)
    kinds = [events.SESSION_REVOKED] * 8 + [events.USER_REVOKED, events.ACCOUNT_PURGED]
    started = time.perf_counter()
    try:
        for first in range(0, count, 1000):
            async with db.transaction() as tx:
                for number in range(first, min(count, first + 1000)):
                    kind = kinds[number % len(kinds)]
                    event = events.Event(
                        id=str(uuid.uuid4()),
                        occurred_at=datetime.now(UTC),
                        kind=kind,
                        user_id=str(uuid.uuid4()),
                        session_id=str(uuid.uuid4()) if kind == events.SESSION_REVOKED else None,
                        token_version=number + 1 if kind == events.USER_REVOKED else None,
                        reason="bench",
                    )
                    await events.append(tx, event)
    finally:
        await db.close()
    return time.perf_counter() - started


async def catch_up(url: str, client: tuple[str, str], *, traced: bool, max_events: int = 100) -> dict[str, Any]:
    """A verifier started after the flood (``maxEvents`` ``max_events``, the feed's default 100): seconds to its
    first sync, what it keeps, and the issuer's ``/healthz`` latency meanwhile; with ``traced``, its memory by
    ``tracemalloc`` (which slows it down)."""
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        # On a thread of its own: on the harness's event loop it would also wait for the SETs being verified.
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                sent = time.perf_counter()
                http.get(f"{url}/healthz").raise_for_status()
                probes.append(time.perf_counter() - sent)
                done.wait(0.02)

    prober = threading.Thread(target=probe, name="bench-healthz-probe", daemon=True)
    prober.start()
    if traced:
        tracemalloc.start()
    try:
        started = time.perf_counter()
        feed = RevocationFeed(*client, startup_wait=600, max_events=max_events)
        verifier = AccessTokenVerifier(issuer=url, audience="api", events=feed)
        async with verifier.lifespan():
            seconds = time.perf_counter() - started
            status = feed.status()
            memory = tracemalloc.get_traced_memory() if traced else None
    finally:
        if traced:
            tracemalloc.stop()
        done.set()
        prober.join(30)
    if not status["synced"] or status["errors"]:
        raise SystemExit(f"propagation: the late verifier did not catch up cleanly: {status}")
    result: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "sets_applied": status["sets_applied"],
        "entries": status["entries"],
        "evictions": status["evictions"],
        "polls": status["polls"],
        "healthz_p50_ms": _ms(percentile(probes, 50)),
        "healthz_max_ms": _ms(max(probes)),
    }
    if memory is not None:
        current, peak = memory
        result["traced_kib"] = {"kept": round(current / 1024), "peak": round(peak / 1024)}
    return result


def flood(bench: Bench, url: str) -> dict[str, Any]:
    queued_s = asyncio.run(queue_events(bench.pg_dsn, QUEUED))
    print(f"  flood: {QUEUED:,} events appended in {queued_s:.1f} s")
    cold_client = add_client(bench, url, "late-verifier", "events")
    cold = asyncio.run(catch_up(url, cold_client, traced=False))
    print(
        f"  late verifier, SETs not yet signed: caught up in {cold['seconds']} s ({cold['sets_applied']:,} SETs, "
        f"{cold['polls']} polls, {cold['entries']:,} entries); issuer /healthz meanwhile p50 "
        f"{cold['healthz_p50_ms']} ms, max {cold['healthz_max_ms']} ms"
    )
    warm = asyncio.run(catch_up(url, cold_client, traced=True))
    print(
        f"  a second late verifier of that client (SETs cached at the issuer; tracemalloc on): {warm['seconds']} s, "
        f"{warm['traced_kib']['peak']:,} KiB peak, {warm['traced_kib']['kept']:,} KiB kept"
    )
    # The same with maxEvents 1000: ten times fewer polls, but each signs 1,000 SETs on the issuer's event loop.
    large = asyncio.run(
        catch_up(url, add_client(bench, url, "late-verifier-1000", "events"), traced=False, max_events=1000)
    )
    print(
        f"  late verifier, maxEvents 1000, SETs not yet signed: {large['seconds']} s ({large['polls']} polls); "
        f"issuer /healthz meanwhile p50 {large['healthz_p50_ms']} ms, max {large['healthz_max_ms']} ms"
    )
    return {"queued": QUEUED, "queue_s": round(queued_s, 2), "cold": cold, "warm_traced": warm, "cold_1000": large}


# ---------------------------------------------------------------- together


def measure(bench: Bench, logins: Path) -> Measured:
    """Every figure of this module, on its own issuer on the bench database (whose accounts ``bench.run.prepare``
    made); the flood last, so that the other figures run on a short feed."""
    measured = Measured()
    with issuer_server(bench) as (url, group):
        feed_client = add_client(bench, url, "propagation", "events")
        revoker = add_client(bench, url, "propagation-revoker", "revoke")
        measured.summary["propagation"] = asyncio.run(propagation(url, feed_client, revoker))
        measured.comparisons = on_off(bench, url, group, feed_client, logins)
        measured.summary["flood"] = flood(bench, url)
    return measured


def text(summary: dict[str, Any]) -> str:
    """The propagation and flood figures as the lines ``bench.run.report`` prints and writes."""
    lines = []
    result = summary.get("propagation")
    if result:
        every, each = result["every_verifier"], result["each_verifier"]
        met = "yes" if result["meets_target"] else "NO"
        lines.append(
            f"Revocation propagation ({result['events']} events, {result['followers']} verifiers following the feed, "
            f"loopback), from the revoking answer until every verifier refuses: p50 {every['p50_ms']} ms, "
            f"p99 {every['p99_ms']} ms, max {every['max_ms']} ms (each verifier: p50 {each['p50_ms']} ms, "
            f"p99 {each['p99_ms']} ms); target p99 < {TARGET_P99_S:.0f} s: {met}. By kind, p50/p99 ms: "
            + ", ".join(f"{kind} {v['p50_ms']}/{v['p99_ms']}" for kind, v in result["by_kind"].items())
            + "."
        )
    load = summary.get("flood")
    if load:
        cold, warm = load["cold"], load["warm_traced"]
        lines.append(
            f"A verifier starting after {load['queued']:,} queued revocations caught up in {cold['seconds']} s "
            f"({cold['polls']} polls, {cold['entries']:,} entries; the issuer signing every SET: its /healthz "
            f"p50 {cold['healthz_p50_ms']} ms, max {cold['healthz_max_ms']} ms meanwhile); a second one of the "
            f"same client (SETs cached) in {warm['seconds']} s under tracemalloc: {warm['traced_kib']['peak']:,} KiB "
            f"peak, {warm['traced_kib']['kept']:,} KiB kept."
        )
        large = load.get("cold_1000")
        if large:
            lines[-1] += (
                f" With maxEvents 1000 (another new client): {large['seconds']} s in {large['polls']} polls, the "
                f"issuer's /healthz max {large['healthz_max_ms']} ms meanwhile."
            )
    return "\n\n".join(lines)


def main() -> None:
    """This module's figures alone, on a fresh database with the bench's accounts; ``flood`` as the only
    argument measures the flood alone."""
    from bench.run import Bench, prepare

    bench = Bench(seconds=8, rounds=4, warmup=2, connections=32)
    bench.create_database()
    try:
        with bench.issuer(1) as issuer:
            _, logins = prepare(bench, issuer.url)
        if sys.argv[1:] == ["flood"]:
            measured = Measured()
            with issuer_server(bench) as (url, _):
                measured.summary["flood"] = flood(bench, url)
        else:
            measured = measure(bench, logins)
    finally:
        bench.drop_database()
    for comparison in measured.comparisons:
        ratio = comparison.result["rps"] / comparison.baseline["rps"] if comparison.baseline["rps"] else 0.0
        print(f"{comparison.name}: {ratio:.3f}x ({comparison.result['rps']} vs {comparison.baseline['rps']} req/s)")
    print(text(measured.summary))
    print(json.dumps(measured.summary, indent=2))


if __name__ == "__main__":
    main()
