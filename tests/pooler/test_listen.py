"""LISTEN through a transaction pooler hears nothing: the listener must see that, say so, and stay
disconnected, so that every waiter keeps polling instead of trusting a connection that delivers nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import login, register
from tests.support.issuer import running_issuer
from tests.support.oauth import new_client, poll, poll_all


async def test_a_listen_connection_through_the_pooler_reports_itself_and_polling_carries_on(
    settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # ``settings`` here go through PgBouncer, and DATABASE_LISTEN_URL is unset: LISTEN follows DATABASE_URL.
    assert settings.database_listen_url == ""
    async with running_issuer(settings, clock) as issuer, issuer.client() as client:
        async with asyncio.timeout(10):
            while not any("DATABASE_LISTEN_URL" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not issuer.services.listener.connected
        errors = [r for r in caplog.records if "DATABASE_LISTEN_URL" in r.getMessage()]
        assert errors[0].levelno == logging.ERROR
        # Polling carries the feed: a long poll still ends with the event, by the one-second re-read.
        await register(client)
        tokens = await login(client)
        gateway = await new_client(issuer, "events")
        _, cursor = await poll_all(client, gateway)
        waiting = asyncio.create_task(
            client.post("/events/poll", json={"cursor": cursor}, headers=gateway.headers, timeout=30)
        )
        await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
        async with asyncio.timeout(15):
            answer = (await waiting).json()
        assert len(answer["sets"]) == 1
        assert (await poll(client, gateway, cursor=answer["cursor"])).json()["sets"] == {}
