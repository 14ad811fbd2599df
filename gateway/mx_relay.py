"""Direct delivery to each recipient domain's MX hosts (``CGW_DELIVERY=mx``).

Hosts are tried in preference order, each of their addresses in turn, until
one completes the transaction. The TLS a recipient gets is what its decision
demands: a recipient whose consent allows only TLS gets nothing unless the
host offers STARTTLS with a certificate that verifies for the MX host name;
everyone else (mail already S/MIME-encrypted, internal mail, consents that
accept plain delivery) gets STARTTLS whenever the host offers it, as
Postfix's ``smtp_tls_security_level = may`` does.
"""

from __future__ import annotations

import ssl
from collections import defaultdict
from collections.abc import Collection, Sequence

import dns.asyncresolver

from consent_registry.addresses import AddressError, parse_address
from gateway.mx import MxLookupError, host_addresses, mail_hosts
from gateway.queue import RecipientResult, Verdict
from gateway.relay import describe_failure, transaction
from gateway.smtp_client import SmtpClient, SmtpError


class _TryNextHost(Exception):
    """This host did not take the message; another one may."""


def _opportunistic_context() -> ssl.SSLContext:
    """Encryption without authentication, for mail that does not demand it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class MxRelay:
    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        port: int,
        verified_context: ssl.SSLContext,
        local_hostname: str,
        timeout: float,
    ) -> None:
        self.resolver = resolver
        self.port = port
        self.verified_context = verified_context
        self.opportunistic_context = _opportunistic_context()
        self.local_hostname = local_hostname
        self.timeout = timeout

    async def send(
        self,
        message_id: str,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        verified: Collection[str] = (),
    ) -> dict[str, RecipientResult]:
        groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
        for address in recipients:
            try:
                domain = parse_address(address).domain
            except AddressError:
                domain = address.rpartition("@")[2].lower()
            groups[(domain, address in verified)].append(address)
        results: dict[str, RecipientResult] = {}
        for (domain, need_verified), group in groups.items():
            results.update(await self._to_domain(domain, need_verified, mail_from, group, content))
        return results

    async def close(self) -> None:
        """Each transaction has its own connection; nothing to release."""

    async def _to_domain(
        self, domain: str, need_verified: bool, mail_from: str, group: list[str], content: bytes
    ) -> dict[str, RecipientResult]:
        try:
            hosts = await mail_hosts(self.resolver, domain)
        except MxLookupError as exc:
            verdict = Verdict.FAILED if exc.permanent else Verdict.DEFERRED
            status = "550 5.1.2" if exc.permanent else "451 4.4.3"
            return dict.fromkeys(group, RecipientResult(verdict, f"{status} {exc}"))
        last = f"no mail host of {domain} could be reached"
        for host in hosts:
            for address in await host_addresses(self.resolver, host):
                try:
                    return await self._transaction(
                        address, host, need_verified, mail_from, group, content
                    )
                except _TryNextHost as exc:
                    last = str(exc)
        return dict.fromkeys(group, RecipientResult(Verdict.DEFERRED, last))

    async def _transaction(
        self,
        address: str,
        host: str,
        need_verified: bool,
        mail_from: str,
        group: list[str],
        content: bytes,
    ) -> dict[str, RecipientResult]:
        client = None
        try:
            client = await SmtpClient.connect(
                address, self.port, local_hostname=self.local_hostname, wait=self.timeout
            )
            if client.supports("STARTTLS"):
                context = self.verified_context if need_verified else self.opportunistic_context
                await client.starttls(context, server_hostname=host)
            elif need_verified:
                raise _TryNextHost(f"{host} does not offer STARTTLS, which this consent requires")
            return await transaction(client, mail_from, group, content)
        except (SmtpError, OSError, TimeoutError) as exc:
            raise _TryNextHost(f"{host}: {describe_failure(exc)}") from exc
        finally:
            if client is not None:
                await client.quit()
