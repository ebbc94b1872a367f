"""Suspicious refreshes (REFRESH_BINDING): a refresh whose network and user agent both differ from every one of
its session's recent uses.

The network is the /24 of an IPv4 address and the /64 of an IPv6 one, so a phone moving between addresses of
one carrier network, or a home router renumbering, stays the same device; a browser update changes only the
user agent. Both changing at once is what a refresh token replayed from the thief's own machine looks like.
An unknown client address (no peer, an untrusted proxy's garbage) never counts as a change: it proves nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from issuer.storage.sessions import Use

OFF, AUDIT, REJECT = "off", "audit", "reject"


def network(ip: str | None) -> str | None:
    """The /24 (IPv4) or /64 (IPv6) an address belongs to; IPv4-mapped IPv6 counts as IPv4."""
    if ip is None:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if isinstance(address, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def suspicious(ip: str | None, user_agent: str | None, recent: Sequence[Use]) -> bool:
    """True when ``ip``'s network and ``user_agent`` both differ from every recent use of the session."""
    here = network(ip)
    if here is None or not recent:
        return False
    networks = {network(use.ip) for use in recent}
    agents = {use.user_agent for use in recent}
    return here not in networks and user_agent not in agents
