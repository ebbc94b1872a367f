"""Waiting for state that another task, process or replica changes, with no Event to await."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    """Until ``condition()`` (plain or awaitable) holds, checked every few milliseconds. ``within`` bounds a
    hang: the test fails after it; no duration is asserted."""
    async with asyncio.timeout(within):
        while True:
            held = condition()
            if await held if inspect.isawaitable(held) else held:
                return
            await asyncio.sleep(0.005)
