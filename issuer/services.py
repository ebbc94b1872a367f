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
from issuer.events.feed import EventFeed
from issuer.events.revoked_sessions import RevokedSessions
from issuer.http.throttle import IpRateLimiter, SharedRateLimiter
from issuer.keys.manager import KeyManager
from issuer.metrics import Metrics
from issuer.oauth.clients import ClientRegistry
from issuer.oauth.introspection import TokenIntrospection
from issuer.sessions.families import FamilyPolicy, RefreshFamilies
from issuer.settings import Settings
from issuer.storage import events, signing_keys, users
from issuer.storage.database import Database
from issuer.storage.notifications import Listener


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
    clients: ClientRegistry
    # Failed client authentications per address (only failures are charged; see issuer.http.oauth).
    client_failures: IpRateLimiter
    introspection: TokenIntrospection
    feed: EventFeed
    # LISTEN for key changes and revocation events, on a connection of its own.
    listener: Listener
    # Sessions revoked anywhere, for this process's own Bearer checks.
    revoked_sessions: RevokedSessions

    @classmethod
    def build(
        cls, settings: Settings, clock: Clock = system_clock, monotonic: Callable[[], float] = time.monotonic
    ) -> Services:
        db = Database(settings.database_url, settings.db_pool_size)
        metrics = Metrics()
        # LISTEN for key changes and revocation events, on a connection of its own.
        listener = Listener(settings.database_listen_url or settings.database_url)
        keys = KeyManager(db, settings, clock, listening=lambda: listener.connected)
        passwords = Passwords(settings.argon2)
        policy = FamilyPolicy(
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl),
            session_max_age=timedelta(seconds=settings.session_max_age),
            reuse_grace=timedelta(seconds=settings.refresh_reuse_grace),
            reuse_revokes_user=settings.reuse_revokes == "user",
            refresh_binding=settings.refresh_binding,
        )
        accounts = Accounts(db, passwords)
        families = RefreshFamilies(db, policy, successor_secret(settings))
        lockout = LoginLockout(db, LockoutPolicy(threshold=settings.login_lockout_threshold))
        revoked_sessions = RevokedSessions(db, settings, clock, listening=lambda: listener.connected)
        bearer = BearerAuth(
            UserLookup(lambda ids: users.by_ids(db, ids)),
            keys,
            settings,
            clock,
            metrics,
            monotonic=monotonic,
            session_revoked=revoked_sessions.refuses,
        )
        feed = EventFeed(
            db,
            keys,
            clock,
            issuer=settings.issuer_url,
            cursor_secret=derived_secret(settings, b"issuer event-feed cursor v1"),
            listening=lambda: listener.connected,
        )
        listener.on(signing_keys.CHANNEL, keys.changed)
        listener.on(events.CHANNEL, feed.wake)
        listener.on(events.CHANNEL, revoked_sessions.changed)
        return cls(
            settings=settings,
            clock=clock,
            db=db,
            metrics=metrics,
            keys=keys,
            passwords=passwords,
            accounts=accounts,
            families=families,
            bearer=bearer,
            lockout=lockout,
            login=PasswordLogin(lockout, accounts, families, clock),
            ip_limiter=IpRateLimiter(settings.rate_limit_per_ip, monotonic),
            account_ip_limiter=SharedRateLimiter(db, settings.rate_limit_per_ip, "login+register"),
            clients=ClientRegistry(db, clock),
            client_failures=IpRateLimiter(settings.rate_limit_per_ip, monotonic),
            introspection=TokenIntrospection(db, bearer, keys, families, settings),
            feed=feed,
            listener=listener,
            revoked_sessions=revoked_sessions,
        )

    async def close(self) -> None:
        """Stop what :meth:`build` started (the app's lifespan calls this on shutdown)."""
        await self.listener.stop()
        await self.revoked_sessions.stop()
        await self.keys.stop()
        self.passwords.close()
        await self.db.close()


def successor_secret(settings: Settings) -> bytes:
    """The key of refresh-token successors (``issuer.sessions.families``)."""
    return derived_secret(settings, b"issuer refresh-token successor v1")


def derived_secret(settings: Settings, purpose: bytes) -> bytes:
    """A key derived from the KEK for one purpose, so there is no second secret to manage."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)
    return hkdf.derive(settings.kek.reveal())
