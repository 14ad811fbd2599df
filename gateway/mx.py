"""Where a domain's mail goes: its MX hosts in preference order (RFC 5321 §5.1).

A domain without MX records is its own mail host (the implicit MX); a
"null MX" (RFC 7505: one record, preference 0, host ".") accepts no mail,
which is a permanent failure. DNS failures are temporary.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver


class MxLookupError(Exception):
    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def make_resolver(servers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver:
    """The system's resolver, or the given servers (``CGW_DNS_RESOLVERS``)."""
    if not servers:
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host for host, _ in servers]
    resolver.nameserver_ports = dict(servers)
    resolver.lifetime = 10.0
    return resolver


async def mail_hosts(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """Host names to try for ``domain``, best first."""
    try:
        answer = await resolver.resolve(domain, "MX")
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN) as exc:
        if isinstance(exc, dns.resolver.NXDOMAIN):
            raise MxLookupError(f"the domain {domain} does not exist", permanent=True) from None
        return [domain]  # no MX: the implicit MX is the domain itself
    except dns.exception.DNSException as exc:
        raise MxLookupError(f"DNS lookup of {domain} failed: {exc}", permanent=False) from None
    records = sorted(
        ((r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer),
        key=lambda pair: pair[0],
    )
    if len(records) == 1 and records[0][1] in ("", "."):
        raise MxLookupError(f"{domain} accepts no mail (null MX)", permanent=True)
    return [host for _, host in records if host not in ("", ".")]


async def host_addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """IPv6 and IPv4 addresses of a mail host (empty when it has none)."""
    found: list[str] = []
    for rdtype in ("AAAA", "A"):
        try:
            answer = await resolver.resolve(host, rdtype)
        except dns.exception.DNSException:
            continue
        found += [r.to_text() for r in answer]
    return found
