"""Security Event Tokens (RFC 8417) from the issuer's revocation feed: checked, then read as a :class:`Revocation`.

A SET is applied only if all of this holds; anything else raises :class:`SETRefused` with a stable ``reason``:

- compact JWS of at most ``MAX_SET_LENGTH`` characters; header ``alg`` RS256 (checked before any key is looked
  up, so ``none`` and HS256-with-the-public-key never reach a key), ``typ`` ``secevent+jwt``, a ``kid``, and
  none of ``jku``/``x5u``/``jwk``/``x5c``/``crit``/``b64`` (keys come from the JWKS only);
- the signature, by joserfc, with the key of that ``kid`` in the issuer's JWKS (a key revoked by the issuer has
  left the JWKS, so its SETs are refused like any other unknown key);
- ``iss`` is the issuer, ``aud`` our client id, ``jti`` the key the SET was delivered under, ``iat`` a number;
- ``events`` has exactly one member, of a type and subject shape this module knows (the three kinds of the
  feed: a session revoked, a user's token version raised, an account purged), whose subject's ``iss`` is the
  issuer too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from joserfc import errors as jose_errors
from joserfc import jws
from joserfc.jwk import RSAKey

from issuer.verifier.revocations import AccountPurged, Revocation, SessionRevoked, TokenVersionRaised

# The same header rules as access tokens (issuer.verifier.verify), with the SET's own typ.
from issuer.verifier.verify import ALLOWED_ALGORITHMS, COMPACT_JWS, REFUSED_HEADER_PARAMETERS

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
ACCOUNT_PURGED = "https://schemas.openid.net/secevent/risc/event-type/account-purged"
# The media type RFC 8417 registers, as issuer.events.sets writes it.
SET_TYP = "secevent+jwt"
SET_TYPES = frozenset({SET_TYP, f"application/{SET_TYP}"})
MAX_SET_LENGTH = 16 * 1024
MAX_ID_LENGTH = 512


class SETRefused(Exception):
    """A SET that is not applied. ``reason`` is stable, for counters and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ParsedSET:
    """A SET whose header passed the allow-list; nothing in it is trusted yet."""

    token: str
    kid: str


def parse_set(token: object) -> ParsedSET:
    """Split the SET and check its header. Touches no key."""
    if not isinstance(token, str) or len(token) > MAX_SET_LENGTH or not COMPACT_JWS.fullmatch(token):
        raise SETRefused("malformed", "not a compact JWS")
    try:
        header = jws.extract_compact(token.encode("ascii")).headers()
    except (jose_errors.JoseError, ValueError, TypeError, UnicodeError):
        raise SETRefused("malformed", "unreadable header") from None
    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise SETRefused("unsupported_alg", f"alg {header.get('alg')!r} is not RS256")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in SET_TYPES:
        raise SETRefused("wrong_typ", f"typ {typ!r} is not secevent+jwt")
    if not REFUSED_HEADER_PARAMETERS.isdisjoint(header):
        raise SETRefused("refused_header", "the header carries key-locating or critical parameters")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise SETRefused("unknown_kid", "no kid")
    return ParsedSET(token, kid)


def verified_claims(parsed: ParsedSET, key: RSAKey) -> dict[str, Any]:
    """The SET's claims once joserfc has checked its RS256 signature with ``key``."""
    try:
        compact = jws.deserialize_compact(parsed.token, key, algorithms=list(ALLOWED_ALGORITHMS))
    except jose_errors.BadSignatureError:
        raise SETRefused("bad_signature", "the signature does not verify") from None
    except (jose_errors.JoseError, ValueError, TypeError):
        raise SETRefused("malformed", "joserfc could not read it") from None
    try:
        claims = json.loads(compact.payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SETRefused("malformed", "the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise SETRefused("malformed", "the payload is not a JSON object")
    return claims


def read_revocation(claims: dict[str, Any], *, issuer: str, audience: str, jti: str) -> Revocation:
    """The revocation a verified SET describes, or :class:`SETRefused`."""
    if claims.get("iss") != issuer:
        raise SETRefused("wrong_issuer", f"iss {claims.get('iss')!r}")
    aud = claims.get("aud")
    if not (aud == audience or (isinstance(aud, list) and audience in aud)):
        raise SETRefused("wrong_audience", f"aud {aud!r}")
    if claims.get("jti") != jti:
        raise SETRefused("wrong_jti", "jti differs from the key it was delivered under")
    iat = claims.get("iat")
    if not _is_number(iat):
        raise SETRefused("bad_event", "iat is missing or not a number")
    events = claims.get("events")
    if not isinstance(events, dict) or len(events) != 1:
        raise SETRefused("bad_event", "events must have exactly one member")
    [(event_type, event)] = events.items()
    if not isinstance(event, dict):
        raise SETRefused("bad_event", "the event is not an object")
    timestamp = event.get("event_timestamp", iat)
    if not _is_number(timestamp):
        raise SETRefused("bad_event", "event_timestamp is not a number")
    # The later of the two: retention is counted from it, so later is the safe side.
    at = float(max(timestamp, iat))
    sub_id = claims.get("sub_id")
    if event_type == ACCOUNT_PURGED:
        return AccountPurged(user=_user(sub_id, issuer), at=at)
    if event_type == SESSION_REVOKED:
        if isinstance(sub_id, dict) and sub_id.get("format") == "complex":
            if "token_version" in event:
                raise SETRefused("bad_event", "a session subject with a token_version")
            return SessionRevoked(user=_user(sub_id.get("user"), issuer), sid=_session(sub_id), at=at)
        version = event.get("token_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SETRefused("bad_event", "a user-level session-revoked needs an integer token_version")
        return TokenVersionRaised(user=_user(sub_id, issuer), version=version, at=at)
    raise SETRefused("unknown_event", f"event type {event_type!r}")


def _user(sub_id: object, issuer: str) -> str:
    """The user id of an ``iss_sub`` subject identifier (RFC 9493) naming our issuer."""
    if not isinstance(sub_id, dict) or sub_id.get("format") != "iss_sub":
        raise SETRefused("bad_event", "the subject is not an iss_sub identifier")
    if sub_id.get("iss") != issuer:
        raise SETRefused("wrong_issuer", "the subject names another issuer")
    return _identifier(sub_id.get("sub"), "sub")


def _session(sub_id: dict[str, Any]) -> str:
    session = sub_id.get("session")
    if not isinstance(session, dict) or session.get("format") != "opaque":
        raise SETRefused("bad_event", "the session is not an opaque identifier")
    return _identifier(session.get("id"), "session id")


def _identifier(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise SETRefused("bad_event", f"the {what} is not a non-empty string")
    return value


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
