"""Requests waiting for a pooled connection get one in the order they asked (issuer.storage.database).

asyncpg's pool alone is not fair: a connection released while others wait can be taken by whoever asks
next, before the oldest waiter runs, and that waiter goes back to the end of the line. Under make bench's
load that made some refreshes wait many times the median (docs/performance.md, "The 1-worker refresh
p99"). On a pool of one connection the server numbers the statements as they run (``txid_current()``
gives each autocommit statement the next transaction id), so the order in which callers reached the
connection is observable without timing anything.
"""

from __future__ import annotations

import asyncio

from issuer.storage.database import Database, Statement

NEXT_XID = Statement("SELECT txid_current() AS xid")


async def test_a_released_connection_goes_to_the_oldest_waiter_not_to_a_newcomer(pg_url: str) -> None:
    """The race itself, step by step: a connection is released while one caller waits, and a newcomer asks
    for one while the release is under way; the waiter must run first. Where exactly a newcomer can slip in
    depends on how many steps the release takes inside asyncpg, so every point up to ten steps in is tried."""
    for steps in range(10):
        db = Database(pg_url, size=1)
        try:
            held = await db._acquire()
            waiter = asyncio.create_task(db.fetchrow(NEXT_XID))
            for _ in range(3):
                await asyncio.sleep(0)  # the waiter is now waiting for the connection
            release = asyncio.create_task(db._release(held))
            for _ in range(steps):
                await asyncio.sleep(0)
            newcomer = asyncio.create_task(db.fetchrow(NEXT_XID))
            await release
            first, second = await waiter, await newcomer
        finally:
            await db.close()
        assert first is not None
        assert second is not None
        assert first["xid"] < second["xid"], f"a newcomer {steps} steps into a release took the connection"
