"""Accounts: register, check a password, log out everywhere, delete."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime

from issuer.accounts.passwords import Passwords
from issuer.errors import EmailTaken, InvalidCredentials, InvalidRequest, WrongPassword
from issuer.storage import users
from issuer.storage.database import Database
from issuer.storage.users import User

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def normalize_email(value: object) -> str:
    """Trim, lower-case and NFC-normalize; enforce the contract's shape. Lengths are in code points.

    NFC: "ü" typed as one code point or as "u" plus a combining mark is the same address, not two accounts.
    """
    if not isinstance(value, str):
        raise InvalidRequest("'email' must be a string.")
    email = unicodedata.normalize("NFC", value.strip().lower())
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidRequest(f"'email' must be at most {MAX_EMAIL_LENGTH} characters.")
    local, at, domain = email.partition("@")
    if not at or not local or not domain or "@" in domain:
        raise InvalidRequest("'email' must contain one '@' with a local part and a domain.")
    if any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in email):
        raise InvalidRequest("'email' must not contain spaces or control characters.")
    return email


def check_password_shape(value: object, *, new: bool) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("'password' must be a string.")
    if len(value) > MAX_PASSWORD_LENGTH:
        raise InvalidRequest(f"'password' must be at most {MAX_PASSWORD_LENGTH} characters.")
    if new and len(value) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"'password' must be at least {MIN_PASSWORD_LENGTH} characters.")
    if "\x00" in value:
        raise InvalidRequest("'password' must not contain NUL characters.")
    try:
        # JSON can carry lone surrogates ("\ud800"); they cannot be hashed, so refuse them here, not with a 500.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("'password' must be valid Unicode text.") from None
    # NIST SP 800-63B 5.1.1.2: the same password typed as another Unicode sequence must still match.
    return unicodedata.normalize("NFKC", value)


class Accounts:
    def __init__(self, db: Database, passwords: Passwords) -> None:
        self._db = db
        self._passwords = passwords

    async def register(self, email: str, password: str, *, now: datetime) -> User:
        # Checked first so a taken email costs no hash; the unique index still decides a race.
        if await users.by_email(self._db, email) is not None:
            raise EmailTaken()
        user = User(
            id=str(uuid.uuid4()),
            email=email,
            password_hash=await self._passwords.hash(password),
            role="user",
            token_version=0,
        )
        try:
            await users.insert(self._db, user, now)
        except users.DuplicateEmail:
            raise EmailTaken() from None
        return user

    async def check_password(self, user: User | None, password: str) -> User:
        """``user`` if ``password`` is theirs; else InvalidCredentials, after a full hash for None (no such
        account) too."""
        ok = await self._passwords.verify(None if user is None else user.password_hash, password)
        if user is None or not ok:
            raise InvalidCredentials()
        if self._passwords.needs_rehash(user.password_hash):
            # Raised ARGON2_* settings reach existing accounts at their next login; the plaintext is only
            # available now.
            new_hash = await self._passwords.hash(password)
            await users.set_password_hash(self._db, user.id, user.password_hash, new_hash)
        return user

    async def logout_all(self, user_id: str, *, now: datetime) -> None:
        await users.log_out_everywhere(self._db, user_id, now)

    async def delete(self, user: User, password: str) -> None:
        if not await self._passwords.verify(user.password_hash, password):
            raise WrongPassword()
        await users.delete(self._db, user.id)
