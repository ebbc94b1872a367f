"""Suspicious refreshes (REFRESH_BINDING): a refresh whose network and user agent both differ from every one of
its session's recent uses.

The network is the /24 of an IPv4 address and the /64 of an IPv6 one, so a phone moving between addresses of
one carrier network, or a home router renumbering, stays the same device; a browser update changes only the
user agent. Both changing at once is what a refresh token replayed from the thief's own machine looks like.
An unknown client address (no peer, an untrusted proxy's garbage) never counts as a change: it proves nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from issuer.storage.sessions import Use

OFF, AUDIT, REJECT = "off", "audit", "reject"


@functools.lru_cache(maxsize=65536)
def network(ip: str | None) -> tuple[int, int] | None:
    """The /24 (IPv4) or /64 (IPv6) an address belongs to, as (version, prefix); IPv4-mapped IPv6 counts as
    IPv4. Cached: a session's few addresses come back on every refresh."""
    if ip is None:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return 4, int(address) >> 8
    return 6, int(address) >> 64


def suspicious(ip: str | None, user_agent: str | None, recent: Sequence[Use]) -> bool:
    """True when ``ip``'s network and ``user_agent`` both differ from every recent use of the session."""
    if not recent or any(use.user_agent == user_agent for use in recent):
        return False  # the usual refresh: the same browser (checked first: it costs no address parsing)
    here = network(ip)
    return here is not None and all(network(use.ip) != here for use in recent)
