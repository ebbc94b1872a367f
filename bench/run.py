"""`python -m bench.run`: every figure next to a baseline measured in the same run, on the same box.

Starts what it needs: a fresh PostgreSQL database, the issuer (uvicorn, uvloop, httptools; 1 and 2
workers), the reference servers from ``bench/reference.py``; drives them with wrk from a second process
on loopback, each figure in short rounds taken in turn with the baselines it is compared with; prints a
table of ratios and one of where the CPU went; writes ``bench-results.json`` and both tables into
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import micro, propagation, servers, wrk
from bench.peers import simplejwt_bench
from issuer.sessions.families import FamilyPolicy, RefreshFamilies
from issuer.settings import Argon2Params, Settings
from issuer.storage import users
from issuer.storage.database import Database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results.json"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
EMAIL, PASSWORD = "bench@example.com", "correct horse battery staple"
# Enough logins in flight to keep every core hashing; twice as many accounts, so none has two in flight.
LOGIN_CONNECTIONS, LOGIN_ACCOUNTS = 8, 16
# The login figure's rounds, and each measurement of its baseline between them (see login_figures).
LOGIN_ROUNDS, LOGIN_ROUND_SECONDS, ARGON2_SECONDS = 3, 4, 2
# Past sessions in the tables before the first figure (see Bench.add_history).
HISTORY_FAMILIES = 20_000
REFERENCE = "bench.reference:reference"
ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    result: dict[str, Any]
    baseline_name: str
    baseline: dict[str, Any]
    target: float | None  # minimum ratio result/baseline (throughput); None: context, not a target

    @property
    def ratio(self) -> float:
        return self.result["rps"] / self.baseline["rps"] if self.baseline["rps"] else 0.0

    @property
    def round_ratios(self) -> list[float]:
        """The ratio in each round, when the figure and its baseline were taken in turn (``wrk.interleaved``)."""
        ours, theirs = self.result.get("rounds_rps", []), self.baseline.get("rounds_rps", [])
        if len(ours) < 2 or len(ours) != len(theirs):
            return []
        return [a / b if b else 0.0 for a, b in zip(ours, theirs, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result,
            "what": self.what,
            "baseline": {"name": self.baseline_name, **self.baseline},
            "ratio": round(self.ratio, 3),
            "round_ratios": [round(ratio, 3) for ratio in self.round_ratios],
            "target": self.target,
            "meets_target": None if self.target is None else self.meets_target,
        }

    @property
    def meets_target(self) -> bool:
        return self.target is not None and self.ratio >= self.target and self.result.get("errors", 0) == 0


class Bench:
    def __init__(self, seconds: int, rounds: int, warmup: int, connections: int) -> None:
        self.seconds, self.rounds, self.warmup, self.connections = seconds, rounds, warmup, connections
        self.figures: dict[str, dict[str, Any]] = {}  # every measured load figure, by label (see cpu_table)
        self.audit_line: dict[str, Any] = {}  # one audit line's CPU against a refresh's (see audit_line_share)
        self.propagation: dict[str, Any] = {}  # revocation propagation and the feed under load (bench.propagation)
        self.work = Path(tempfile.mkdtemp(prefix="issuer-bench-"))
        self.log = self.work / "servers.log"
        self.db = f"issuer_bench_{secrets.token_hex(4)}"
        self.pg_dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.db
        self.env = {
            "DATABASE_URL": self.pg_dsn,
            "ISSUER_KEK": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
            # One load generator is one client address: the per-IP limit would measure itself.
            "RATE_LIMIT_PER_IP": "0",
            "BENCH_PG_DSN": self.pg_dsn,
        }

    # ------------------------------------------------------------ set-up

    def create_database(self) -> None:
        _execute(ADMIN_DSN, f'CREATE DATABASE "{self.db}"')
        env = {**os.environ, **self.env}
        # The project's own console script on a fixed argument.
        subprocess.run([str(servers.BIN / "issuer"), "migrate"], env=env, cwd=ROOT, check=True)  # noqa: S603

    def drop_database(self) -> None:
        _execute(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def add_history(self, families: int) -> None:
        """Give the tables the shape of a running issuer before anything is measured: ``families`` past
        sessions of the bench user, each with four consumed tokens and a live one.

        On a fresh database the refresh tables hold a few hundred rows; the planner (rightly, for that
        size) picks sequential scans, keeps them in the cached plans of the pooled connections, and the
        first refresh figure then pays for scans that grow with every request while later figures, after
        the next ANALYZE, use the indexes. Measured: the first of two identical runs came out 20% slower.
        """
        _execute(
            self.pg_dsn,
            """
            WITH f AS (
                INSERT INTO refresh_families
                    (id, user_id, created_at, last_used_at, expires_at, idle_expires_at, user_agent, ip)
                SELECT gen_random_uuid()::text, u.id, now(), now(), now() + interval '30 days',
                       now() + interval '7 days', 'bench-history', '127.0.0.1'
                FROM users AS u CROSS JOIN generate_series(1, $1::int)
                WHERE u.email = $2
                RETURNING id, user_id
            )
            INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at, consumed_at)
            SELECT sha256(convert_to(f.id || ':' || g, 'UTF8')), f.id, f.user_id, now(), now() + interval '7 days',
                   CASE WHEN g < 5 THEN now() END
            FROM f CROSS JOIN generate_series(1, 5) AS g
            """,
            families,
            EMAIL,
        )

    def vacuum(self) -> None:
        _execute(self.pg_dsn, "VACUUM ANALYZE")

    def seed_refresh_tokens(self, count: int) -> Path:
        """``count`` fresh families of the bench user, each with its first refresh token (one per line)."""

        async def go() -> list[str]:
            db = Database(self.env["DATABASE_URL"], size=2)
            try:
                user = await users.by_email(db, EMAIL)
                assert user is not None
                policy = FamilyPolicy(timedelta(days=7), timedelta(days=30), timedelta(seconds=10))
                families = RefreshFamilies(db, policy, secrets.token_bytes(32))
                now = datetime.now(UTC)
                return [
                    (
                        await families.start(user, now=now, user_agent="bench", ip="127.0.0.1", clear_failures_of=None)
                    ).token
                    for _ in range(count)
                ]
            finally:
                await db.close()

        path = self.work / f"tokens-{secrets.token_hex(4)}.txt"
        path.write_text("\n".join(asyncio.run(go())) + "\n")
        return path

    # ------------------------------------------------------------ servers

    @contextmanager
    def issuer(self, workers: int) -> Iterator[Server]:
        port = servers.free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**self.env, "ISSUER_URL": url}
        with servers.serving(servers.issuer_command(port, workers), env, f"{url}/readyz", self.log) as group:
            yield Server(url, group)

    @contextmanager
    def sidecar(self, issuer_url: str) -> Iterator[Server]:
        """``issuer-sidecar`` (one process, uvloop and httptools) following ``issuer_url``'s JWKS."""
        port = servers.free_port()
        url = f"http://127.0.0.1:{port}"
        command = [str(servers.BIN / "issuer-sidecar"), "--issuer", issuer_url, "--port", str(port)]
        with servers.serving(command, self.env, f"{url}/readyz", self.log) as group:
            yield Server(url, group)

    @contextmanager
    def reference(self, app: str, workers: int, ready_path: str, ready_status: int) -> Iterator[Server]:
        port = servers.free_port()
        url = f"http://127.0.0.1:{port}"
        command = servers.uvicorn_command(app, port, workers)
        with servers.serving(command, self.env, url + ready_path, self.log, ready_status=ready_status) as group:
            yield Server(url, group)

    # ------------------------------------------------------------ load

    def requests(
        self, server: Server, path: str, script: str, arg: Path | None = None, connections: int | None = None
    ) -> Contender:
        """Runs of ``script`` against ``path`` (GET unless the script says otherwise), one per call."""

        def run_once(seconds: int) -> wrk.LoadResult:
            return wrk.run(
                server.url + path,
                script,
                self.work,
                arg=None if arg is None else str(arg),
                seconds=seconds,
                connections=connections or self.connections,
                server_group=server.group,
            )

        return run_once

    def refreshes(self, server: Server) -> Contender:
        """Refresh runs, each from the same clean state with its own chains of tokens.

        Each run starts after a ``VACUUM ANALYZE``: every refresh leaves dead rows behind, and without it the
        order of the runs (and autovacuum's timing) would favour whichever ran first. A chain's tip stays
        inside wrk, so each run gets fresh chains: four tokens per connection, since wrk asks the script for
        a few requests it never sends when it sets up connections (the spare ones simply wait in the queue).
        """

        def run_once(seconds: int) -> wrk.LoadResult:
            self.vacuum()
            tokens = self.seed_refresh_tokens(self.connections * 4)
            return self.requests(server, "/auth/refresh", wrk.REFRESH, tokens)(seconds)

        return run_once

    def interleaved(
        self,
        contenders: dict[str, Contender],
        *,
        seconds: int | None = None,
        rounds: int | None = None,
        between: Callable[[], object] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """``wrk.interleaved`` with the run's warm-up and rounds (unless given), each figure printed and kept."""
        rounds = rounds or self.rounds
        results = wrk.interleaved(
            contenders,
            warmup=self.warmup,
            seconds=seconds or self.seconds // rounds,
            rounds=rounds,
            between=between,
        )
        for name, result in results.items():
            print(f"  {name}: {_rate(result.rps)}/s (rounds: {', '.join(_rate(rps) for rps in result.rounds_rps)})")
            self.figures[name] = result.as_dict()
        return {name: self.figures[name] for name in results}


@dataclass(frozen=True)
class Server:
    url: str
    group: int  # process group of all its processes (see bench.cpu)


Contender = Callable[[int], wrk.LoadResult]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", "8")), help="measured, per figure"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds the measured seconds are split into")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/performance.md")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds % args.rounds:
        parser.error("--seconds must be a multiple of --rounds (wrk takes whole seconds)")
    started = time.monotonic()
    bench = Bench(args.seconds, args.rounds, args.warmup, args.connections)
    rows: list[Row] = []
    bench.create_database()
    try:
        rows = run_all(bench)
    finally:
        bench.drop_database()
    report(rows, bench, time.monotonic() - started, write_doc=not args.no_doc)


def run_all(bench: Bench) -> list[Row]:
    """Every figure, each taken with only the servers it is compared with running."""
    print(
        f"bench: wrk -t1 -c{bench.connections}; per figure {bench.warmup}s warm-up, then {bench.seconds}s in "
        f"{bench.rounds} rounds taken in turn with its baseline; server logs in {bench.log}"
    )
    with bench.issuer(1) as issuer:
        access, logins_file = prepare(bench, issuer.url)
        params = Settings.from_environ({**bench.env, "ISSUER_URL": issuer.url}).argon2
        with (
            bench.reference("bench.reference:trivial", 1, "/hello", 200) as trivial,
            bench.sidecar(issuer.url) as sidecar,
        ):
            rows = light_figures(bench, issuer, trivial, sidecar, access)
        with bench.reference(REFERENCE, 1, "/", 404) as reference:
            rows += login_figures(bench, issuer, reference, logins_file, params)
    rows += refresh_figures(bench)
    events = propagation.measure(bench, logins_file)
    rows += [Row(*comparison) for comparison in events.comparisons]
    bench.propagation = events.summary
    bench.audit_line = audit_line_share(bench)
    rates = micro.verification(3)
    ours, raw, pyjwt = (_per_token(rates[name]) for name in ("ours", "raw", "pyjwt"))
    rows.append(Row("verify", "issuer.verifier, warm cache (per token)", ours, "raw cryptography RSA verify", raw, 0.4))
    rows.append(
        Row("verify_vs_pyjwt", "issuer.verifier, warm cache (per token)", ours, "PyJWT with a prepared key", pyjwt, 1.0)
    )
    return rows


def light_figures(bench: Bench, issuer: Server, trivial: Server, sidecar: Server, access: Path) -> list[Row]:
    """JWKS, /auth/me and the forward-auth sidecar's check, each against the trivial endpoint, taken in turn."""
    light = bench.interleaved(
        {
            "trivial": bench.requests(trivial, "/hello", wrk.PLAIN),
            "jwks": bench.requests(issuer, "/.well-known/jwks.json", wrk.PLAIN),
            "me": bench.requests(issuer, "/auth/me", wrk.BEARER, access),
            "sidecar": bench.requests(sidecar, "/auth", wrk.BEARER, access),
        }
    )
    trivial_name = "trivial Starlette JSON endpoint"
    return [
        Row("jwks", "GET /.well-known/jwks.json", light["jwks"], trivial_name, light["trivial"], 0.8),
        Row("me", "GET /auth/me (verify + batched user read)", light["me"], trivial_name, light["trivial"], 0.5),
        # One RSA verification per check (nothing cached per token): thousands per second per core is the aim.
        Row(
            "sidecar",
            "issuer-sidecar GET /auth (forward-auth check)",
            light["sidecar"],
            trivial_name,
            light["trivial"],
            None,
        ),
    ]


# Every refresh writes one audit line; it must cost less than this share of the refresh's server CPU.
AUDIT_LINE_TARGET = 0.03


def audit_line_share(bench: Bench) -> dict[str, Any]:
    """One audit line's CPU (``micro.audit_line_cpu``, written to a file next to the servers' log) against the
    server CPU of one refresh in the 1-worker figure just measured (which includes that line)."""
    line_s = micro.audit_line_cpu(bench.work / "audit-line.log", 2.0)
    refresh_ms = bench.figures["refresh (1 worker)"]["cpu"]["ms_per_request"]["server"]
    share = line_s * 1000 / refresh_ms if refresh_ms else 0.0
    print(f"  audit line: {line_s * 1e6:.1f} us of CPU, {share:.1%} of a refresh's {refresh_ms * 1000:.0f} us")
    return {"line_us": round(line_s * 1e6, 2), "refresh_server_us": round(refresh_ms * 1000, 1), "share": share}


def audit_line_text(audit: dict[str, Any]) -> str:
    met = "yes" if audit["share"] < AUDIT_LINE_TARGET else "NO"
    return (
        f"One audit line (every refresh writes one): {audit['line_us']:.1f} µs of CPU, "
        f"{audit['share']:.1%} of a refresh's server CPU ({audit['refresh_server_us']:.0f} µs, 1 worker); "
        f"target < {AUDIT_LINE_TARGET:.0%}: {met}."
    )


def refresh_figures(bench: Bench) -> list[Row]:
    """The issuer's refresh and the reference's, on 1 and 2 workers, and the simplejwt peer's (when ``make
    bench`` has installed it), all taken in turn."""
    with ExitStack() as running:
        contenders = {
            "refresh (1 worker)": running.enter_context(bench.issuer(1)),
            "reference refresh (1 worker)": running.enter_context(bench.reference(REFERENCE, 1, "/", 404)),
            "refresh (2 workers)": running.enter_context(bench.issuer(2)),
            "reference refresh (2 workers)": running.enter_context(bench.reference(REFERENCE, 2, "/", 404)),
        }
        runs = {name: bench.refreshes(server) for name, server in contenders.items()}
        if simplejwt_bench.installed():
            peer = running.enter_context(
                simplejwt_bench.Peer.running(ADMIN_DSN, bench.work, bench.log, EMAIL, HISTORY_FAMILIES)
            )
            peer_url, peer_group = running.enter_context(peer.serving())
            runs[simplejwt_bench.FIGURE] = peer.refreshes(peer_url, peer_group, bench.connections)
        else:
            print("  simplejwt peer: not installed (`make bench` installs it), its rows are left out")
        figures = bench.interleaved(runs)
    ours_1, ours_2 = figures["refresh (1 worker)"], figures["refresh (2 workers)"]
    theirs_1, theirs_2 = figures["reference refresh (1 worker)"], figures["reference refresh (2 workers)"]
    reference = "minimal Starlette+asyncpg refresh"
    rows = [
        Row(
            "refresh", "POST /auth/refresh (body transport), 1 worker", ours_1, f"{reference}, 1 worker", theirs_1, 0.8
        ),
        Row("refresh_2_workers", "POST /auth/refresh, 2 workers", ours_2, f"{reference}, 2 workers", theirs_2, 0.8),
        Row("workers_scaling", "refresh: 2 workers vs 1", ours_2, "the issuer's refresh, 1 worker", ours_1, 1.5),
        # What a second worker can give on this box at all: the reference's own scaling, and the most that the
        # CPU cost of a refresh in the 1-worker figure (issuer, PostgreSQL, wrk, kernel) leaves room for.
        Row(
            "reference_scaling",
            "reference refresh: 2 workers vs 1",
            theirs_2,
            "the reference refresh, 1 worker",
            theirs_1,
            None,
        ),
        Row(
            "scaling_ceiling",
            "every core busy, at the 1-worker figure's CPU cost per refresh",
            _ceiling(ours_1),
            "the issuer's refresh, 1 worker",
            ours_1,
            None,
        ),
    ]
    return rows + peer_rows(figures, ours_1, theirs_1)


def peer_rows(figures: dict[str, dict[str, Any]], ours_1: dict[str, Any], theirs_1: dict[str, Any]) -> list[Row]:
    """The peer's own figure (its p50 and p99 in its row) and the issuer's refresh against it; context, no target."""
    peer = figures.get(simplejwt_bench.FIGURE)
    if peer is None:
        return []
    return [
        Row("simplejwt_refresh", simplejwt_bench.WHAT, peer, "minimal refresh, 1 worker", theirs_1, None),
        Row("refresh_vs_simplejwt", "POST /auth/refresh, 1 worker", ours_1, "simplejwt refresh, 1 worker", peer, None),
    ]


def prepare(bench: Bench, url: str) -> tuple[Path, Path]:
    """The accounts, a past of 20,000 sessions, an access token for /auth/me and the login bodies."""
    bodies = []
    for i in range(LOGIN_ACCOUNTS):
        email = EMAIL if i == 0 else f"bench{i}@example.com"
        httpx.post(f"{url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=30)
        bodies.append(json.dumps({"email": email, "password": PASSWORD, "token_transport": "body"}))
    login = httpx.post(
        f"{url}/auth/login", json={"email": EMAIL, "password": PASSWORD, "token_transport": "body"}, timeout=30
    )
    login.raise_for_status()
    bench.add_history(HISTORY_FAMILIES)
    bench.vacuum()
    access = bench.work / "access.txt"
    access.write_text(login.json()["access_token"] + "\n")
    body = bench.work / "login.jsonl"
    body.write_text("\n".join(bodies) + "\n")
    return access, body


def _ceiling(figure: dict[str, Any]) -> dict[str, Any]:
    """A figure's CPU ceiling as a row: what every core of the box could serve at its CPU cost per request."""
    return {"rps": figure["cpu"]["ceiling_rps"], "p50_ms": None, "p99_ms": None, "errors": 0}


def login_figures(bench: Bench, issuer: Server, reference: Server, body: Path, params: Argon2Params) -> list[Row]:
    """The issuer's login and the minimal reference login in rounds taken in turn, with the argon2 bound
    measured between the rounds: bound, issuer, reference, bound, reference, issuer, bound, ...

    The login is within a few percent of its baseline, and this box's speed drifts by more than that within
    seconds (argon2 alone measured 64/s and then 76/s around one 8 s figure). Each login round is compared
    with the mean of the bounds measured right before and right after it, and the baseline is the mean of
    those. Rounds are 4 s, not the 2 s of the other figures: the logins still in flight when wrk stops
    are not counted, about 4 of them per round, which would cost a 2 s round 3% of its figure.
    """

    contenders = {
        name: bench.requests(server, "/auth/login", wrk.LOGIN, body, LOGIN_CONNECTIONS)
        for name, server in (("login", issuer), ("login_reference", reference))
    }
    bounds: list[float] = []
    figures = bench.interleaved(
        contenders,
        seconds=LOGIN_ROUND_SECONDS,
        rounds=LOGIN_ROUNDS,
        between=lambda: bounds.append(micro.argon2_bound(params, ARGON2_SECONDS)),
    )
    around = [(before + after) / 2 for before, after in itertools.pairwise(bounds)]
    argon = {
        "rps": round(sum(around) / len(around), 1),
        "p50_ms": None,
        "p99_ms": None,
        "errors": 0,
        "rounds_rps": [round(rps, 1) for rps in around],
        "measured_rps": [round(rps, 1) for rps in bounds],
    }
    print(f"  argon2 alone, around the rounds: {', '.join(f'{rps:.1f}' for rps in bounds)}")
    bound_name = f"argon2id verify alone, {micro.HASH_THREADS} threads, around each round"
    argon2 = f"argon2id m={params.memory_cost_kib} KiB, t={params.time_cost}, p={params.parallelism}"
    ours, theirs = figures["login"], figures["login_reference"]
    return [
        Row("login", f"POST /auth/login, 1 worker ({argon2})", ours, bound_name, argon, 0.9),
        # What this box allows any login at all, and what the issuer's login costs on top of it.
        Row("login_reference", "minimal Starlette+asyncpg login, 1 worker", theirs, bound_name, argon, None),
        Row("login_vs_reference", "POST /auth/login, 1 worker", ours, "minimal login, 1 worker", theirs, None),
    ]


def _rate(rps: float) -> str:
    """Requests/s as printed while the bench runs: whole numbers, but a login rate keeps its decimal."""
    return f"{rps:,.0f}" if rps >= 100 else f"{rps:.1f}"


def _per_token(rate: float) -> dict[str, Any]:
    """A micro-benchmark rate as a table row: calls per second, and the time of one call as its p50."""
    return {"rps": round(rate, 1), "p50_ms": round(1000 / rate, 4), "p99_ms": None, "errors": 0}


def _execute(dsn: str, sql: str, *args: object) -> None:
    """One statement on its own connection (CREATE/DROP DATABASE and VACUUM cannot run in a transaction)."""

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    asyncio.run(go())


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _target(row: Row) -> str:
    if row.target is None:
        return "(context) | -"
    return f">= {row.target}x | {'yes' if row.meets_target else 'NO'}"


def table(rows: list[Row]) -> str:
    lines = [
        "| figure | req/s | p50 ms | p99 ms | errors | baseline | baseline req/s | ratio | per round | target | met |",
        "|---|---:|---:|---:|---:|---|---:|---:|:-:|---:|:-:|",
    ]
    for row in rows:
        r, b = row.result, row.baseline
        spread = f"{min(row.round_ratios):.2f}-{max(row.round_ratios):.2f}" if row.round_ratios else "-"
        lines.append(
            f"| {row.name} | {_fmt(r['rps'], ',.0f')} | {_fmt(r['p50_ms'], '.2f')} | {_fmt(r['p99_ms'], '.2f')} | "
            f"{r['errors']} | {row.baseline_name} | {_fmt(b['rps'], ',.0f')} | {row.ratio:.2f}x | {spread} | "
            f"{_target(row)} |"
        )
    return "\n".join(lines)


def cpu_table(figures: dict[str, dict[str, Any]]) -> str:
    """Where the box's CPU went in each load figure: the box's busy share, and milliseconds of CPU per
    request in the server under load, PostgreSQL, wrk and everything else (the kernel's softirq work for
    loopback, the harness, the idle servers); and the requests/s every core could serve at that cost."""
    lines = [
        "| load | req/s | box busy | server ms | PostgreSQL ms | wrk ms | rest ms | ceiling req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, figure in figures.items():
        use = figure.get("cpu")
        if use is None:
            continue
        ms = use["ms_per_request"]
        lines.append(
            f"| {label} | {figure['rps']:,.0f} | {use['box_busy']:.0%} | {ms['server']:.3f} | {ms['postgres']:.3f} | "
            f"{ms['wrk']:.3f} | {ms['rest']:.3f} | {_fmt(use['ceiling_rps'], ',.0f')} |"
        )
    return "\n".join(lines)


def report(rows: list[Row], bench: Bench, elapsed: float, *, write_doc: bool) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = table(rows) + "\n\nWhere the CPU went (per request; from /proc during each load figure):\n\n"
    text += cpu_table(bench.figures)
    if bench.propagation:
        text += "\n\n" + propagation.text(bench.propagation)
    if bench.audit_line:
        text += "\n\n" + audit_line_text(bench.audit_line)
    print()
    print(text)
    print(f"\n{machine}; whole run {elapsed:.0f} s")
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine,
                "load": {
                    "tool": "wrk -t1",
                    "connections": bench.connections,
                    "seconds": bench.seconds,
                    "rounds": bench.rounds,
                },
                "elapsed_s": round(elapsed, 1),
                "results": {row.name: row.as_dict() for row in rows},
                "figures": bench.figures,
                "audit_line": bench.audit_line,
                "propagation": bench.propagation,
            },
            indent=2,
        )
        + "\n"
    )
    if write_doc and DOC.exists():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            stamp = f"Latest run: {datetime.now(UTC):%Y-%m-%d}, {machine}, {elapsed:.0f} s in all.\n\n"
            head, rest = doc.split(BEGIN, 1)
            DOC.write_text(head + BEGIN + "\n" + stamp + text + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
