"""Fixtures of the gateway tests: one issuer process and echo upstream for the module, each gateway once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateways.stack import (
    AUDIENCE,
    MEASURED,
    Gateway,
    Issuer,
    echo_upstream,
    make_run_dir,
    missing_packages,
    remove_run_dir,
    running_gateway,
    running_issuer,
    running_sidecar,
    tls_proxy,
)

# Which gateways follow revocations: the sidecar's (when it has feed credentials) and introspection.
GATEWAYS = ("nginx", "caddy", "apache-jwks", "apache-introspection")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The revocation delays test_gateways.py measured (README "Gateways"), at the end of every run."""
    if MEASURED:
        terminalreporter.section("gateway revocation delays")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    path = make_run_dir()
    try:
        yield path
    finally:
        remove_run_dir(path)


@pytest.fixture(scope="module")
def live_issuer(run_dir: Path) -> Iterator[Issuer]:
    missing = missing_packages()
    if missing:  # never a skip: `make test` installs them, and a gateway not started is a gateway not tested
        pytest.fail(f"gateway packages missing: {', '.join(missing)}; run `make test-deps` (as root)")
    with running_issuer(run_dir) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with echo_upstream() as address:
        yield address


def add_client(issuer: Issuer, name: str, scope: str) -> tuple[str, str]:
    """``issuer clients add NAME --scope SCOPE``: its JSON line gives the credentials."""
    line = issuer.cli("clients", "add", name, "--scope", scope).strip().splitlines()[-1]
    client = json.loads(line)
    return client["client_id"], client["client_secret"]


@pytest.fixture(scope="module")
def sidecar(run_dir: Path, live_issuer: Issuer) -> Iterator[str]:
    feed = add_client(live_issuer, "sidecar", "events")
    with running_sidecar(run_dir, live_issuer, feed) as address:
        yield address


@pytest.fixture(scope="module")
def revoke_client(live_issuer: Issuer) -> tuple[str, str]:
    """A client of scope ``revoke``, for RFC 7009 revocation (``POST /oauth2/revoke``)."""
    return add_client(live_issuer, "revoker", "revoke")


@pytest.fixture(scope="module")
def issuer_https(run_dir: Path, live_issuer: Issuer) -> Iterator[tuple[str, Path]]:
    with tls_proxy(run_dir, live_issuer) as (url, ca_bundle):
        yield url, ca_bundle


@pytest.fixture(scope="module", params=GATEWAYS)
def gateway(
    request: pytest.FixtureRequest, run_dir: Path, live_issuer: Issuer, upstream: str, sidecar: str
) -> Iterator[Gateway]:
    kind: str = request.param
    values = {"SIDECAR": sidecar, "UPSTREAM": upstream, "ISSUER": live_issuer.url, "AUDIENCE": AUDIENCE}
    if kind.startswith("apache"):
        url, ca_bundle = request.getfixturevalue("issuer_https")
        values |= {"ISSUER_HTTPS": url, "CA_BUNDLE": str(ca_bundle)}
    if kind == "apache-introspection":
        client_id, secret = add_client(live_issuer, "apache", "introspect")
        values |= {"CLIENT_ID": client_id, "CLIENT_SECRET": secret}
    with running_gateway(kind, run_dir, values) as url:
        yield Gateway(kind, url, follows_revocations=kind != "apache-jwks")
