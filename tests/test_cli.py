"""The `issuer` command outside `issuer keys` (tests/keys/test_cli.py): DATABASE_URL, `issuer dev`, and the
in-process runner the CLI tests rely on.

`issuer dev` with DATABASE_URL unset starts an embedded PostgreSQL: that path is tests/storage/test_embedded.py's.
Nothing here starts a server: every `issuer dev` below stops before it would serve.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import issuer.cli
from issuer.cli import main
from issuer.settings import Settings
from tests.support.keys import CONFIG_VARIABLES, Cli, assert_refused, settings_environ

PASSWORD = "hunter2-secret"


class _NoEmbeddedServer:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pytest.fail("an embedded PostgreSQL was started although DATABASE_URL is set")


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: Settings) -> pytest.MonkeyPatch:
    """The host's configuration removed, a working directory of the test's own, and no embedded server."""
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ISSUER_KEK", settings_environ(settings)["ISSUER_KEK"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(issuer.cli, "EmbeddedPostgres", _NoEmbeddedServer)
    return monkeypatch


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port nothing listens on (held, so that nothing else takes it while the test runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_the_runner_hands_the_cli_exactly_the_test_settings(settings: Settings, cli: Cli) -> None:
    """Cli clears every variable Settings.from_environ reads and sets them from the test settings."""
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
            read.add(key)
            return super().get(key, default)

    rebuilt = Settings.from_environ(Recording(settings_environ(settings)))
    assert read <= set(CONFIG_VARIABLES), sorted(read - set(CONFIG_VARIABLES))
    assert rebuilt.kek.reveal() == settings.kek.reveal()
    assert replace(rebuilt, kek=settings.kek) == settings
    # ... and the process environment the CLI reads is that one.
    assert replace(Settings.from_environ(), kek=settings.kek) == settings


def test_dev_help_documents_the_data_dir(environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    environment.setenv("DATABASE_URL", "postgresql://issuer@127.0.0.1:5432/issuer")
    with pytest.raises(SystemExit) as exited:
        main(["dev", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: issuer dev")
    assert "--data-dir" in out
    assert "DATABASE_URL" in out
    assert not (Path.cwd() / ".pgdata").exists()

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dev" in capsys.readouterr().out


def test_dev_with_a_database_url_that_is_not_postgresql_stops_in_one_line(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("DATABASE_URL", f"mysql://admin:{PASSWORD}@db.internal.example/orders")
    assert main(["dev"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [err.strip()]
    assert err.startswith("issuer: DATABASE_URL: ")
    assert PASSWORD not in err
    assert "db.internal.example" not in err
    assert not (Path.cwd() / ".pgdata").exists()


def test_dev_uses_the_database_url_it_is_given(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], refused_port: int
) -> None:
    """With DATABASE_URL set, `dev` migrates that database (here unreachable): no embedded server, one line."""
    environment.setenv("DATABASE_URL", f"postgresql://issuer:{PASSWORD}@127.0.0.1:{refused_port}/issuer")
    assert main(["dev"]) == 1
    out, err = capsys.readouterr()
    assert "listening" not in out
    assert err.splitlines() == [err.strip()], err
    assert err.startswith("issuer: cannot reach the database"), err
    assert "Traceback" not in err
    assert PASSWORD not in err + out
    assert not (Path.cwd() / ".pgdata").exists()


@pytest.mark.parametrize("command", [("migrate",), ("cleanup",), ("keys", "list"), ("keys", "rotate"), ("serve",)])
async def test_every_other_command_needs_database_url(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """Only `dev` may start a database of its own; the others stop in one line naming the variable."""
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setattr(issuer.cli, "EmbeddedPostgres", _NoEmbeddedServer)
    line = assert_refused(await cli(*command), "DATABASE_URL")
    assert line.startswith("issuer: DATABASE_URL: "), line
