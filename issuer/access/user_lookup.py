"""Concurrent bearer calls look their users up together: one statement answers many requests.

The issuer's own endpoints read the caller's user (and its ``tokenVersion``) from the database on every
request, so that logout-all and account deletion take effect at once. Under load many of those reads are
waiting at the same moment; :class:`UserLookup` sends them as one ``WHERE id = ANY(...)`` statement, the
way a DataLoader batches a request's reads. At most one statement is in flight per process: requests that
arrive meanwhile form the next batch, which goes out as soon as the current one returns. Under light load
a batch holds one id and leaves at once, so nothing waits for a timer.

Freshness is the same as one statement per request: a lookup is only ever answered by a statement sent
after the lookup was asked for (a batch already in flight never takes new ids), so anything that committed
before a request arrived is seen by that request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from issuer.storage.users import User

Fetch = Callable[[list[str]], Awaitable[dict[str, User]]]


class UserLookup:
    def __init__(self, fetch: Fetch, *, max_batch: int = 500) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[str, list[asyncio.Future[User | None]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def get(self, user_id: str) -> User | None:
        """The user with this id as the database has it now (None if there is none)."""
        waiter: asyncio.Future[User | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(user_id, []).append(waiter)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="issuer-user-lookup")
        return await waiter

    async def _run(self) -> None:
        batch: dict[str, list[asyncio.Future[User | None]]] = {}
        try:
            while self._pending:
                batch = self._take_batch()
                try:
                    found = await self._fetch(list(batch))
                except Exception as exc:  # every waiter of the batch fails the same way (503, 500, ...)
                    for waiters in batch.values():
                        for waiter in waiters:
                            if not waiter.done():
                                waiter.set_exception(exc)
                    continue
                for user_id, waiters in batch.items():
                    for waiter in waiters:
                        if not waiter.done():  # its request may have been cancelled meanwhile
                            waiter.set_result(found.get(user_id))
                batch = {}
        finally:
            self._runner = None
            # Cancelled (shutdown) or failed outside a statement: nobody is left waiting forever.
            for waiters in [*batch.values(), *self._pending.values()]:
                for waiter in waiters:
                    waiter.cancel()
            self._pending.clear()

    def _take_batch(self) -> dict[str, list[asyncio.Future[User | None]]]:
        if len(self._pending) <= self._max_batch:
            batch, self._pending = self._pending, {}
            return batch
        ids = list(self._pending)[: self._max_batch]
        return {user_id: self._pending.pop(user_id) for user_id in ids}
