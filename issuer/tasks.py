"""Background tasks: stopping one (the server's reloads and readers, the verifier's fetches and feed)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancelled(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
