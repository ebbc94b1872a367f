"""Accounts: register, check a password, log out everywhere, delete."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime

from email_validator import EmailNotValidError, validate_email

from issuer.accounts.passwords import Passwords
from issuer.errors import EmailTaken, InvalidCredentials, InvalidRequest, WrongPassword
from issuer.events import record
from issuer.storage import users
from issuer.storage.database import Database
from issuer.storage.users import User

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def normalize_email(value: object) -> str:
    """A new account's email in its stored form, or InvalidRequest naming what is wrong with it.

    After the contract's checks (:func:`_email_shape`), the address must be one the standards allow, as
    ``email-validator`` judges it with no network access: a dot-atom local part (RFC 5322; internationalised,
    RFC 6531), a domain of valid labels that IDNA 2008 (UTS #46) accepts and that is not special-use
    (``localhost``, ``.test``, ...), and at most 254 octets in UTF-8 (RFC 5321; an address with non-ASCII
    characters reaches that before 254 characters). Display names (``Alice <a@example.com>``), angle
    brackets, quoted local parts and IP-address domains are refused: none names a mailbox better than its
    plain form, and each is a second spelling of an address.

    The stored form is the library's ``normalized``: the local part NFC-normalised and lower-cased, the
    domain as Unicode U-labels (``user@BÜCHER.de`` and ``user@xn--bcher-kva.de`` are both
    ``user@bücher.de``). U-labels rather than A-labels: they are what accounts registered before this check
    already stored (the NFC, lower-cased text people type), so their logins still match with no data
    migration; they are what a user recognises in ``user.email`` and in the access token's ``email`` claim;
    and the A-label is always derivable from them when mail has to be sent. Either form is one spelling per
    address, which is what keeps two accounts from sharing one.
    """
    email = _email_shape(value)
    try:
        checked = validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidRequest(f"'email' is not a valid email address: {exc}") from None
    return checked.normalized


def lookup_email(value: object) -> str:
    """The form in which a login looks an account up: the stored form of any address :func:`normalize_email`
    accepts, so every spelling of it finds the one account. An address the library refuses may still belong
    to an account registered before the library judged addresses: it is looked up as those were stored
    (trimmed, lower-cased, NFC), so such accounts can still sign in; they cannot be registered anew."""
    email = _email_shape(value)
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError:
        return email


def _email_shape(value: object) -> str:
    """The contract's rules for any email the issuer is given: a string; trimmed, lower-cased (compared
    case-insensitively) and NFC-normalised ("ü" typed as one code point or as "u" plus a combining mark is
    one address); at most 254 characters, counted in code points; one '@' between a local part and a
    domain; no spaces or control characters."""
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
        """Bump the token version and revoke every session, with the event verifiers follow, at once."""
        async with self._db.transaction() as tx:
            version = await users.log_out_everywhere(tx, user_id, now)
            if version is not None:
                await record.user_revoked(tx, user_id=user_id, token_version=version, now=now, reason="logout_all")

    async def delete(self, user: User, password: str, *, now: datetime) -> None:
        if not await self._passwords.verify(user.password_hash, password):
            raise WrongPassword()
        async with self._db.transaction() as tx:
            if await users.delete(tx, user.id):
                await record.account_purged(tx, user_id=user.id, now=now)
