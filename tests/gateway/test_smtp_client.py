"""The delivery client against scripted next hops: PIPELINING and what can go wrong.

Each next hop here is a plain TCP server on 127.0.0.1 that reads lines and
writes replies exactly as its script says, so the tests can show what the
client sent and when (an aiosmtpd sink would hide both). The whole-gateway
paths with a real aiosmtpd next hop are in test_delivery.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.smtp_client import BrokenConnection, Refused, Reply, SmtpClient, SmtpError

Script = Callable[["Peer"], Awaitable[None]]
PIPELINING_HOP = b"250-hop.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"
MESSAGE = b"Subject: hi\r\n\r\n.a line that starts with a dot\r\n"


class Peer:
    """The next hop's side of one connection, as a script drives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def line(self) -> bytes:
        return await self.reader.readline()

    async def lines(self, count: int) -> list[bytes]:
        return [await self.line() for _ in range(count)]

    async def say(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def greet(self, ehlo: bytes = PIPELINING_HOP) -> None:
        await self.say(b"220 hop.test ESMTP\r\n")
        assert (await self.line()).startswith(b"EHLO ")
        await self.say(ehlo)

    async def content(self) -> bytes:
        data = b""
        while not data.endswith(b"\r\n.\r\n"):
            data += await self.line()
        return data


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[int]:
    """A next hop that runs ``script`` for its one connection; its port.

    On the way out the script must have finished without an error: an
    assertion in it fails the test.
    """
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(Peer(reader, writer))
        except BaseException as exc:
            done.set_exception(exc)
            raise
        else:
            done.set_result(None)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
        await asyncio.wait_for(done, 10)
    finally:
        server.close()


async def connect(port: int) -> SmtpClient:
    return await SmtpClient.connect("127.0.0.1", port, local_hostname="cgw.test", wait=5)


async def send_through(
    hop: Script, recipients: list[str], options: tuple[str, ...] = ()
) -> dict[str, Reply]:
    """MESSAGE from dr@praxis.test through a scripted hop: what it said to each recipient."""
    async with scripted(hop) as port:
        client = await connect(port)
        try:
            return await client.send("dr@praxis.test", list(options), recipients, MESSAGE)
        finally:
            client.close()


async def test_the_envelope_goes_in_one_write_when_the_hop_offers_pipelining() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet()
        # Nothing is answered until MAIL, both RCPTs and DATA are here: a
        # client that waits for the reply to MAIL would wait in vain.
        envelope = await peer.lines(4)
        assert envelope == [
            b"MAIL FROM:<dr@praxis.test> SIZE=48\r\n",
            b"RCPT TO:<a@example.org>\r\n",
            b"RCPT TO:<b@example.org>\r\n",
            b"DATA\r\n",
        ]
        await peer.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go on\r\n")
        assert await peer.content() == MESSAGE.replace(b"\n.a", b"\n..a") + b".\r\n"
        await peer.say(b"250 2.0.0 queued as 1\r\n")

    recipients = ["a@example.org", "b@example.org"]
    said = await send_through(hop, recipients, ("SIZE=48",))
    assert said == dict.fromkeys(recipients, Reply(250, "2.0.0 queued as 1"))


async def test_one_refused_recipient_in_a_pipelined_envelope_keeps_its_reply() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet()
        await peer.lines(4)
        # The replies come in separate segments, as most servers write them.
        for reply in (b"250 ok\r\n", b"550 5.1.1 no such user\r\n", b"250 ok\r\n", b"354 go\r\n"):
            await peer.say(reply)
        await peer.content()
        await peer.say(b"250 queued\r\n")

    said = await send_through(hop, ["gone@x.test", "here@x.test"])
    assert said == {
        "gone@x.test": Reply(550, "5.1.1 no such user"),
        "here@x.test": Reply(250, "queued"),
    }


async def test_data_taken_after_every_recipient_was_refused_is_ended_with_a_lone_dot() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet()
        await peer.lines(3)
        await peer.say(b"250 ok\r\n550 no such user\r\n354 go on\r\n")  # RFC 2920 3.1
        assert await peer.line() == b".\r\n"  # not the message
        await peer.say(b"554 no valid recipients\r\n")
        assert await peer.line() == b"RSET\r\n"
        await peer.say(b"250 reset\r\n")
        assert await peer.line() == b"QUIT\r\n"
        await peer.say(b"221 bye\r\n")

    async with scripted(hop) as port:
        client = await connect(port)
        said = await client.send("dr@praxis.test", [], ["gone@x.test"], MESSAGE)
        assert said == {"gone@x.test": Reply(550, "no such user")}
        assert client.is_connected  # ready for the next message
        await client.quit()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_refused_mail_from_answers_for_every_recipient(pipelining: bool) -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet(PIPELINING_HOP if pipelining else b"250 hop.test\r\n")
        assert (await peer.line()).startswith(b"MAIL FROM:")
        if pipelining:
            await peer.lines(3)
            await peer.say(b"451 4.3.0 try later\r\n503 need MAIL\r\n503 need MAIL\r\n503 no\r\n")
        else:
            await peer.say(b"451 4.3.0 try later\r\n")
        assert await peer.line() == b"RSET\r\n"  # the envelope is never sent one by one
        await peer.say(b"250 reset\r\n")

    said = await send_through(hop, ["a@x.test", "b@x.test"])
    assert said == dict.fromkeys(["a@x.test", "b@x.test"], Reply(451, "4.3.0 try later"))


async def test_a_refused_data_answers_for_the_accepted_recipients_only() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet()
        await peer.lines(4)
        await peer.say(b"250 ok\r\n250 ok\r\n452 4.2.2 full\r\n554 5.7.1 no thanks\r\n")
        assert await peer.line() == b"RSET\r\n"
        await peer.say(b"250 reset\r\n")

    said = await send_through(hop, ["a@x.test", "b@x.test"])
    assert said == {"a@x.test": Reply(554, "5.7.1 no thanks"), "b@x.test": Reply(452, "4.2.2 full")}


async def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet(b"250-hop.test\r\n250 8BITMIME\r\n")
        for expected, reply in [
            (b"MAIL FROM:<dr@praxis.test>\r\n", b"250 ok\r\n"),
            (b"RCPT TO:<a@x.test>\r\n", b"550 no\r\n"),
            (b"RCPT TO:<b@x.test>\r\n", b"250 ok\r\n"),
            (b"DATA\r\n", b"354 go\r\n"),
        ]:
            assert await peer.line() == expected
            assert peer.reader.at_eof() or not peer.reader._buffer  # nothing sent ahead
            await peer.say(reply)
        await peer.content()
        await peer.say(b"250 done\r\n")

    async with scripted(hop) as port:
        client = await connect(port)
        assert not client.supports("PIPELINING") and client.supports("8bitmime")
        said = await client.send("dr@praxis.test", [], ["a@x.test", "b@x.test"], MESSAGE)
        assert said == {"a@x.test": Reply(550, "no"), "b@x.test": Reply(250, "done")}
        client.close()


async def test_a_hop_that_does_not_know_ehlo_gets_helo() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet(b"502 5.5.1 what?\r\n")
        assert await peer.line() == b"HELO cgw.test\r\n"
        await peer.say(b"250 hop.test\r\n")

    async with scripted(hop) as port:
        client = await connect(port)
        assert client.extensions == {}
        client.close()


async def test_a_reply_injected_behind_the_starttls_reply_ends_the_connection() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet(b"250-hop.test\r\n250 STARTTLS\r\n")
        assert await peer.line() == b"STARTTLS\r\n"
        # In the clear, after the 220: a man in the middle's EHLO reply that
        # must never be read as if it had come inside TLS (RFC 3207 5).
        await peer.say(b"220 go ahead\r\n250-hop.test\r\n250 AUTH PLAIN\r\n")
        assert await peer.reader.read() == b""  # the client hangs up, no handshake

    async with scripted(hop) as port:
        client = await connect(port)
        with pytest.raises(BrokenConnection, match="more than its reply to STARTTLS"):
            await client.starttls(ssl.create_default_context(), "hop.test")
        assert not client.is_connected


async def test_auth_login_where_the_hop_offers_nothing_else() -> None:
    def b64(text: str) -> bytes:
        return base64.b64encode(text.encode()) + b"\r\n"

    async def hop(peer: Peer) -> None:
        await peer.greet(b"250-hop.test\r\n250 AUTH LOGIN\r\n")
        assert await peer.line() == b"AUTH LOGIN\r\n"
        await peer.say(b"334 VXNlcm5hbWU6\r\n")
        assert await peer.line() == b64("relay")
        await peer.say(b"334 UGFzc3dvcmQ6\r\n")
        assert await peer.line() == b64("pässword")
        await peer.say(b"235 2.7.0 ok\r\n")

    async with scripted(hop) as port:
        client = await connect(port)
        await client.login("relay", "pässword")
        client.close()


async def test_refused_auth_and_missing_mechanisms_are_errors_that_say_so() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet(b"250-hop.test\r\n250 AUTH PLAIN\r\n")
        assert (await peer.line()).startswith(b"AUTH PLAIN ")
        await peer.say(b"535 5.7.8 bad credentials\r\n")

    async with scripted(hop) as port:
        client = await connect(port)
        with pytest.raises(Refused) as refused:
            await client.login("relay", "wrong")
        assert refused.value.reply == Reply(535, "5.7.8 bad credentials")
        client.extensions.pop("AUTH")
        with pytest.raises(SmtpError, match="offers no AUTH"):
            await client.login("relay", "wrong")
        client.close()


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"hello there\r\n", "not an SMTP reply"),
        (b"220-hop\r\n250 mixed codes\r\n", "not an SMTP reply"),
        (b"220 " + b"x" * 9000, "longer than 8192"),
        (b"220-hop\r\n" * 5000, "longer than 32 KiB"),
        (b"220 hop.test\r\n", "closed the connection"),  # then EOF instead of a reply to EHLO
    ],
    ids=["prose", "mixed-codes", "endless-line", "endless-reply", "eof"],
)
async def test_a_hop_that_does_not_speak_smtp_breaks_the_connection(sent: bytes, why: str) -> None:
    async def hop(peer: Peer) -> None:
        await peer.say(sent)

    async with scripted(hop) as port:
        with pytest.raises(BrokenConnection, match=why):
            await connect(port)


async def test_a_silent_hop_times_out_with_a_reason() -> None:
    async def hop(peer: Peer) -> None:
        await peer.reader.read()  # never greets; returns when the client gives up

    async with scripted(hop) as port:
        with pytest.raises(TimeoutError, match=r"took more than 0\.2 s to reply"):
            await SmtpClient.connect("127.0.0.1", port, local_hostname="cgw.test", wait=0.2)


async def test_a_control_character_never_reaches_the_wire() -> None:
    async def hop(peer: Peer) -> None:
        await peer.greet()
        assert await peer.reader.read() == b""  # the client closes without sending a thing

    async with scripted(hop) as port:
        client = await connect(port)
        with pytest.raises(ValueError, match="control character"):
            await client.send("dr@praxis.test\r\nRCPT TO:<x@evil.test>", [], ["a@x.test"], MESSAGE)
        client.close()
