"""The built wheel, installed in a fresh virtualenv and run outside the checkout, migrates, lists keys and serves.

The other tests import the issuer from the repository, so they cannot see packaging mistakes: the migrations left
out of the wheel, a package missing from pyproject.toml's list, a file looked up relative to the checkout. The
wheel is built from a copy of the working tree (setuptools writes build/ and *.egg-info next to the sources) and
installed once per module; pip's cache makes the install fast after the first run.

The database server is the suite's (``tests.support.database.admin_dsn``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory

from tests.support.database import admin_dsn
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 600  # seconds; a first run without pip's cache downloads the server's dependencies
COMMAND_TIMEOUT = 120
READY_TIMEOUT = 60

T = TypeVar("T")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    source: Path  # the copy of the working tree the wheel was built from

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _run(args: list[str | Path], *, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run a command to completion; fail the test with its output unless it exits 0."""
    done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
        [str(arg) for arg in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{output}"
    return output


def _outside_env() -> dict[str, str]:
    """This environment without what would make Python find the checkout or this virtualenv."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    return {name: value for name, value in os.environ.items() if name not in dropped}


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    """Leave out bytecode, and at the top the virtualenv, git, caches and earlier build output."""
    at_top = Path(directory) == REPO
    return {
        name
        for name in names
        if name == "__pycache__"
        or (at_top and (name.startswith(".") or name in {"build", "dist"} or name.endswith(".egg-info")))
    }


def _blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine in a fresh thread, away from any event loop the test runner has."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(query: str) -> None:
    conn = await asyncpg.connect(admin_dsn(), timeout=5)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


async def _fetch_versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return [row["version_num"] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh, empty database (no schema): its plain postgresql:// DSN. Dropped at the end."""
    name = f"issuer_wheel_{secrets.token_hex(6)}"
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{admin_dsn().rsplit('/', 1)[0]}/{name}"
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from the working tree, installed with the server extra in a new virtualenv."""
    root = tmp_path_factory.mktemp("wheel")
    env = _outside_env()
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_copy_ignore, symlinks=True)
    dist = root / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, source],
        env=env,
        cwd=root,
        timeout=INSTALL_TIMEOUT,
    )
    (wheel,) = dist.glob("issuer-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env, cwd=root, timeout=COMMAND_TIMEOUT)
    # This virtualenv's pip, installing into the new one (--python): no pip bootstrap in every run.
    _run(
        [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", f"{wheel}[server]"],
        env=env,
        cwd=root,
        timeout=INSTALL_TIMEOUT,
    )
    return Installed(wheel=wheel, venv=venv, source=source)


def test_wheel_carries_every_module_and_the_migrations(installed: Installed) -> None:
    """A package under issuer/ left out of pyproject.toml's explicit list would be missing here."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    package = installed.source / "issuer"
    expected = {f"issuer/{path.relative_to(package).as_posix()}" for path in package.rglob("*.py")}
    migrations = installed.source / "migrations"
    expected |= {
        f"issuer/migrations/{path.relative_to(migrations).as_posix()}"
        for path in [*migrations.rglob("*.py"), migrations / "script.py.mako"]
    }
    expected.add("issuer/py.typed")
    expected.add("issuer/http/openapi.json")  # package data: GET /openapi.json serves it
    # The browser client and the account page (clients/js/ in the repository; GET /sdk/auth-client.js, /account).
    expected |= {f"issuer/web/{path.name}" for path in (installed.source / "clients" / "js").iterdir()}
    assert sorted(expected - names) == []
    assert not [name for name in names if name.startswith("migrations/")], "migrations/ must not be a top-level package"


def _wait_ready(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"issuer serve exited {server.returncode} before it was ready:\n{log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {READY_TIMEOUT} s:\n{log.read_text()}")


def test_installed_issuer_migrates_lists_keys_and_serves(
    database: str, installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")  # the working directory: not the checkout
    port = free_port()
    issuer = str(installed.bin / "issuer")
    env = {
        "PATH": f"{installed.bin}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(outside),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database,
        "ISSUER_KEK": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii"),
        "ISSUER_URL": f"http://127.0.0.1:{port}",
    }

    # The issuer and its migrations come from the virtualenv, never from the repository.
    probe = (
        "import issuer; from issuer.storage.migrations import script_location; "
        "print(issuer.__file__); print(script_location())"
    )
    located = _run([installed.bin / "python", "-c", probe], env=env, cwd=outside, timeout=COMMAND_TIMEOUT)
    for line in located.splitlines():
        assert Path(line).resolve().is_relative_to(installed.venv.resolve()), located

    output = _run([issuer, "migrate"], env=env, cwd=outside, timeout=COMMAND_TIMEOUT)
    assert "issuer: schema is up to date" in output
    head = ScriptDirectory(str(REPO / "migrations")).get_current_head()
    assert _blocking(_fetch_versions(database)) == [head]

    listing = _run([issuer, "keys", "list"], env=env, cwd=outside, timeout=COMMAND_TIMEOUT)
    assert listing.splitlines()[0].split()[:2] == ["KID", "STATE"], listing

    log = outside / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            [issuer, "serve", "--port", str(port)], env=env, cwd=outside, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/readyz", log)
        jwks = httpx.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=5)
        assert jwks.status_code == 200
        assert len(jwks.json()["keys"]) >= 1
        described = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5)
        assert described.status_code == 200
        assert described.json()["servers"] == [{"url": env["ISSUER_URL"]}]
        sdk = httpx.get(f"http://127.0.0.1:{port}/sdk/auth-client.js", timeout=5)
        assert sdk.status_code == 200
        assert sdk.content == (installed.source / "clients" / "js" / "auth-client.js").read_bytes()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert not (outside / "keys").exists(), "the installed issuer made a development KEK despite ISSUER_KEK"
