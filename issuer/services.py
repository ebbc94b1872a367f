"""The long-lived objects of one issuer process, built once from the settings (in the app's lifespan)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from issuer.access.bearer import BearerAuth
from issuer.access.user_lookup import UserLookup
from issuer.accounts.lockout import LockoutPolicy, LoginLockout
from issuer.accounts.login import PasswordLogin
from issuer.accounts.passwords import Passwords
from issuer.accounts.service import Accounts
from issuer.clock import Clock, system_clock
from issuer.http.throttle import IpRateLimiter, SharedRateLimiter
from issuer.keys.manager import KeyManager
from issuer.metrics import Metrics
from issuer.sessions.families import FamilyPolicy, RefreshFamilies
from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import Database


@dataclass
class Services:
    settings: Settings
    clock: Clock
    # The process's one connection pool: every statement goes through it.
    db: Database
    metrics: Metrics
    keys: KeyManager
    passwords: Passwords
    accounts: Accounts
    families: RefreshFamilies
    bearer: BearerAuth
    lockout: LoginLockout
    login: PasswordLogin
    ip_limiter: IpRateLimiter
    account_ip_limiter: SharedRateLimiter

    @classmethod
    def build(
        cls, settings: Settings, clock: Clock = system_clock, monotonic: Callable[[], float] = time.monotonic
    ) -> Services:
        db = Database(settings.database_url, settings.db_pool_size)
        metrics = Metrics()
        keys = KeyManager(db, settings, clock)
        passwords = Passwords(settings.argon2)
        policy = FamilyPolicy(
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl),
            session_max_age=timedelta(seconds=settings.session_max_age),
            reuse_grace=timedelta(seconds=settings.refresh_reuse_grace),
        )
        accounts = Accounts(db, passwords)
        families = RefreshFamilies(db, policy, successor_secret(settings))
        lockout = LoginLockout(db, LockoutPolicy(threshold=settings.login_lockout_threshold))
        return cls(
            settings=settings,
            clock=clock,
            db=db,
            metrics=metrics,
            keys=keys,
            passwords=passwords,
            accounts=accounts,
            families=families,
            bearer=BearerAuth(UserLookup(lambda ids: users.by_ids(db, ids)), keys, settings, clock, metrics),
            lockout=lockout,
            login=PasswordLogin(lockout, accounts, families, clock),
            ip_limiter=IpRateLimiter(settings.rate_limit_per_ip, monotonic),
            account_ip_limiter=SharedRateLimiter(db, settings.rate_limit_per_ip, "login+register"),
        )

    async def close(self) -> None:
        """Stop what :meth:`build` started (the app's lifespan calls this on shutdown)."""
        await self.keys.stop()
        self.passwords.close()
        await self.db.close()


def successor_secret(settings: Settings) -> bytes:
    """A key derived from the KEK for refresh-token successors, so there is no second secret to manage."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"issuer refresh-token successor v1")
    return hkdf.derive(settings.kek.reveal())
