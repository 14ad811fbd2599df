"""Fresh mail handed from intake to delivery: queued already claimed, no claim round.

The queue rows stay the record: a handed-over recipient is claimed like any
other, so should the process die, its claim lapses and it is delivered later.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from consent_registry.db import make_engine, session_scope
from consent_registry.models import QueueRecipient
from consent_registry.writes import DirectWrites
from gateway.app import initialise
from gateway.audit import AuditLog, audit_key
from gateway.delivery import DeliveryWorker
from gateway.intake import Intake
from gateway.queue import Claim, ClaimedMessage, QueuedRecipient, QueueStore
from gateway.reports import Reports
from gateway.settings import Settings
from policies.decision import Decision, Outcome, Reason
from tests.gateway.test_reports import (  # noqa: F401 (parts is a fixture)
    COLLEAGUE,
    DRSMITH,
    HOSTNAME,
    NOW,
    SENDER,
    Parts,
    parts,
)

T = TypeVar("T")

LEASE = timedelta(minutes=10)


@pytest.fixture
def queue(make_settings: Callable[..., Settings]) -> Iterator[QueueStore]:
    settings = make_settings()
    initialise(settings)
    engine = make_engine(settings.database_url)
    try:
        yield QueueStore(engine, "this-instance", LEASE)
    finally:
        engine.dispose()


def _queue_claimed(queue: QueueStore, message_id: str, claim: Claim | None) -> tuple[int, ...]:
    recipients = [
        QueuedRecipient("a@practice.example"),
        QueuedRecipient("held@partner.example", reason="UNKNOWN_EXTERNAL", quarantined=True),
        QueuedRecipient("b@practice.example", protection="tls_required"),
    ]
    with session_scope(queue.engine) as session:
        claimed = QueueStore.enqueue(
            session, message_id, "dr@practice.example", "drsmith", 10, recipients, NOW, claim=claim
        )
    return tuple(r.row_id for r in claimed)


def test_recipients_queued_claimed_are_returned_with_their_rows_and_held_ones_stay_unclaimed(
    queue: QueueStore,
) -> None:
    until = NOW + LEASE
    ids = _queue_claimed(queue, "M1", Claim("this-instance", until))

    with Session(queue.engine) as session:
        rows = {r.address: r for r in session.exec(select(QueueRecipient)).all()}
    assert ids == (rows["a@practice.example"].id, rows["b@practice.example"].id)
    assert [(rows[a].claimed_by, rows[a].claimed_until) for a in sorted(rows)] == [
        ("this-instance", until),
        ("this-instance", until),
        (None, None),
    ]
    assert rows["b@practice.example"].protection == "tls_required"


def test_a_handed_over_recipient_is_nobody_elses_until_its_claim_lapses(
    queue: QueueStore,
) -> None:
    until = NOW + LEASE
    _queue_claimed(queue, "M1", Claim("this-instance", until))
    other = QueueStore(queue.engine, "other-instance", LEASE)

    assert other.claim_due(NOW + timedelta(minutes=1), 10) == []
    assert queue.next_due() == until  # claimed: not due before the lease ends
    taken = other.claim_due(until + timedelta(seconds=1), 10)
    assert [r.address for m in taken for r in m.recipients] == [
        "a@practice.example",
        "b@practice.example",
    ]


def test_without_a_claim_recipients_are_due_at_once(queue: QueueStore) -> None:
    assert _queue_claimed(queue, "M1", None) == ()
    assert queue.next_due() == NOW
    taken = queue.claim_due(NOW, 10)
    assert [m.message_id for m in taken] == ["M1"]


def test_delivery_reserves_no_more_slots_than_it_has(queue: QueueStore) -> None:
    # Collaborators the slot accounting never touches.
    worker = DeliveryWorker(queue, None, None, None, None, None, None, concurrency=2)  # type: ignore[arg-type]

    async def scenario() -> list[bool]:
        first, second, third = (worker.reserve(NOW) for _ in range(3))
        assert first == Claim("this-instance", NOW + LEASE)
        seen = [first is not None, second is not None, third is not None]
        worker.hand_over(None)  # the store failed: the slot is free again
        seen.append(worker.reserve(NOW) is not None)
        worker.stop()
        worker.hand_over(None)
        worker.hand_over(None)
        seen.append(worker.reserve(NOW) is not None)  # a stopping worker takes nothing new
        return seen

    assert asyncio.run(scenario()) == [True, True, False, True, False]


class _GatedWrites:
    """The real writes, in a thread of their own as the group commit's, held
    at the door until the test lets them in."""

    def __init__(self, engine: Engine) -> None:
        self.inner = DirectWrites(engine)
        self.entered = threading.Event()
        self.go = threading.Event()

    def run(self, work: Callable[[Session], T]) -> T:
        return self._submit(work).result(30)

    async def commit(self, work: Callable[[Session], T], deferrable: bool = False) -> T:
        return await asyncio.wrap_future(self._submit(work))

    def _submit(self, work: Callable[[Session], T]) -> Future[T]:
        def gated() -> None:
            self.entered.set()
            self.go.wait(10)
            done.set_result(self.inner.run(work))

        done: Future[T] = Future()
        threading.Thread(target=gated, daemon=True).start()
        return done


class _Deliveries:
    """A delivery stage with one slot, noting what it was handed."""

    def __init__(self) -> None:
        self.handed: list[ClaimedMessage | None] = []

    def reserve(self, now: datetime) -> Claim | None:
        return Claim("this-instance", now + LEASE)

    def hand_over(self, message: ClaimedMessage | None) -> None:
        self.handed.append(message)


def test_a_session_that_ends_while_its_message_is_stored_still_hands_it_over(
    parts: Parts,  # noqa: F811 (the fixture imported above)
) -> None:
    # The client hung up after "." (aiosmtpd cancels the session) while the
    # store was committing recipients claimed for delivery: they must reach
    # delivery when the commit lands, not wait for the lease.
    writes = _GatedWrites(parts.engine)
    deliveries = _Deliveries()
    audit = AuditLog(audit_key(parts.settings)[0])
    intake = Intake(
        writes,
        parts.spool,
        audit,
        Reports(audit, HOSTNAME, timedelta(days=30)),
        HOSTNAME,
        lambda: None,
        clock=lambda: NOW,
        deliveries=deliveries,
    )
    message = intake.receive()
    for line in f"From: {SENDER}\r\nSubject: rota\r\n\r\nhello\r\n".encode().splitlines(True):
        message.add(line)
    message.end()
    allowed = [(COLLEAGUE, Decision(Outcome.ALLOW, Reason.INTERNAL, "internal-recipient"))]

    async def scenario() -> None:
        session = asyncio.create_task(intake.accept(DRSMITH, SENDER, allowed, message))
        assert await asyncio.to_thread(writes.entered.wait, 10)
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        assert deliveries.handed == []  # the store is still under way
        writes.go.set()
        for _ in range(500):
            if deliveries.handed:
                return
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    (handed,) = deliveries.handed
    assert handed is not None
    with Session(parts.engine) as session:
        (row,) = session.exec(select(QueueRecipient)).all()
    assert (handed.message_id, [r.row_id for r in handed.recipients]) == (row.message_id, [row.id])
    assert row.claimed_by == "this-instance"


def test_a_claim_leaves_slots_for_hand_overs_while_mail_flows(queue: QueueStore) -> None:
    worker = DeliveryWorker(queue, None, None, None, None, None, None, concurrency=8)  # type: ignore[arg-type]

    async def scenario() -> list[int]:
        idle = worker._claimable()  # nothing in delivery: a claim may take every slot
        worker.reserve(NOW)  # a message being queued: a quarter stays for the next ones
        flowing = worker._claimable()
        claim = worker._claimable()
        worker._reserved += claim  # as a claim holds its slots ...
        left = [worker.reserve(NOW) is not None for _ in range(3)]  # ... hand-overs still get some
        return [idle, flowing, sum(left)]

    assert asyncio.run(scenario()) == [8, 5, 2]
