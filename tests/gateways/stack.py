"""Real processes for the gateway tests: the issuer (``issuer serve`` on its own database), the sidecar, a
tiny echo upstream, and each gateway on its configuration from ``examples/gateways/``.

Everything listens on 127.0.0.1 on free high ports and writes its pid, logs and runtime files into one
temporary directory; nothing touches the system's /etc/nginx, /etc/apache2 or port 80. The gateways come
from Debian's packages, installed by ``make test-deps`` (tests/gateways/install-packages.sh).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.database import admin_dsn
from tests.support.jwt import kid_of, rsa_signed
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "gateways"
BIN = Path(sys.executable).parent
AUDIENCE = "api"
PASSWORD = "correct horse battery staple"
# Short key timings, so that a routine rotation completes within a test: the JWKS max-age is
# min(JWKS_MAX_AGE, KEY_PUBLISH_LEAD - KEY_RELOAD_INTERVAL - 1) = 2 s, a new key signs 4 s after `keys rotate`.
KEY_PUBLISH_LEAD = 4
ISSUER_ENV = {
    "ISSUER_AUDIENCE": AUDIENCE,
    "JWKS_MAX_AGE": "2",
    "KEY_PUBLISH_LEAD": str(KEY_PUBLISH_LEAD),
    "KEY_RELOAD_INTERVAL": "1",
    "RATE_LIMIT_PER_IP": "0",
    "LOGIN_LOCKOUT_THRESHOLD": "0",
    "ARGON2_MEMORY_COST": "1024",
    "ARGON2_TIME_COST": "1",
    "CLEANUP_INTERVAL": "0",
    "COOKIE_SECURE": "false",
}
# The revocation delays test_gateways.py measured, one line per gateway and kind: shown in the run's summary.
MEASURED: list[str] = []
BINARIES = {"nginx": "/usr/sbin/nginx", "caddy": "/usr/bin/caddy", "apache": "/usr/sbin/apache2"}
OPENIDC = Path("/usr/lib/apache2/modules/mod_auth_openidc.so")


def missing_packages() -> list[str]:
    missing = [name for name, path in BINARIES.items() if not Path(path).exists()]
    return [*missing, *([] if OPENIDC.exists() else ["libapache2-mod-auth-openidc"])]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = 0.05) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails with ``what`` after ``timeout``."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if condition():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- processes


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start(name: str, command: list[str], run_dir: Path, env: Mapping[str, str] | None = None) -> Process:
    log = run_dir / f"{name}.out"
    with log.open("ab") as sink:
        popen = subprocess.Popen(  # noqa: S603  # fixed commands built by this harness
            command,
            env={**os.environ, **(env or {})},
            cwd=run_dir,
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Process(name, popen, log)


def wait_ready(process: Process, url: str, status: int = 200, timeout: float = 30.0) -> None:
    def ready() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        return httpx.get(url, timeout=2).status_code == status

    try:
        wait_until(ready, f"{process.name} at {url}", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{process.tail()}") from None


# ---------------------------------------------------------------- the echo upstream


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with the headers it received, as JSON (names lower-cased, repeats kept)."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextlib.contextmanager
def echo_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="echo-upstream", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the issuer


@dataclass
class Issuer:
    url: str
    env: dict[str, str]
    key: rsa.RSAPrivateKey  # imported with `issuer keys import`: the tests can sign as the issuer
    process: Process | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603  # the project's own console script
            [str(BIN / "issuer"), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"issuer {' '.join(args)}: {done.stderr}"
        return done.stdout

    def register(self, email: str | None = None) -> str:
        email = email or f"user-{secrets.token_hex(4)}@example.com"
        response = httpx.post(f"{self.url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=10)
        assert response.status_code == 201, response.text
        return email

    def login(self, email: str) -> Login:
        response = httpx.post(
            f"{self.url}/auth/login",
            json={"email": email, "password": PASSWORD, "token_transport": "body"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return Login(body["access_token"], body["refresh_token"], body["user"])

    def promote(self, email: str, role: str) -> None:
        """Give the account ``role`` (no API does: operators set roles in the database). Its next login has it."""
        asyncio.run(_execute(self.env["DATABASE_URL"], "UPDATE users SET role = $2 WHERE email = $1", email, role))

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """A token signed with the issuer's imported key: only what the test changes is wrong."""
        return rsa_signed(header or {"alg": "RS256", "typ": "at+jwt", "kid": kid_of(self.key)}, claims, self.key)


@dataclass
class Login:
    access: str
    refresh: str
    user: dict[str, Any] = field(default_factory=dict)


async def _execute(dsn: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def _admin(statement: str) -> None:
    await _execute(admin_dsn(), statement)


@contextlib.contextmanager
def running_issuer(run_dir: Path) -> Iterator[Issuer]:
    """``issuer serve`` on a database of its own, with a signing key the tests hold."""
    name = f"issuer_gw_{secrets.token_hex(5)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **ISSUER_ENV,
        "ISSUER_URL": url,
        "DATABASE_URL": f"{admin_dsn().rsplit('/', 1)[0]}/{name}",
        "ISSUER_KEK": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = run_dir / "issuer-key.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    issuer = Issuer(url, env, key)
    try:
        issuer.cli("migrate")
        issuer.cli("keys", "import", str(pem), "--now")
        command = [str(BIN / "issuer"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        issuer.process = start("issuer", command, run_dir, env)
        try:
            wait_ready(issuer.process, f"{url}/readyz")
            yield issuer
        finally:
            issuer.process.stop()
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ---------------------------------------------------------------- the sidecar and the gateways


@contextlib.contextmanager
def running_sidecar(run_dir: Path, issuer: Issuer, feed: tuple[str, str] | None) -> Iterator[str]:
    port = free_port()
    command = [str(BIN / "issuer-sidecar"), "--issuer", issuer.url, "--audience", AUDIENCE, "--port", str(port)]
    env = {"SIDECAR_CLIENT_ID": feed[0], "SIDECAR_CLIENT_SECRET": feed[1]} if feed else {}
    process = start("sidecar", command, run_dir, env)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}/readyz")
        yield f"127.0.0.1:{port}"
    finally:
        process.stop()


TLS_PROXY = """
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {run}/cert.pem;
        ssl_certificate_key {run}/key.pem;
        location / {{ proxy_pass {issuer}; proxy_set_header Host $http_host; }}
    }}
}}
"""


@contextlib.contextmanager
def tls_proxy(run_dir: Path, issuer: Issuer) -> Iterator[tuple[str, Path]]:
    """The issuer over https (mod_auth_openidc fetches nothing else): nginx with a self-signed certificate for
    127.0.0.1 in front of the http test issuer. Yields the https URL and the certificate (the CA bundle)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    work = run_dir / "tls-proxy"
    work.mkdir(mode=0o755)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (work / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (work / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    port = free_port()
    config = work / "nginx.conf"
    config.write_text(TLS_PROXY.format(run=work, port=port, issuer=issuer.url))
    command = [BINARIES["nginx"], "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(config)]
    process = start("tls-proxy", [*command, "-g", "daemon off;"], work)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: (
                httpx.get(
                    f"{url}/healthz", verify=ssl.create_default_context(cafile=work / "cert.pem"), timeout=2
                ).status_code
                == 200
            ),
            "the TLS proxy",
        )
        yield url, work / "cert.pem"
    finally:
        process.stop()


def render(template: str, run_dir: Path, values: Mapping[str, str]) -> Path:
    text = (EXAMPLES / template).read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    assert not left, f"{template}: placeholders left: {left}"
    path = run_dir / template
    path.write_text(text)
    return path


def worker_account() -> tuple[str, str]:
    """The account Apache's workers run as: www-data when started by root, else whoever runs the tests."""
    if os.geteuid() == 0:
        return "www-data", "www-data"
    return getpass.getuser(), grp.getgrgid(pwd.getpwuid(os.getuid()).pw_gid).gr_name


@dataclass(frozen=True)
class Gateway:
    name: str
    url: str
    follows_revocations: bool  # through the sidecar's feed or introspection


@contextlib.contextmanager
def running_gateway(kind: str, run_dir: Path, values: Mapping[str, str]) -> Iterator[str]:
    """``kind`` (nginx, caddy, apache-jwks, apache-introspection) on a free port; yields its base URL."""
    port = free_port()
    work = run_dir / kind
    work.mkdir(mode=0o755)
    values = {**values, "LISTEN_PORT": str(port), "RUN_DIR": str(work)}
    if kind == "nginx":
        config = render("nginx.conf", work, values)
        command = [BINARIES["nginx"], "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(config)]
        command += ["-g", "daemon off;"]
        env: dict[str, str] = {}
    elif kind == "caddy":
        config = render("Caddyfile", work, values)
        command = [BINARIES["caddy"], "run", "--adapter", "caddyfile", "--config", str(config)]
        env = {"HOME": str(work), "XDG_DATA_HOME": str(work / "data"), "XDG_CONFIG_HOME": str(work / "config")}
    else:
        user, group = worker_account()
        values = {**values, "USER": user, "GROUP": group, "PASSPHRASE": secrets.token_urlsafe(24)}
        config = render(f"{kind}.conf", work, values)
        command = [BINARIES["apache"], "-f", str(config), "-DFOREGROUND"]
        env = {"APACHE_RUN_DIR": str(work), "APACHE_LOCK_DIR": str(work), "APACHE_PID_FILE": str(work / "apache.pid")}
    process = start(kind, command, work, env)
    url = f"http://127.0.0.1:{port}"
    try:
        # Any HTTP answer means it listens: without a token every configuration answers 401.
        wait_ready(process, f"{url}/ready-probe", status=401)
        yield url
    except AssertionError as exc:
        logs = "\n".join(p.name + ":\n" + p.read_text(errors="replace")[-2000:] for p in work.glob("*.log"))
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        process.stop()


def make_run_dir() -> Path:
    """A temporary directory every gateway's workers can read (pytest's tmp_path is 0700 under root)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="issuer-gateways-"))
    path.chmod(0o755)
    return path


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
