"""The LISTEN connection's reconnection: prompt after a connection that worked, backing off only while
connecting fails."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from issuer.storage import notifications


class DroppedConnection:
    """Connects fine, then the server drops it 20 ms later (a failover, an idle timeout, a restart)."""

    def __init__(self) -> None:
        self.closed = False

    def add_termination_listener(self, callback: Any) -> None:
        asyncio.get_running_loop().call_later(0.02, callback, self)

    async def add_listener(self, channel: str, callback: Any) -> None:
        return None

    async def prepare(self, query: str, name: str = "") -> Any:
        connection = self

        class Prepared:
            async def fetchval(self) -> int:
                return connection.get_server_pid()

        return Prepared()

    def get_server_pid(self) -> int:
        return 4242

    async def fetchval(self, *args: Any, **kwargs: Any) -> int:
        return 1

    async def close(self) -> None:
        self.closed = True

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True


async def test_the_back_off_starts_over_after_a_connection_that_worked(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    connected = asyncio.Event()

    async def connect(**kwargs: Any) -> DroppedConnection:
        connected.set()
        return DroppedConnection()

    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(notifications.asyncpg, "connect", connect)
    monkeypatch.setattr(notifications.asyncio, "sleep", sleep)
    listener = notifications.Listener("postgresql://u@127.0.0.1:5432/db")
    listener.on("x", lambda payload: None)
    listener.start()
    async with asyncio.timeout(5):
        while len(delays) < 6:
            await asyncio.wait_for(connected.wait(), 1)
            connected.clear()
    await listener.stop()
    # Every connection succeeded, so every wait is the first step of the back-off (with its jitter).
    assert max(delays) <= notifications.MIN_BACKOFF * 1.5, delays
