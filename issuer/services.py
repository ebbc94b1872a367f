"""The long-lived objects of one issuer process, built once from the settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.access.bearer import BearerAuth
from issuer.access.user_lookup import Fetch, UserLookup
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
from issuer.storage import database as hotpath
from issuer.storage import store
from issuer.storage.database import HotPool
from issuer.storage.schema import create_engine


@dataclass
class Services:
    settings: Settings
    clock: Clock
    engine: AsyncEngine
    # PostgreSQL only: the plain asyncpg pool for the one-statement hot paths (None on SQLite).
    hot: HotPool | None
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
        cls,
        settings: Settings,
        clock: Clock = system_clock,
        engine: AsyncEngine | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> Services:
        engine = engine or create_engine(settings.database_url, pool_size=settings.db_pool_size)
        hot = HotPool(engine, settings.db_pool_size) if hotpath.is_postgres(engine) else None
        metrics = Metrics()
        keys = KeyManager(engine, settings, clock)
        passwords = Passwords(settings.argon2)
        policy = FamilyPolicy(
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl),
            session_max_age=timedelta(seconds=settings.session_max_age),
            reuse_grace=timedelta(seconds=settings.refresh_reuse_grace),
        )
        accounts = Accounts(engine, passwords)
        families = RefreshFamilies(engine, policy, successor_secret(settings), hot)
        lockout = LoginLockout(engine, LockoutPolicy(threshold=settings.login_lockout_threshold))
        return cls(
            settings=settings,
            clock=clock,
            engine=engine,
            hot=hot,
            metrics=metrics,
            keys=keys,
            passwords=passwords,
            accounts=accounts,
            families=families,
            bearer=BearerAuth(UserLookup(_users_fetch(engine, hot)), keys, settings, clock, metrics),
            lockout=lockout,
            login=PasswordLogin(lockout, accounts, families, hot, clock),
            ip_limiter=IpRateLimiter(settings.rate_limit_per_ip, monotonic),
            account_ip_limiter=SharedRateLimiter(engine, settings.rate_limit_per_ip, "login+register", hot),
        )


def _users_fetch(engine: AsyncEngine, hot: HotPool | None) -> Fetch:
    """How a batch of bearer calls reads its users: one hot-path statement, or one portable query."""
    if hot is not None:
        return lambda user_ids: hotpath.users_by_id(hot, user_ids)

    async def portable(user_ids: list[str]) -> dict[str, store.User]:
        async with engine.connect() as conn:
            return await store.users_by_id(conn, user_ids)

    return portable


def successor_secret(settings: Settings) -> bytes:
    """A key derived from the KEK for refresh-token successors, so there is no second secret to manage."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"issuer refresh-token successor v1")
    return hkdf.derive(settings.kek.reveal())
