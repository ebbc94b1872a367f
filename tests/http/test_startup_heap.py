"""``issuer serve`` freezes what start-up built, so that full collections under load skip it; tests do not."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from issuer import cli
from issuer.http import app as app_module
from issuer.http.app import create_app
from issuer.settings import Settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (the test process must keep collecting its garbage)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
async def test_the_served_app_freezes_its_startup_heap_once_started(settings: Settings) -> None:
    app = create_app(settings, freeze_startup_heap=True)
    assert gc.get_freeze_count() == 0, "frozen before start-up had built anything"
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000


@pytest.mark.usefixtures("unfrozen")
async def test_apps_built_by_tests_freeze_nothing(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() == 0


def test_issuer_serve_runs_the_freezing_factory(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: dict[str, Any] = {}

    async def no_preflight(_settings: Settings) -> None:
        return None

    def fake_run(target: str, **kwargs: Any) -> None:
        ran.update(kwargs, target=target)

    monkeypatch.setattr(cli, "_preflight", no_preflight)
    monkeypatch.setattr("uvicorn.run", fake_run)
    monkeypatch.setattr(cli.Settings, "from_environ", classmethod(lambda cls, *a, **k: settings))
    assert cli.main(["serve", "--port", "8123"]) == 0
    assert ran["target"] == "issuer.http.app:create_served_app"
    assert ran["factory"] is True
    made: dict[str, Any] = {}
    monkeypatch.setattr(app_module, "create_app", lambda **kwargs: made.update(kwargs))
    app_module.create_served_app()
    assert made == {"freeze_startup_heap": True}
