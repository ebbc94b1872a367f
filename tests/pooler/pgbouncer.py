"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL server (not collected).

Debian's ``pgbouncer`` is installed with apt-get when it is missing (as root, else through ``sudo -n``); a
machine that can do neither fails the pooler tests with one line saying so, as CI must not skip them. It
listens on a free loopback port with a generated configuration: ``pool_mode = transaction``, ``auth_type =
trust`` with a generated userlist holding the test server's user (and its password, if the admin DSN has
one, for PgBouncer's own login to the server), and every database name passed through to the test server.

One entry besides the pass-through one makes a mix-up of server connections certain rather than likely:
``solo_<db>`` reaches the test database over one server connection shared by every client connection, the
way a busy pooler shares a few among many.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tests.support.net import free_port

START_TIMEOUT = 10.0  # seconds for PgBouncer to listen
INSTALL_TIMEOUT = 600.0  # seconds for apt-get
# Server connections per database/user pair: fewer than the issuer's pool, so client connections share them.
POOL_SIZE = 3


@dataclass(frozen=True)
class PgBouncer:
    host: str
    port: int
    log: Path

    def url(self, database_url: str, *, database: str | None = None) -> str:
        """``database_url`` (a URL on the test server) through PgBouncer, optionally to another of its
        database entries."""
        parts = urlsplit(database_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        path = parts.path if database is None else f"/{database}"
        return urlunsplit(parts._replace(netloc=netloc, path=path))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def pgbouncer_binary() -> str:
    """The pgbouncer executable, installed from Debian's archive if it is missing."""
    found = shutil.which("pgbouncer") or next(
        (str(p) for p in (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer")) if p.is_file()), None
    )
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("the pooler tests need PgBouncer: install it (Debian: apt-get install pgbouncer)")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pgbouncer"]):
        done = subprocess.run(  # noqa: S603  (fixed arguments)
            [*sudo, *command], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the pooler tests could not install pgbouncer ({' '.join(command)}: {tail[0]})")
    return _installed()


def _installed() -> str:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("apt-get installed pgbouncer, but no pgbouncer executable was found")


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def configuration(admin_dsn: str, database: str, port: int, directory: Path) -> str:
    """pgbouncer.ini for the test server behind ``admin_dsn``; writes the userlist into ``directory``."""
    server = urlsplit(admin_dsn)
    assert server.hostname, f"PgBouncer needs the test server over TCP, not {admin_dsn!r}"
    user = unquote(server.username or "postgres")
    target = f"host={server.hostname} port={server.port or 5432}"
    if server.password:  # PgBouncer logs in to the server with the password from its userlist
        target += f" user={user} password={unquote(server.password)}"
    userlist = directory / "userlist.txt"
    userlist.write_text(f"{_quote(user)} {_quote(unquote(server.password or ''))}\n")
    return "\n".join(
        [
            "[databases]",
            f"solo_{database} = {target} dbname={database} pool_size=1",
            f"* = {target}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {userlist}",
            "pool_mode = transaction",
            f"default_pool_size = {POOL_SIZE}",
            "max_client_conn = 500",
            # Return server connections as they come back (no server_reset_query in transaction mode).
            "server_reset_query =",
            "server_check_delay = 0",
            "ignore_startup_parameters = extra_float_digits",
            "",
        ]
    )


@contextlib.contextmanager
def running_pgbouncer(admin_dsn: str, database: str) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode on a free loopback port, stopped after the block."""
    binary = pgbouncer_binary()
    directory = Path(tempfile.mkdtemp(prefix="issuer-pgbouncer-"))
    directory.chmod(0o755)  # as root, PgBouncer drops to `nobody`, which must read its files
    port = free_port()
    config = directory / "pgbouncer.ini"
    config.write_text(configuration(admin_dsn, database, port, directory))
    for path in directory.iterdir():
        path.chmod(0o644)
    log = directory / "pgbouncer.log"
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # PgBouncer refuses to run as root
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603  (fixed arguments)
            [binary, *user, str(config)], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_listening(process, port, log)
        yield PgBouncer("127.0.0.1", port, log)
    finally:
        process.send_signal(signal.SIGTERM)  # immediate shutdown (SIGINT would wait for every client to leave)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with status {process.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"pgbouncer did not listen on 127.0.0.1:{port} within {START_TIMEOUT:g} s")
