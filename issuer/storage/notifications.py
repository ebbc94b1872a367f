"""PostgreSQL LISTEN on one dedicated connection, so every replica hears key changes and revocation events
within milliseconds of their commit.

LISTEN needs a session of its own (a transaction pooler hands each transaction to any server connection),
so this connection is not taken from the pool and may use its own URL (``DATABASE_LISTEN_URL``). It is an
accelerator, never the only path: while it is down, everything that waits on it falls back to periodic
polling, and after every (re)connection each handler is called once with no payload, because notifications
sent while nobody listened are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import asyncpg

from issuer.storage.database import CONNECT_TIMEOUT, behind_pooler, connect_arguments
from issuer.tasks import cancelled

log = logging.getLogger("issuer.storage")

Handler = Callable[[str | None], None]

HEALTH_INTERVAL = 5.0  # a silent network partition is noticed by the next round trip
# While the LISTEN connection is down, whoever waits for a notification re-reads this often instead.
POLL_WHILE_DISCONNECTED = 1.0
MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0


class ListenBehindPooler(Exception):
    """The LISTEN connection reached PostgreSQL through a transaction pooler (see the message)."""


class Listener:
    """LISTEN on each channel given to :meth:`on` before :meth:`start`."""

    def __init__(self, database_url: str) -> None:
        self._connect = connect_arguments(database_url)
        self._handlers: dict[str, list[Handler]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._established = False
        self._pooler_reported = False

    @property
    def connected(self) -> bool:
        """True while notifications arrive; False means callers must poll."""
        return self._connected.is_set()

    def on(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` with each notification's payload on ``channel`` (and with None after each
        (re)connection)."""
        self._handlers.setdefault(channel, []).append(handler)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="issuer-listen")

    async def wait_connected(self) -> None:
        """Until the connection is up (callers bound the wait with ``asyncio.timeout``)."""
        await self._connected.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancelled(task)

    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except ListenBehindPooler as exc:
                if not self._pooler_reported:
                    log.error("%s", exc)
                    self._pooler_reported = True
                backoff = MAX_BACKOFF
            except Exception as exc:
                log.warning(
                    "LISTEN connection lost (%s: %s); polling until it is back",
                    type(exc).__name__,
                    exc,
                )
            self._connected.clear()
            if self._established:
                backoff = MIN_BACKOFF  # it worked, then dropped: try again at once, not after the last delay
                self._established = False
            await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 (jitter, not a secret)
            backoff = min(MAX_BACKOFF, backoff * 2)

    async def _listen(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(**{"timeout": CONNECT_TIMEOUT, **self._connect})
        try:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_terminated(_conn: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            conn.add_termination_listener(on_terminated)
            if await behind_pooler(conn):
                # A transaction pooler answers LISTEN but hands the session back at once: nothing would ever
                # arrive while this reported itself connected. Stay disconnected, so every waiter polls.
                raise ListenBehindPooler(
                    "DATABASE_LISTEN_URL: the LISTEN connection goes through a connection pooler, which delivers "
                    "no notifications; point DATABASE_LISTEN_URL straight at PostgreSQL (key changes and "
                    "revocations now reach this process only by periodic re-reads)"
                )
            for channel, handlers in self._handlers.items():
                await conn.add_listener(channel, _deliver(handlers))
            self._connected.set()
            self._established = True
            for handlers in self._handlers.values():
                for handler in handlers:
                    handler(None)  # whatever was announced while nobody listened
            while not lost.done():
                await asyncio.wait({lost}, timeout=HEALTH_INTERVAL)
                if not lost.done():
                    await conn.fetchval("SELECT 1", timeout=HEALTH_INTERVAL)
            raise ConnectionError("the server closed the LISTEN connection")
        finally:
            self._connected.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=1.0)
            if not conn.is_closed():
                conn.terminate()


def poll_interval(listening: bool, while_listening: float) -> float:
    """How long a waiter may rely on notifications alone before it re-reads: ``while_listening`` while they
    arrive, else POLL_WHILE_DISCONNECTED (the contract's 1 s for key changes, 2 s for revocations)."""
    return while_listening if listening else POLL_WHILE_DISCONNECTED


async def wait(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set (a notification) or ``seconds`` have passed (time to re-read)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()


def _deliver(handlers: list[Handler]) -> Callable[[Any, int, str, object], None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        for handler in handlers:
            try:
                handler(str(payload))
            except Exception:
                log.exception("notification handler failed")

    return on_notify
