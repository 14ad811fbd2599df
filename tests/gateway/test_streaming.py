"""Bounded memory for large messages: the pieces that stream.

- ``Sealer`` seals content that arrives in pieces into exactly the format
  ``StorageKey.seal`` writes, whatever the pieces' sizes.
- ``IncomingMessage`` takes DATA a line at a time: the stored message is the
  stamped header and the body byte for byte; a bare CR or LF anywhere, an
  unusable or oversized header, is caught and nothing is left in the spool.
- ``dot_stuffed`` writes DATA for the next hop in pieces, with the same
  transparency as writing it whole.
- ``CommandLines.buffered_lines`` hands DATA the lines already received
  exactly as one ``readuntil`` after another would, and leaves what follows
  the end of data for the next command; taking them together
  (``_DataReceipt.take_lines``) stores and refuses exactly what taking them
  one by one does.
- ``OctetBudget`` lets small messages share the budget, makes large ones wait
  in order, and lets one larger than the budget go alone.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consent_registry.db import session_scope
from gateway.budget import MachineTurn, OctetBudget
from gateway.crypto_at_rest import CHUNK_SIZE, StorageKey
from gateway.intake import HEADER_LIMIT, HeaderTooLarge, IncomingMessage
from gateway.smtp import _END_OF_DATA, CommandLines, _DataReceipt
from gateway.smtp_client import dot_stuffed
from gateway.spool import INLINE_LIMIT, FileSpool, store_inline
from tests.spools import file_spool

KEY = StorageKey(secrets.token_bytes(32))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from([0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 7]),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * CHUNK_SIZE), max_size=6),
)
def test_sealing_in_pieces_gives_the_same_format_as_sealing_whole(
    size: int, cuts: list[int]
) -> None:
    data = bytes(i % 251 for i in range(size))
    sealer = KEY.sealer("ref")
    sealed = b"".join(sealer.update(piece) for piece in _split(data, cuts)) + sealer.finish()
    assert KEY.open(sealed, "ref") == data
    assert len(sealed) == len(KEY.seal(data, "ref"))  # same chunking, same final marker


# --- IncomingMessage ----------------------------------------------------------------------

STAMP = b"Received: by test\r\n"


def _stamp(block: bytes) -> bytes:
    return STAMP + block + b"\r\n"


def _receive(tmp_path: Path, content: bytes) -> tuple[IncomingMessage, FileSpool]:
    spool = file_spool(tmp_path / "spool", KEY)
    message = IncomingMessage(spool.writer("M1"), _stamp)
    for line in content.splitlines(keepends=True):
        message.add(line)
    message.end()
    return message, spool


def _stored(message: IncomingMessage, spool: FileSpool) -> bytes:
    """Stored as intake stores it: a file (the long body), or inline (the rest)."""
    with spool.batch() as batch, session_scope(spool.engine) as session:
        batch.adopt(message.writer)
        store_inline(session, batch.inline, datetime.now(UTC))
    in_a_file = message.writer.size > INLINE_LIMIT
    assert batch.stored == (["M1"] if in_a_file else [])
    assert [mid for mid, _ in batch.inline] == ([] if in_a_file else ["M1"])
    assert [p.stem for p in spool.directory.glob("*.msg")] == batch.stored  # no file if inline
    loaded = spool.load("M1")
    # What intake hands to delivery in memory is what the spool holds, for
    # inline messages; one in a file is loaded from it.
    assert message.writer.content() == (None if in_a_file else loaded)
    return loaded


BODY = b"".join(b"line %06d of the body\r\n" % n for n in range(20_000))  # 480 kB


@pytest.mark.parametrize(
    ("content", "names", "expected"),
    [
        (
            b"From: a@x\r\nTo: b@y\r\n\r\n" + BODY,
            ["from", "to"],
            STAMP + b"From: a@x\r\nTo: b@y\r\n\r\n" + BODY,
        ),
        (b"From: a@x\r\n", ["from"], STAMP + b"From: a@x\r\n\r\n"),  # all header
        (b"\r\nbody\r\n", [], STAMP + b"\r\nbody\r\n"),  # no header at all
    ],
    ids=["header-and-body", "header-only", "body-only"],
)
def test_the_stored_message_is_the_stamped_header_and_the_body_byte_for_byte(
    tmp_path: Path, content: bytes, names: list[str], expected: bytes
) -> None:
    message, spool = _receive(tmp_path, content)
    assert not message.spoiled
    assert [f.name for f in message.fields] == names
    assert _stored(message, spool) == expected
    assert message.writer.size == len(expected)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"From: a@x\r\nX: a\nb\r\n\r\nbody\r\n", "bare LF"),
        (b"From: a@x\r\n\r\n" + BODY + b"smuggled\n.\nMAIL FROM:<x@y>\r\n", "bare LF"),
        (b"From: a@x\r\n\r\n" + BODY + b"smuggled\r.\rMAIL FROM:<x@y>\r\n", "bare CR"),
        # A bare LF after the header already failed is still what the reply names.
        (b"Not a header\r\nFrom: a@x\r\n\r\nbody\n.\n\r\n", "bare LF"),
    ],
    ids=["in-header", "lf-in-body", "cr-in-body", "after-a-bad-header"],
)
def test_a_bare_line_ending_anywhere_is_caught_and_nothing_is_kept(
    tmp_path: Path, content: bytes, kind: str
) -> None:
    message, _ = _receive(tmp_path, content)
    assert message.line_ending == kind
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_an_unusable_header_is_caught_and_nothing_is_kept(tmp_path: Path) -> None:
    message, _ = _receive(tmp_path, b"Not a header\r\nFrom: a@x\r\n\r\n" + BODY)
    assert message.header_error is not None and message.line_ending is None
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_a_header_over_the_limit_is_refused_without_holding_it(tmp_path: Path) -> None:
    fold = b" " + b"f" * 900 + b"\r\n"
    content = b"X-Long: x\r\n" + fold * (HEADER_LIMIT // len(fold) + 2) + b"\r\nbody\r\n"
    message, _ = _receive(tmp_path, content)
    assert isinstance(message.header_error, HeaderTooLarge)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


# --- dot_stuffed --------------------------------------------------------------------------

_PERIOD = re.compile(rb"(?m)^\.")  # aiosmtplib's transparency, applied to the whole message

lines = st.lists(
    st.sampled_from([b".", b"..", b".x", b"x.", b"", b"text", b"." * 70, b"a" * 998]),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(lines=lines)
def test_pieces_are_stuffed_as_the_whole_message_would_be(lines: list[bytes]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    assert b"".join(dot_stuffed(content)) == _PERIOD.sub(b"..", content)


def test_a_dot_at_the_start_of_a_piece_is_stuffed_too() -> None:
    first = b"a" * (65536 - 2) + b"\r\n"  # the second piece starts a line with a dot
    content = first + b".hidden\r\n"
    pieces = list(dot_stuffed(content))
    assert len(pieces) == 2 and pieces[1].startswith(b"..hidden")


def test_a_message_without_a_final_crlf_gets_one() -> None:
    assert b"".join(dot_stuffed(b"no newline")) == b"no newline\r\n"
    assert list(dot_stuffed(b"")) == []


# --- OctetBudget --------------------------------------------------------------------------


def test_the_budget_shares_small_messages_and_serves_large_ones_alone_and_in_order() -> None:
    async def scenario() -> list[str]:
        budget = OctetBudget(100)
        log: list[str] = []
        release = {name: asyncio.Event() for name in ("a", "b", "big", "c")}

        async def deliver(name: str, size: int) -> None:
            async with budget.hold(size):
                log.append(f"+{name}")
                await release[name].wait()
                log.append(f"-{name}")

        tasks = [asyncio.create_task(deliver("a", 40)), asyncio.create_task(deliver("b", 40))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(deliver("big", 500)))  # over the budget: alone
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(deliver("c", 10)))  # fits, but waits its turn
        for _ in range(5):
            await asyncio.sleep(0)
        assert log == ["+a", "+b"]
        release["a"].set()
        release["b"].set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert budget.used == 500
        release["big"].set()
        release["c"].set()
        await asyncio.gather(*tasks)
        assert budget.used == 0
        return log

    assert asyncio.run(scenario()) == ["+a", "+b", "-a", "-b", "+big", "-big", "+c", "-c"]


_HOLD_THE_TURN = """
import asyncio, sys
from pathlib import Path
from gateway.budget import MachineTurn

async def main():
    async with MachineTurn(Path(sys.argv[1])).hold():
        print("holding", flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""


def test_a_large_delivery_waits_for_another_worker_process_holding_the_machine_turn(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "large-delivery.lock"
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_TURN, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdin is not None and other.stdout is not None
    try:
        assert other.stdout.readline() == "holding\n"

        async def scenario() -> list[str]:
            turn = MachineTurn(lock)
            log: list[str] = []

            async def ours() -> None:
                async with turn.hold():
                    log.append("ours")

            given_up = asyncio.create_task(ours())  # a waiter cancelled while it polls
            await asyncio.sleep(0.12)
            given_up.cancel()
            await asyncio.gather(given_up, return_exceptions=True)
            waiting = asyncio.create_task(ours())
            await asyncio.sleep(0.3)  # several polls: still the other process's turn
            log.append("other ends")
            other.stdin.close()  # type: ignore[union-attr]
            await asyncio.wait_for(waiting, 10)
            return log

        assert asyncio.run(scenario()) == ["other ends", "ours"]
    finally:
        other.kill()
        other.wait()


_END = b".\r\n"


async def _data_lines(stream: bytes, limit: int, drain: bool) -> tuple[list[bytes], bytes]:
    """DATA's lines from ``stream`` (as ``SubmissionProtocol._receive`` reads
    them, with or without ``buffered_lines``) up to the end of data, and what
    is left for the next command."""
    reader = CommandLines(limit=limit)
    reader.feed_data(stream)
    reader.feed_eof()
    lines: list[bytes] = []
    waiting: list[bytes] = []
    mid_line = False
    while True:
        if waiting:
            line = waiting.pop(0)
        else:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                line = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                break
            else:
                if drain and line != _END:
                    waiting.extend(reader.buffered_lines(_END))
        lines.append(line)
        if not mid_line and line == _END:
            break
        mid_line = not line.endswith(b"\r\n")
    assert not waiting
    return lines, await reader.read()


@given(
    st.lists(st.sampled_from([b"a", b"bc", b"\r", b"\n", b".", b"\r\n", _END]), max_size=60),
    st.integers(3, 12),
)
@example([b"a", b"\r\n", b"bc" * 3, b"\r\n", _END, b"a"], 5)  # a line one octet past the limit
@example([b"a", b"\r\n", b"bc" * 2, b"a", b"\r\n", _END, b"a"], 5)  # and one at it
@settings(max_examples=300)
def test_buffered_lines_are_the_lines_readuntil_returns(pieces: list[bytes], limit: int) -> None:
    stream = b"".join(pieces)
    one_by_one = asyncio.run(_data_lines(stream, limit, drain=False))
    drained = asyncio.run(_data_lines(stream, limit, drain=True))
    assert drained == one_by_one


_DATA_LINES = [
    b"From: a@x\r\n",
    b"X: y\r\n",
    b"\r\n",
    b"..dot\r\n",
    b".x\r\n",
    b"body\r\n",
    b"a\nb\r\n",  # bare LF
    b"c\rd\r\n",  # bare CR
    b"Not a header\r\n",
    b"y" * 998 + b"\r\n",  # at the line limit
    b"z" * 999 + b"\r\n",  # one past it
]


_MESSAGE_IDS = itertools.count()


@pytest.fixture(scope="module")
def receipt_spool(tmp_path_factory: pytest.TempPathFactory) -> FileSpool:
    return file_spool(tmp_path_factory.mktemp("receipt") / "spool", KEY)


def _taken(
    spool: FileSpool, batches: list[list[bytes]], size_limit: int | None, together: bool
) -> tuple[str | None, int, str | None, bool, bytes | None]:
    """What DATA's batches came to: the refusal, the size counted, the bare
    line ending, whether the header was usable, and the content kept."""
    message = IncomingMessage(spool.writer(f"M{next(_MESSAGE_IDS)}"), _stamp)
    receipt = _DataReceipt(message, size_limit, 1000)
    for batch in batches:
        if receipt.take_lines(batch) if together else any(map(receipt.take, batch)):
            break
    else:
        raise AssertionError("the end of data was not seen")
    if receipt.refusal is None:
        message.end()
    kept = None
    if receipt.refusal is None and not message.spoiled:
        message.writer.close(sync=False)
        kept = message.writer.content()
        assert kept is not None  # each message here is under the inline limit
    message.discard()
    return receipt.refusal, receipt.size, message.line_ending, message.header_error is None, kept


@given(
    lines=st.lists(st.sampled_from(_DATA_LINES), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    size_limit=st.sampled_from([None, 0, 50, 1200, 3000]),
)
@example(lines=[b"X: y\r\n", b"\r\n", b"..dot\r\n", b".x\r\n"], cuts=[1], size_limit=None)
@example(lines=[b"From: a@x\r\n", b"\r\n", b"y" * 998 + b"\r\n"], cuts=[], size_limit=None)
@example(lines=[b"From: a@x\r\n", b"\r\n", b"z" * 999 + b"\r\n"], cuts=[], size_limit=None)
@example(lines=[b"From: a@x\r\n", b"\r\n", b"body\r\n"], cuts=[], size_limit=18)
@example(lines=[b"From: a@x\r\n", b"\r\n", b"body\r\n"], cuts=[], size_limit=19)
@settings(max_examples=150, deadline=None)
def test_lines_taken_together_are_stored_and_refused_as_taken_one_by_one(
    receipt_spool: FileSpool,
    lines: list[bytes],
    cuts: list[int],
    size_limit: int | None,
) -> None:
    data = [*lines, _END_OF_DATA]
    points = sorted({0, len(data), *(c % len(data) for c in cuts)})
    batches = [data[a:b] for a, b in itertools.pairwise(points)]
    assert _taken(receipt_spool, batches, size_limit, together=True) == _taken(
        receipt_spool, batches, size_limit, together=False
    )
