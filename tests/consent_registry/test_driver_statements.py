"""DriverStatement stores exactly what SQLAlchemy's execution would, on the
caller's transaction, and fails the way SQLAlchemy does."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Enum,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from consent_registry.db import make_engine
from consent_registry.driver_statements import DriverStatement


class Colour(enum.Enum):
    red = "red"
    green = "green"


metadata = MetaData()
things = Table(
    "driver_things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False, unique=True),
    Column("colour", Enum(Colour), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("state", String(10), nullable=False, default="new"),
)

AT = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    metadata.create_all(engine)
    yield engine
    metadata.drop_all(engine)
    engine.dispose()


def _rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(things).order_by(things.c.id))]


def test_inserts_the_same_values_as_sqlalchemy(engine: Engine) -> None:
    driver_insert = DriverStatement(insert(things))
    with engine.begin() as connection:
        connection.execute(insert(things), {"id": 1, "name": "a", "colour": Colour.red, "at": AT})
        driver_insert.run(connection, {"id": 2, "name": "b", "colour": Colour.red, "at": AT})
        driver_insert.run_many(
            connection,
            [
                {"id": 3, "name": "c", "colour": Colour.green, "at": AT, "state": "old"},
                {"id": 4, "name": "d", "colour": Colour.green, "at": AT, "state": "old"},
            ],
        )
    stored = _rows(engine)
    # The enum's name, the column default and the timestamp come back as
    # SQLAlchemy's own insert stored them.
    assert stored[1][1:] == ("b", *stored[0][2:])
    assert [r[1:] for r in stored[2:]] == [
        ("c", Colour.green, stored[0][3], "old"),
        ("d", Colour.green, stored[0][3], "old"),
    ]
    assert stored[0][2:] == (Colour.red, stored[0][3], "new")


def test_update_counts_rows_and_fetch_returns_them(engine: Engine) -> None:
    driver_insert = DriverStatement(insert(things))
    close = DriverStatement(
        update(things).where(things.c.colour == Colour.red).values(state="closed")
    )
    by_colour = DriverStatement(
        select(things.c.name).where(things.c.colour == Colour.green).order_by(things.c.name)
    )
    with engine.begin() as connection:
        driver_insert.run_many(
            connection,
            [
                {"id": n, "name": f"t{n}", "colour": colour, "at": AT}
                for n, colour in [(1, Colour.red), (2, Colour.green), (3, Colour.red)]
            ],
        )
        assert close.run(connection, {}) == 2
        assert by_colour.fetch(connection, [{}]) == [("t2",)]
    assert [r[4] for r in _rows(engine)] == ["closed", "new", "closed"]


def test_runs_in_the_callers_transaction(engine: Engine) -> None:
    driver_insert = DriverStatement(insert(things))
    with pytest.raises(RuntimeError), engine.begin() as connection:
        driver_insert.run(connection, {"id": 1, "name": "a", "colour": Colour.red, "at": AT})
        raise RuntimeError("roll back")
    assert _rows(engine) == []


def test_driver_errors_are_sqlalchemys(engine: Engine) -> None:
    driver_insert = DriverStatement(insert(things))
    row = {"id": 1, "name": "a", "colour": Colour.red, "at": AT}
    with engine.begin() as connection:
        driver_insert.run(connection, row)
    with pytest.raises(IntegrityError) as caught, engine.begin() as connection:
        driver_insert.run(connection, {**row, "id": 2})
    assert caught.value.orig is not None
    assert len(_rows(engine)) == 1


def test_refuses_statements_it_cannot_run_faithfully() -> None:
    engine = make_engine("sqlite://")
    stamped = Table(
        "driver_stamped",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("at", DateTime, onupdate=lambda: datetime.now(UTC)),
    )
    with engine.connect() as connection, pytest.raises(TypeError, match="onupdate"):
        DriverStatement(update(stamped).values(id=1)).run(connection, {})
    with engine.connect() as connection, pytest.raises(TypeError, match="expanding"):
        DriverStatement(delete(things).where(things.c.id.in_([1, 2]))).run(connection, {})
