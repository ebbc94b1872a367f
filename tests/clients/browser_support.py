"""What the browser tests run on: a real issuer process on a free port, a second web server for the page on
another origin, and Debian's Chromium driven by Playwright.

The issuer is ``python -m issuer.cli serve`` in a subprocess on its own database (created, migrated and
dropped here, not the suite's shared ``pg_url`` database, whose tables the suite truncates after each test
while this server keeps running). Chromium is /usr/bin/chromium from Debian's packages: ``make test``
installs it (``test-deps``), and :func:`chromium_path` installs it too when the tests run by themselves. No
browser is ever downloaded by Playwright.
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
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import httpx

from issuer.storage.migrations import upgrade
from tests.support.database import admin_dsn
from tests.support.net import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READY_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[2]

_install_lock = threading.Lock()
# One key-encryption key for every issuer process of this test run: several serve one database.
KEK = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def chromium_path() -> str:
    """/usr/bin/chromium, installed from Debian's packages if it is missing (the machine is root in CI)."""
    with _install_lock:
        if not CHROMIUM.exists():
            apt = shutil.which("apt-get")
            if apt is None:
                raise RuntimeError("the browser tests need Debian's chromium (/usr/bin/chromium): apt-get is missing")
            subprocess.run([apt, "update", "-qq"], check=True)  # noqa: S603 - fixed arguments
            subprocess.run([apt, "install", "-y", "-qq", "chromium"], check=True)  # noqa: S603
    return str(CHROMIUM)


def _blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine in a fresh thread, away from any event loop the test runner has."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _admin(query: str) -> None:
    conn = await asyncpg.connect(admin_dsn(), timeout=5)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


@contextlib.contextmanager
def browser_database() -> Iterator[str]:
    """A database of its own, migrated to head; dropped at the end."""
    name = f"issuer_browser_{secrets.token_hex(6)}"
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{admin_dsn().rsplit('/', 1)[0]}/{name}"
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # Alembic's env runs its own event loop
            pool.submit(upgrade, url).result()
        yield url
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class Issuer:
    """A running issuer process: ``url`` is its ISSUER_URL (``http://localhost:PORT``)."""

    url: str
    port: int
    log: Path

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10, **kwargs)  # type: ignore[arg-type]

    def refreshes(self) -> dict[str, float]:
        """The issuer's own count of refresh requests by outcome (``issuer_refreshes_total``)."""
        counts = {"success": 0.0, "replayed": 0.0, "invalid_grant": 0.0, "reuse": 0.0, "missing": 0.0}
        for line in self.get("/metrics").text.splitlines():
            if line.startswith('issuer_refreshes_total{outcome="'):
                outcome = line.split('"', 2)[1]
                counts[outcome] = float(line.rsplit(" ", 1)[1])
        return counts


@contextlib.contextmanager
def running_issuer(
    database_url: str, tmp: Path, env: Mapping[str, str] | None = None, *, host: str = "localhost"
) -> Iterator[Issuer]:
    """``issuer serve`` on a free port of 127.0.0.1, reached as http://localhost:PORT (a secure context for
    the browser, so the Web Locks API exists, and a host that keeps ``Secure`` cookies over plain http)."""
    port = free_port()
    url = f"http://{host}:{port}"
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ISSUER_", "ACCESS_", "ALLOWED_"))},
        "DATABASE_URL": database_url,
        "ISSUER_URL": url,
        "ISSUER_KEK": KEK,
        "ACCOUNT_PAGE": "true",
        "RATE_LIMIT_PER_IP": "0",
        "LOGIN_LOCKOUT_THRESHOLD": "0",
        "CLEANUP_INTERVAL": "0",
        "ARGON2_MEMORY_COST": "1024",
        "ARGON2_TIME_COST": "1",
        **(env or {}),
    }
    log = tmp / f"issuer-{port}.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            [sys.executable, "-m", "issuer.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=environ,
            cwd=tmp,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"issuer serve exited {server.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"issuer serve was not ready within {READY_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield Issuer(url=url, port=port, log=log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# The page a single-page application on another origin would be: it imports the client from the issuer
# named in its query string (``?issuer=URL``) and hands it to the test as ``window.auth``. Served by
# spa_server; not part of the product.
SPA_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>spa</title>
<script type="module">
const issuer = new URLSearchParams(location.search).get("issuer");
const { createAuthClient } = await import(`${issuer}/sdk/auth-client.js`);
window.auth = createAuthClient();
window.events = [];
for (const type of ["signedIn", "signedOut", "sessionExpired"]) {
  window.auth.addEventListener(type, () => window.events.push(type));
}
window.ready = true;
</script></head><body>spa</body></html>
"""


class _SpaHandler(BaseHTTPRequestHandler):
    pages: Mapping[str, bytes] = {}

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        page = self.pages.get(path, SPA_PAGE)
        issuer = parse_qs(query).get("issuer")
        if issuer:  # pages name the issuer https://id.example.com, as the README does
            page = page.replace(b"https://id.example.com", issuer[0].encode())
        if self.path.startswith("/favicon"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def spa_server(pages: Mapping[str, bytes] | None = None) -> Iterator[int]:
    """A web server on a free port of 127.0.0.1 answering GET ``path`` with ``pages[path]``, and any other
    path with SPA_PAGE; yields the port."""
    handler = type("Handler", (_SpaHandler,), {"pages": dict(pages or {})})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
