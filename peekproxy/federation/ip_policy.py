"""The outbound address policy of federation requests (``federation.ip_range_blacklist`` and
``federation.ip_range_whitelist``).

:class:`IpFilter` decides, for each address a target host resolves to, whether
:class:`~peekproxy.federation.client.FederationClient` may connect there; it is asked *before*
connecting, so a server name cannot point peekproxy at the local network (as Synapse's
``ip_range_blacklist``). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IpFilter", "NetworkType"]

#: One entry of the address lists.
NetworkType = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class IpFilter:
    """Outbound address policy: refused if in ``blacklist`` and not in ``whitelist``.

    The unspecified addresses ``0.0.0.0`` and ``::`` are always refused.
    """

    blacklist: Sequence[NetworkType]
    whitelist: Sequence[NetworkType] = ()

    def allowed(self, address: str) -> bool:
        """Whether a connection to ``address`` (an IPv4 or IPv6 address in text form) is
        allowed. Raises ``ValueError`` when ``address`` is not an IP address."""
        ip = ipaddress.ip_address(address)
        if ip.is_unspecified:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            candidates += _embedded_ipv4(ip)
        if any(c in net for c in candidates for net in self.whitelist if net.version == c.version):
            return True
        return not any(
            c.is_unspecified or c in net
            for c in candidates
            for net in self.blacklist
            if net.version == c.version
        )


_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 one (mapped, compatible, NAT64, 6to4): they are
    checked against the IPv4 lists too, so ``::ffff:127.0.0.1`` cannot dodge ``127.0.0.0/8``."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _COMPAT or ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    return found
