"""djangorestframework-simplejwt as the bench's peer (the Django project in ``bench/peers/simplejwt/``).

Refresh tokens rotate and are blacklisted after rotation, signed RS256, on the same PostgreSQL as the issuer
(a database of its own, with a past of the same shape as the issuer's), served by gunicorn with one worker.
The worker class is gthread with 8 threads, gunicorn's own advice for I/O-bound apps (2-4 x cores) and
what a team running Django behind one worker per core would pick: Django's views are synchronous, so
gunicorn's default sync worker serves one request at a time and waits out every database round trip
(measured: about a third of gthread's throughput; see docs/performance.md, "A peer").

Its refresh is ``POST /api/token/refresh/`` with ``{"refresh": "<jwt>"}``, answered with
``{"access": ..., "refresh": ...}``; the wrk script below chains the successors as ``wrk.REFRESH`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import servers, wrk

HERE = Path(__file__).resolve().parent / "simplejwt"
VENV = HERE / ".venv"
THREADS = 8
FIGURE = "simplejwt refresh (1 worker)"
WHAT = f"djangorestframework-simplejwt refresh (rotate + blacklist, RS256), gunicorn 1 worker, gthread x{THREADS}"

# The same refresh chain as the issuer's (bench/wrk.py), on simplejwt's path and field names.
REFRESH = wrk.refresh_script("/api/token/refresh/", "refresh")


def installed() -> bool:
    """Whether ``make bench`` has built the peer's virtualenv (``python -m bench.run`` alone does not)."""
    return (VENV / "bin" / "gunicorn").exists()


@dataclass(frozen=True)
class Peer:
    dsn: str
    env: dict[str, str]
    work: Path
    log: Path
    email: str

    @classmethod
    @contextlib.contextmanager
    def running(cls, admin_dsn: str, work: Path, log: Path, email: str, history: int) -> Iterator[Peer]:
        """A fresh database with the peer's schema, the bench user and ``history`` past sessions; its server
        running on a free port until the block ends; the database dropped after."""
        name = f"peer_bench_{secrets.token_hex(4)}"
        dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
        key = work / "peer-signing-key.pem"
        key.write_bytes(
            rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        env = {"PEER_DATABASE_URL": dsn, "PEER_SIGNING_KEY_FILE": str(key)}
        _execute(admin_dsn, f'CREATE DATABASE "{name}"')
        try:
            peer = cls(dsn, env, work, log, email)
            peer.manage("migrate", "--verbosity", "0")
            peer.manage("bench_setup", email, "--history", str(history))
            yield peer
        finally:
            _execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def manage(self, *args: str) -> None:
        """One of the project's management commands, in the peer's own virtualenv."""
        command = [str(VENV / "bin" / "python"), "manage.py", *args]
        # Fixed commands built here; nothing comes from outside the harness.
        subprocess.run(command, env={**_base_env(), **self.env}, cwd=HERE, check=True)  # noqa: S603

    @contextlib.contextmanager
    def serving(self) -> Iterator[tuple[str, int]]:
        """gunicorn on a free port: its URL and process group."""
        port = servers.free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            str(VENV / "bin" / "gunicorn"),
            "--chdir",
            str(HERE),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(THREADS),
            "--log-level",
            "warning",
            "peer.wsgi",
        ]
        # A GET on the refresh view is 405: the app is loaded and routing.
        with servers.serving(command, self.env, f"{url}/api/token/refresh/", self.log, ready_status=405) as group:
            yield url, group

    def refreshes(self, url: str, group: int, connections: int) -> Callable[[int], wrk.LoadResult]:
        """Refresh runs as ``bench.run.Bench.refreshes`` takes the issuer's: after a ``VACUUM ANALYZE``, with
        fresh chains of four tokens per connection."""

        def run_once(seconds: int) -> wrk.LoadResult:
            _execute(self.dsn, "VACUUM ANALYZE")
            tokens = self.work / f"peer-tokens-{secrets.token_hex(4)}.txt"
            self.manage("bench_tokens", self.email, str(connections * 4), str(tokens))
            return wrk.run(
                url + "/api/token/refresh/",
                REFRESH,
                self.work,
                arg=str(tokens),
                seconds=seconds,
                connections=connections,
                server_group=group,
            )

        return run_once


def _base_env() -> dict[str, str]:
    # The peer's own interpreter; nothing of the issuer's virtualenv leaks into it.
    return {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}


def _execute(dsn: str, sql: str) -> None:
    """One statement on its own connection (CREATE/DROP DATABASE and VACUUM cannot run in a transaction)."""

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())
