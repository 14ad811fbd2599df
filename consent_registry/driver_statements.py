"""Hot write statements run on the database driver's own cursor.

The gateway's writer runs about nine statements per message (queue rows,
the inline spool copy, the audit chain, the delivery result). Through
SQLAlchemy's execution layer each one cost several times the work of the
database itself: the compiled-cache lookup, parameter processing, the
execution context and result objects were over a quarter of the writer's
time, and the writer is on every message's path to its 250.

A ``DriverStatement`` is a Core statement compiled once per dialect (and
set of columns) and then run with the driver's ``cursor.execute``, with the
column types' own bind processors: the same SQL and the same stored values
as SQLAlchemy would produce, on the caller's connection and so in its
transaction, on SQLite and PostgreSQL alike. Driver errors are raised as
SQLAlchemy's (``DBAPIError.instance``, the driver's error kept as ``orig``),
so callers see one kind of error whichever way a statement ran.

Only for statements whose parameters are plain values: no expanding IN
lists, no column defaults but scalar ones on INSERT (none on UPDATE), no
SQL-side defaults to fetch back. The others are refused when compiled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.schema import ColumnDefault

Row = Mapping[str, object]
_Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: bool
    # Per parameter, in placeholder order: its name, its value when the row
    # has none (a literal in the statement, a column default), its processor.
    parameters: tuple[tuple[str, object, _Processor], ...]

    def bind(self, row: Row) -> Sequence[object] | dict[str, object]:
        values = [
            row.get(name, default) if process is None else process(row.get(name, default))
            for name, default, process in self.parameters
        ]
        if self.positional:
            return values
        return {name: value for (name, _, _), value in zip(self.parameters, values, strict=True)}


class DriverStatement:
    """A Core statement run on the driver's cursor (see the module's docstring)."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._lock = threading.Lock()
        self._compiled: dict[tuple[str, tuple[str, ...]], _Compiled] = {}

    def run(self, connection: Connection, row: Row) -> int:
        """Run for one row; the number of rows it changed."""
        with self._cursor(connection, [row]) as (cursor, sql, bound):
            cursor.execute(sql, bound[0])
            return int(cursor.rowcount)

    def run_many(self, connection: Connection, rows: Sequence[Row]) -> None:
        """Run for every row (``executemany``); the rows must share their keys."""
        if rows:
            with self._cursor(connection, rows) as (cursor, sql, bound):
                cursor.executemany(sql, bound)

    def fetch(self, connection: Connection, rows: Sequence[Row]) -> list[tuple[Any, ...]]:
        """The rows the statement returns (a SELECT, a RETURNING) for each of
        ``rows``, in their order."""
        if not rows:
            return []
        with self._cursor(connection, rows) as (cursor, sql, bound):
            returned: list[tuple[Any, ...]] = []
            for parameters in bound:  # one at a time: drivers return no rows from executemany
                cursor.execute(sql, parameters)
                returned.extend(tuple(r) for r in cursor.fetchall())
            return returned

    @contextmanager
    def _cursor(
        self, connection: Connection, rows: Sequence[Row]
    ) -> Iterator[tuple[Any, str, list[Any]]]:
        dialect = connection.dialect
        compiled = self._compile(dialect, tuple(sorted(rows[0])))
        bound = [compiled.bind(row) for row in rows]
        cursor = connection.connection.cursor()
        try:
            yield cursor, compiled.sql, bound
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(
                compiled.sql,
                bound,
                exc,
                dialect.loaded_dbapi.Error,
                dialect=dialect,
                ismulti=len(bound) > 1,
            ) from exc
        finally:
            cursor.close()

    def _compile(self, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        cache_key = (dialect.name, keys)
        found = self._compiled.get(cache_key)
        if found is not None:
            return found
        compiled: Any = self.statement.compile(dialect=dialect, column_keys=list(keys))
        if "POSTCOMPILE" in compiled.string:
            raise TypeError("a driver statement takes no expanding parameters")
        if getattr(compiled, "update_prefetch", ()):
            raise TypeError("a driver statement takes no onupdate defaults")
        defaults: dict[str, object] = {}
        for column in getattr(compiled, "insert_prefetch", ()):
            default = column.default
            if not isinstance(default, ColumnDefault) or not default.is_scalar:
                raise TypeError(f"{column.name}: a driver statement takes plain defaults only")
            defaults[column.key] = default.arg
        if dialect.positional:
            names = list(compiled.positiontup)
        else:  # only the parameters in the SQL (``binds`` also names internal aliases)
            names = [
                name
                for name in compiled.binds
                if compiled.bindtemplate % {"name": name} in compiled.string
            ]
        parameters = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            parameters.append((name, defaults.get(name, bind.effective_value), processor))
        result = _Compiled(compiled.string, dialect.positional, tuple(parameters))
        with self._lock:
            self._compiled[cache_key] = result
        return result
