"""A DNS server on 127.0.0.1 for tests: answers from a table, NXDOMAIN otherwise."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        answers = self.zone.get((name, rdtype))
        if answers:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *answers))
        elif not any(n == name for n, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


class FakeDns:
    """``zone`` maps (name, type) to record texts, e.g. ("example.org", "MX"): ["10 mx1.test."]."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> FakeDns:
        self.thread.start()

        async def listen() -> asyncio.DatagramTransport:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Protocol(self.zone), local_addr=("127.0.0.1", 0)
            )
            return transport

        self.transport = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.transport.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
