"""Consents as CSV: the columns of ``docs/consents-template.csv``.

Import reads every row into ``ConsentTerms`` (a bad value names its line and
column) and leaves recording them, all or nothing, to ``consents.grant_many``.
Export writes every consent, revoked ones included, so that exporting and
importing into another registry loses nothing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date, datetime

from consent_registry.consents import ConsentTerms, ConsentView
from consent_registry.errors import RegistryError

COLUMNS = (
    "patient",
    "patient_name",
    "email",
    "clinician",
    "method",
    "evidence",
    "valid_from",
    "expires",
    "delivery",
    "risk_acknowledged",
    "recorded_by",
    "recorded_at",
    "revoked_at",
    "revoked_by",
    "revoke_reason",
)
REQUIRED = ("patient", "email")
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0", ""}


class RowError(RegistryError):
    """A row that cannot be read; the message names where and why."""


def read_csv(text: str) -> list[tuple[str, ConsentTerms]]:
    """(position, terms) for each data row; position reads 'line N'."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = next(reader, None)
    if header is None:
        raise RowError("line 1: the file is empty")
    header = [h.strip().lower() for h in header]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise RowError(f"line 1: unknown column {unknown[0]!r} (see docs/consents-template.csv)")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise RowError(f"line 1: the column {missing[0]!r} is missing")
    rows = []
    line = reader.line_num + 1
    for record in reader:
        if any(cell.strip() for cell in record):
            if len(record) != len(header):
                raise RowError(f"line {line}: {len(record)} fields, the header has {len(header)}")
            rows.append((f"line {line}", _terms(dict(zip(header, record, strict=True)), line)))
        line = reader.line_num + 1
    return rows


def _terms(row: dict[str, str], line: int) -> ConsentTerms:
    def text(name: str) -> str | None:
        value = row.get(name, "").strip()
        return value or None

    def parsed(name: str, parse: type[date] | type[datetime]) -> date | datetime | None:
        value = text(name)
        if value is None:
            return None
        try:
            result = parse.fromisoformat(value)
        except ValueError:
            shape = "YYYY-MM-DD" if parse is date else "an ISO 8601 time with its offset"
            raise RowError(f"line {line}, field {name}: {value!r} is not {shape}") from None
        if isinstance(result, datetime) and result.tzinfo is None:
            raise RowError(f"line {line}, field {name}: {value!r} has no time zone offset")
        return result

    flag = (text("risk_acknowledged") or "").lower()
    if flag not in _TRUE | _FALSE:
        raise RowError(f"line {line}, field risk_acknowledged: {flag!r} is not true or false")
    for name in REQUIRED:
        if text(name) is None:
            raise RowError(f"line {line}, field {name}: empty")
    valid_from, expires = parsed("valid_from", date), parsed("expires", date)
    recorded_at, revoked_at = parsed("recorded_at", datetime), parsed("revoked_at", datetime)
    assert not isinstance(valid_from, datetime) and not isinstance(expires, datetime)
    assert recorded_at is None or isinstance(recorded_at, datetime)
    assert revoked_at is None or isinstance(revoked_at, datetime)
    return ConsentTerms(
        patient=text("patient") or "",
        patient_name=text("patient_name"),
        email=text("email") or "",
        clinician=text("clinician"),
        method=text("method") or "written",
        evidence=text("evidence"),
        valid_from=valid_from,
        expires=expires,
        delivery=text("delivery") or "encrypted",
        risk_acknowledged=flag in _TRUE,
        recorded_by=text("recorded_by"),
        recorded_at=recorded_at,
        revoked_at=revoked_at,
        revoked_by=text("revoked_by"),
        revoke_reason=text("revoke_reason"),
    )


def write_csv(consents: Sequence[ConsentView]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in consents:
        writer.writerow(
            [
                c.patient_mrn or c.email,
                c.patient_name,
                c.email,
                c.clinician or "",
                c.method,
                c.evidence or "",
                c.valid_from.isoformat(),
                c.expires.isoformat() if c.expires else "",
                c.delivery,
                "true" if c.risk_acknowledged else "false",
                c.recorded_by,
                c.recorded_at.isoformat(),
                c.revoked_at.isoformat() if c.revoked_at else "",
                c.revoked_by or "",
                c.revoke_reason or "",
            ]
        )
    return out.getvalue()
