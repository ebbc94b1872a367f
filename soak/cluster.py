"""The soak's cluster on loopback: a fresh database, PgBouncer in transaction mode, three `issuer serve`
replicas and HAProxy in front of them, plus the fault actions the schedule calls.

Addresses: clients connect to HAProxy on 127.0.0.1 from their own loopback addresses (127.0.1.x and up: the
whole 127.0.0.0/8 is loopback on Linux), HAProxy adds ``X-Forwarded-For`` and reaches the replicas from
127.0.0.1, which is the replicas' ``TRUSTED_PROXIES``. So each virtual user has its own rate-limit bucket,
as behind a real load balancer.

HAProxy health-checks ``/healthz`` (the process lives), not ``/readyz``: during a database outage every
replica's ``/readyz`` is 503, and a balancer checking it would remove them all, taking the JWKS (served from
memory) down with the database. ``retry-on conn-failure empty-response`` with ``redispatch`` resends a
request whose replica died before answering to another replica: safe for a refresh (a repeat inside
``REFRESH_REUSE_GRACE`` gets the same successor), harmless for the other calls (a repeated login starts a
second session; a repeated logout-all raises the version once more).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from tests.pooler.pgbouncer import PgBouncer, configuration, pgbouncer_binary
from tests.support.net import free_port

ADMIN_DSN_ENV = "SOAK_ADMIN_DSN"
LOCAL_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT = 30.0
REPLICAS = 3

# What the replicas run with (beyond the addresses and secrets): the contract's defaults where they matter
# to the checks, a cheap argon2 (the soak drives logins, not the hash), no periodic cleanup (the checks read
# every token and session the run wrote).
REPLICA_ENVIRONMENT = {
    "COOKIE_SECURE": "false",
    "RATE_LIMIT_PER_IP": "120",
    "LOGIN_LOCKOUT_THRESHOLD": "5",
    "REFRESH_REUSE_GRACE": "10",
    "ARGON2_MEMORY_COST": "4096",
    "ARGON2_TIME_COST": "1",
    "DB_POOL_SIZE": "5",
    "CLEANUP_INTERVAL": "0",
    "KEY_RELOAD_INTERVAL": "10",
}


def admin_dsn() -> str:
    return os.environ.get(ADMIN_DSN_ENV, "").strip() or LOCAL_ADMIN_DSN


def haproxy_binary() -> str:
    """Debian's haproxy, installed with apt-get when missing (as root, else through ``sudo -n``)."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
        done = subprocess.run([*sudo, *command], env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            raise RuntimeError(f"the soak needs HAProxy (Debian: apt-get install haproxy): {done.stderr.strip()}")
    if Path("/usr/sbin/haproxy").is_file():
        return "/usr/sbin/haproxy"
    raise RuntimeError("apt-get installed haproxy, but no haproxy executable was found")


def haproxy_configuration(port: int, replicas: list[int]) -> str:
    servers = [f"    server r{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(replicas)]
    return "\n".join(
        [
            "global",
            "    maxconn 4000",
            # One line per request on stdout (the run directory's haproxy.log): termination states say
            # which side ended an exchange during the faults.
            "    log stdout format raw local0",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 1s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    retries 3",
            "    option redispatch 1",
            "    retry-on conn-failure empty-response",
            # The whole request (bodies are small) is read before a server is chosen, and so is still there
            # to resend when that server dies before answering.
            "    option http-buffer-request",
            "    option forwardfor",
            "frontend issuer",
            f"    bind 127.0.0.1:{port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            "    option httpchk GET /healthz",
            "    http-check expect status 200",
            "    default-server inter 300ms fall 2 rise 2",
            # Which replica answered, for the records (the throttle checks need the spread).
            "    http-response set-header X-Soak-Replica %[srv_name]",
            *servers,
            "",
        ]
    )


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with status {process.returncode}: {tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:g} s")


def _stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    """Everything a run starts; :meth:`close` stops it all and drops the database."""

    directory: Path
    database: str
    direct_url: str
    kek: str
    lb_port: int = field(default_factory=free_port)
    bouncer_port: int = field(default_factory=free_port)
    replicas: list[Replica] = field(default_factory=list)
    _bouncer: subprocess.Popen[bytes] | None = None
    _haproxy: subprocess.Popen[bytes] | None = None

    @property
    def issuer_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def pooled_url(self) -> str:
        return PgBouncer("127.0.0.1", self.bouncer_port, self.directory / "pgbouncer.log").url(self.direct_url)

    def environment(self, *, direct: bool = False) -> dict[str, str]:
        """The replicas' and the CLI's environment: DATABASE_URL through PgBouncer (or straight to PostgreSQL
        with ``direct``), LISTEN straight to PostgreSQL (a transaction pooler cannot hold a LISTEN session)."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "ISSUER_"))},
            **REPLICA_ENVIRONMENT,
            "ISSUER_URL": self.issuer_url,
            "DATABASE_URL": self.direct_url if direct else self.pooled_url,
            "DATABASE_LISTEN_URL": self.direct_url,
            "ISSUER_KEK": self.kek,
            "TRUSTED_PROXIES": "127.0.0.1",
        }

    # ------------------------------------------------------------ the pieces

    def start_bouncer(self) -> None:
        """PgBouncer in transaction mode on ``bouncer_port`` (the same port after a restart)."""
        binary = pgbouncer_binary()
        config = self.directory / "pgbouncer.ini"
        if not config.exists():
            config.write_text(configuration(admin_dsn(), self.database, self.bouncer_port, self.directory))
            for path in self.directory.iterdir():
                if path.is_file():
                    path.chmod(0o644)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # PgBouncer refuses to run as root
        log = self.directory / "pgbouncer.log"
        with log.open("ab") as output:
            self._bouncer = subprocess.Popen(  # noqa: S603
                [binary, *user, str(config)], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_port(self.bouncer_port, self._bouncer, "pgbouncer", log)

    def stop_bouncer(self) -> None:
        _stop(self._bouncer)  # SIGTERM: PgBouncer's immediate shutdown, every client connection dropped
        self._bouncer = None

    def start_replica(self, replica: Replica) -> None:
        issuer = str(Path(sys.executable).parent / "issuer")
        with replica.log.open("ab") as output:
            replica.process = subprocess.Popen(  # noqa: S603
                [issuer, "serve", "--host", "127.0.0.1", "--port", str(replica.port)],
                env=self.environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(replica.port, replica.process, f"replica {replica.name}", replica.log)

    def kill_replica(self, replica: Replica) -> None:
        """kill -9: no shutdown, in-flight requests cut."""
        assert replica.process is not None
        replica.process.send_signal(signal.SIGKILL)
        replica.process.wait()
        replica.process = None

    def start_haproxy(self) -> None:
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_configuration(self.lb_port, [r.port for r in self.replicas]))
        log = self.directory / "haproxy.log"
        with log.open("ab") as output:
            self._haproxy = subprocess.Popen(  # noqa: S603
                [haproxy_binary(), "-db", "-f", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.lb_port, self._haproxy, "haproxy", log)

    async def wait_serving(self, replica: Replica | None = None) -> None:
        """Until ``replica`` (or, with None, the balancer) answers /readyz 200."""
        url = self.issuer_url if replica is None else f"http://127.0.0.1:{replica.port}"
        async with httpx.AsyncClient(base_url=url, timeout=2.0) as client, asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)

    async def wait_balanced(self, replica: Replica) -> None:
        """Until the balancer sends requests to ``replica`` again (its health checks passed)."""
        async with httpx.AsyncClient(base_url=self.issuer_url, timeout=2.0) as client, asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    answers = [await client.get("/healthz") for _ in range(REPLICAS)]
                    if any(a.headers.get("x-soak-replica") == replica.name for a in answers):
                        return
                await asyncio.sleep(0.1)

    # ------------------------------------------------------------ the key CLI

    def issuer_command(self, *arguments: str, direct: bool = False) -> str:
        """``issuer ARGUMENTS`` as an operator runs it (through PgBouncer unless ``direct``)."""
        issuer = str(Path(sys.executable).parent / "issuer")
        done = subprocess.run(  # noqa: S603
            [issuer, *arguments],
            env=self.environment(direct=direct),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"issuer {' '.join(arguments)} failed: {done.stderr.strip()}")
        return done.stdout

    async def newest_kid(self) -> str:
        conn = await asyncpg.connect(self.direct_url, timeout=5)
        try:
            kid: str = await conn.fetchval("SELECT kid FROM signing_keys ORDER BY generation DESC LIMIT 1")
            return kid
        finally:
            await conn.close()

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        for replica in self.replicas:
            _stop(replica.process)
        _stop(self._haproxy)
        self.stop_bouncer()
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))


async def _admin(query: str) -> None:
    conn = await asyncpg.connect(admin_dsn(), timeout=5)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


@contextlib.contextmanager
def running_cluster(directory: Path | None = None) -> Iterator[Cluster]:
    """A fresh database (migrated), PgBouncer, three replicas and HAProxy; all stopped and dropped after."""
    work = directory or Path(tempfile.mkdtemp(prefix="issuer-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # as root, PgBouncer runs as `nobody`, which must read its configuration
    database = f"soak_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{database}"'))
    direct = f"{admin_dsn().rsplit('/', 1)[0]}/{database}"
    kek = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    cluster = Cluster(work, database, direct, kek)
    try:
        cluster.issuer_command("migrate", direct=True)
        cluster.start_bouncer()
        cluster.replicas = [Replica(f"r{i + 1}", free_port(), work / f"replica-r{i + 1}.log") for i in range(REPLICAS)]
        for replica in cluster.replicas:
            cluster.start_replica(replica)
        cluster.start_haproxy()
        yield cluster
    finally:
        cluster.close()
