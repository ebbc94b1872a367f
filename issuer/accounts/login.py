"""Password login: the lock-out, the password check and a new session, in that order, in two statements.

Before the hash, :meth:`LoginLockout.begin` counts the attempt and reads the account in one statement (a
locked email is refused there, known account or not). After a success, the session is stored and the count
cleared in one more. A login's CPU is one hash plus everything else, and each further round trip wakes the
event loop and a PostgreSQL backend on the cores the hashing threads are using.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from issuer.accounts.lockout import LoginLockout
from issuer.accounts.service import Accounts
from issuer.clock import Clock
from issuer.errors import InvalidCredentials
from issuer.sessions.families import IssuedRefresh, RefreshFamilies
from issuer.storage.sessions import UserGone
from issuer.storage.users import User


@dataclass(frozen=True)
class LoggedIn:
    user: User
    refresh: IssuedRefresh
    # Read after the password check: the family's creation and the access token's iat.
    issued_at: datetime


class PasswordLogin:
    def __init__(self, lockout: LoginLockout, accounts: Accounts, families: RefreshFamilies, clock: Clock) -> None:
        self._lockout = lockout
        self._accounts = accounts
        self._families = families
        self._clock = clock

    async def __call__(self, email: str, password: str, *, user_agent: str | None, ip: str | None) -> LoggedIn:
        """Log in, or raise TooManyRequests (the email is locked; the password was not checked) or
        InvalidCredentials (counted as a failure)."""
        user = await self._lockout.begin(email, self._clock())
        user = await self._accounts.check_password(user, password)
        now = self._clock()
        try:
            refresh = await self._families.start(
                user, now=now, user_agent=user_agent, ip=ip, clear_failures_of=self._lockout.clears(email)
            )
        except UserGone:  # the account was deleted during the hash: as if it had never existed
            raise InvalidCredentials() from None
        return LoggedIn(user, refresh, now)
