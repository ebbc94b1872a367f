"""argon2id password hashing, run off the event loop, with a dummy hash for unknown accounts."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from issuer.settings import Argon2Params

T = TypeVar("T")


def argon2id(params: Argon2Params) -> PasswordHasher:
    """The hasher for the configured parameters (the bench's baselines build theirs here too)."""
    return PasswordHasher(
        time_cost=params.time_cost, memory_cost=params.memory_cost_kib, parallelism=params.parallelism, type=Type.ID
    )


class Passwords:
    def __init__(self, params: Argon2Params) -> None:
        self._hasher = argon2id(params)
        # Verified against when the email is unknown, so that path costs one full hash like a real one.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        # One hash per core at a time: more threads would only share the cores, and a login flood would hold
        # a 19 MiB block per thread (40 with Starlette's default pool). Later logins wait here, off the loop.
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="argon2")

    async def hash(self, password: str) -> str:
        return await self._off_loop(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check a password; with ``stored_hash=None`` burn the same time and return False."""
        target = self._dummy_hash if stored_hash is None else stored_hash
        ok = await self._off_loop(self._verify, target, password)
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def close(self) -> None:
        """Let the hashing threads end (the app's lifespan calls this on shutdown)."""
        self._pool.shutdown(wait=False)

    async def _off_loop(self, fn: Callable[..., T], *args: str) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
