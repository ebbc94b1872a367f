"""Password login: the lock-out, the password check and a new session, in that order.

The rules live in ``lockout`` (counting and locking), ``accounts`` (the password) and ``families`` (the
session); this module only orders their steps, in one of two ways:

- On PostgreSQL, two statements on the hot-path pool. Before the hash, ``hotpath.begin_login`` counts the
  attempt and reads the account. After a success, ``hotpath.finish_login`` starts the family and clears the
  count in one commit. A login's CPU is one hash plus everything else, and each further round trip wakes
  the event loop and a PostgreSQL backend on the cores the hashing threads are using.
- Elsewhere (SQLite), each step through its module, in its own transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError

from issuer.accounts.lockout import LoginLockout
from issuer.accounts.service import Accounts
from issuer.clock import Clock
from issuer.errors import InvalidCredentials
from issuer.sessions.families import IssuedRefresh, RefreshFamilies, token_hash
from issuer.storage import database as hotpath
from issuer.storage.database import HotPool
from issuer.storage.store import User


@dataclass(frozen=True)
class LoggedIn:
    user: User
    refresh: IssuedRefresh
    # Read after the password check: the family's creation and the access token's iat.
    issued_at: datetime


class PasswordLogin:
    def __init__(
        self,
        lockout: LoginLockout,
        accounts: Accounts,
        families: RefreshFamilies,
        hot: HotPool | None,
        clock: Clock,
    ) -> None:
        self._lockout = lockout
        self._accounts = accounts
        self._families = families
        self._hot = hot
        self._clock = clock

    async def __call__(self, email: str, password: str, *, user_agent: str | None, ip: str | None) -> LoggedIn:
        """Log in, or raise TooManyRequests (the email is locked; the password was not checked) or
        InvalidCredentials (counted as a failure)."""
        if self._hot is None:
            return await self._step_by_step(email, password, user_agent=user_agent, ip=ip)
        started = self._clock()
        attempt = self._lockout.attempt(started)
        locked, user = await hotpath.begin_login(self._hot, email, attempt)
        if locked:
            raise await self._lockout.refusal(email, started)
        user = await self._accounts.check_password(user, password)
        now = self._clock()
        family, issued = self._families.new_family(user, now=now, user_agent=user_agent, ip=ip)
        clear = None if attempt is None else email
        if not await hotpath.finish_login(self._hot, family, token_hash(issued.token), clear_failures_of=clear):
            raise InvalidCredentials()  # the account was deleted during the hash: as if it had never existed
        return LoggedIn(user, issued, now)

    async def _step_by_step(self, email: str, password: str, *, user_agent: str | None, ip: str | None) -> LoggedIn:
        async with self._lockout.guard(email, self._clock()):
            user = await self._accounts.authenticate(email, password)
        now = self._clock()
        try:
            refresh = await self._families.start(user, now=now, user_agent=user_agent, ip=ip)
        except IntegrityError:  # the family's user is gone: the account was deleted during the hash
            raise InvalidCredentials() from None
        return LoggedIn(user, refresh, now)
