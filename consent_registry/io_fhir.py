"""Consents as HL7 FHIR R4: a ``Bundle`` (type collection) of ``Consent`` resources.

The mapping, so that an EHR can produce or read it:

- ``patient.identifier`` (system ``MRN_SYSTEM``) is the MRN, ``patient.display`` the name;
- ``provision.type`` is ``permit``; ``provision.period`` start and end are the first
  and last day of validity (FHIR periods are inclusive: the day the consent
  expires is the day after ``end``);
- ``provision.actor`` with role PRCP names the clinician (``CLINICIAN_SYSTEM``);
  no actor means practice-wide;
- ``status`` is ``active`` or, once revoked, ``inactive``; ``dateTime`` is when it
  was recorded; ``sourceReference.display`` the evidence reference;
- extensions under ``EXTENSION`` carry the consented address, the method, the
  delivery, the risk acknowledgement, who recorded it and the revocation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

from consent_registry.consents import ConsentTerms, ConsentView
from consent_registry.io_csv import RowError

MRN_SYSTEM = "urn:consent-gateway:mrn"
CLINICIAN_SYSTEM = "urn:consent-gateway:clinician"
EXTENSION = "urn:consent-gateway:fhir:extension:"
_SCOPE = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
    ]
}
_CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]
_POLICY = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]
}
_PRCP = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}
    ]
}


def write_fhir(consents: Sequence[ConsentView]) -> str:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _resource(c)} for c in consents],
    }
    return json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"


def _resource(c: ConsentView) -> dict[str, Any]:
    patient: dict[str, Any] = {"display": c.patient_name}
    if c.patient_mrn:
        patient["identifier"] = {"system": MRN_SYSTEM, "value": c.patient_mrn}
    period = {"start": c.valid_from.isoformat()}
    if c.expires:
        period["end"] = (c.expires - timedelta(days=1)).isoformat()
    provision: dict[str, Any] = {"type": "permit", "period": period}
    if c.clinician:
        provision["actor"] = [
            {
                "role": _PRCP,
                "reference": {"identifier": {"system": CLINICIAN_SYSTEM, "value": c.clinician}},
            }
        ]
    extensions: list[dict[str, Any]] = [
        {"url": EXTENSION + "email", "valueString": c.email},
        {"url": EXTENSION + "method", "valueCode": c.method},
        {"url": EXTENSION + "delivery", "valueCode": c.delivery},
        {"url": EXTENSION + "risk-acknowledged", "valueBoolean": c.risk_acknowledged},
        {"url": EXTENSION + "recorded-by", "valueString": c.recorded_by},
    ]
    if c.revoked_at:
        revocation = [
            {"url": "at", "valueDateTime": c.revoked_at.isoformat()},
            {"url": "by", "valueString": c.revoked_by or ""},
        ]
        if c.revoke_reason:
            revocation.append({"url": "reason", "valueString": c.revoke_reason})
        extensions.append({"url": EXTENSION + "revocation", "extension": revocation})
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "extension": extensions,
        "status": "inactive" if c.revoked_at else "active",
        "scope": _SCOPE,
        "category": _CATEGORY,
        "patient": patient,
        "dateTime": c.recorded_at.isoformat(),
        "policyRule": _POLICY,
        "provision": provision,
    }
    if c.evidence:
        resource["sourceReference"] = {"display": c.evidence}
    return resource


def read_fhir(text: str) -> list[tuple[str, ConsentTerms]]:
    """(position, terms) for each Consent; position reads 'entry N'."""
    try:
        bundle = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"line {exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise RowError("the file is not a FHIR Bundle")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise RowError("Bundle.entry is not a list")
    return [(f"entry {n}", _terms(entry, n)) for n, entry in enumerate(entries, start=1)]


class _Reader:
    def __init__(self, resource: Any, position: int) -> None:
        self.resource = resource
        self.position = position

    def fail(self, field: str, message: str) -> RowError:
        return RowError(f"entry {self.position}, field {field}: {message}")

    def get(self, path: str, kind: type, required: bool = False) -> Any:
        node = self.resource
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            if required:
                raise self.fail(path, "missing")
            return None
        if not isinstance(node, kind):
            raise self.fail(path, f"expected {kind.__name__}")
        return node

    def extension(self, name: str, key: str, kind: type) -> Any:
        for ext in self.get("extension", list) or []:
            if isinstance(ext, dict) and ext.get("url") == EXTENSION + name:
                value = ext.get(key)
                if not isinstance(value, kind):
                    raise self.fail(f"extension {name}", f"expected {key}")
                return value
        return None

    def day(self, path: str, value: Any) -> date | None:
        if value is None:
            return None
        try:
            return date.fromisoformat(value)
        except (TypeError, ValueError):
            raise self.fail(path, f"{value!r} is not a date (YYYY-MM-DD)") from None

    def instant(self, path: str, value: Any) -> datetime | None:
        if value is None:
            return None
        try:
            result = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise self.fail(path, f"{value!r} is not a dateTime") from None
        if result.tzinfo is None:
            raise self.fail(path, f"{value!r} has no time zone offset")
        return result


def _terms(entry: Any, position: int) -> ConsentTerms:
    r = _Reader(entry.get("resource") if isinstance(entry, dict) else None, position)
    if r.get("resourceType", str) != "Consent":
        raise r.fail("resourceType", "not a Consent resource")
    if r.get("provision.type", str) not in (None, "permit"):
        raise r.fail("provision.type", "only 'permit' consents can be imported")
    mrn = r.get("patient.identifier.value", str)
    email = r.extension("email", "valueString", str)
    if email is None:
        raise r.fail("extension email", "missing (the consented address)")
    end = r.day("provision.period.end", r.get("provision.period.end", str))
    revocation = _revocation(r)
    return ConsentTerms(
        patient=f"mrn:{mrn}" if mrn else email,
        patient_name=r.get("patient.display", str),
        email=email,
        clinician=_clinician(r),
        method=r.extension("method", "valueCode", str) or "written",
        evidence=r.get("sourceReference.display", str),
        valid_from=r.day("provision.period.start", r.get("provision.period.start", str)),
        expires=end + timedelta(days=1) if end else None,
        delivery=r.extension("delivery", "valueCode", str) or "encrypted",
        risk_acknowledged=bool(r.extension("risk-acknowledged", "valueBoolean", bool)),
        recorded_by=r.extension("recorded-by", "valueString", str),
        recorded_at=r.instant("dateTime", r.get("dateTime", str)),
        revoked_at=r.instant("extension revocation.at", revocation.get("at")),
        revoked_by=revocation.get("by"),
        revoke_reason=revocation.get("reason"),
    )


def _clinician(r: _Reader) -> str | None:
    actors = r.get("provision.actor", list) or []
    for actor in actors:
        identifier = (actor.get("reference") or {}).get("identifier") or {}
        if identifier.get("system") == CLINICIAN_SYSTEM:
            value = identifier.get("value")
            if not isinstance(value, str):
                raise r.fail("provision.actor", "clinician identifier without a value")
            return value
    return None


def _revocation(r: _Reader) -> dict[str, str]:
    for ext in r.get("extension", list) or []:
        if isinstance(ext, dict) and ext.get("url") == EXTENSION + "revocation":
            return {
                str(part.get("url")): str(part.get("valueDateTime") or part.get("valueString"))
                for part in ext.get("extension") or []
                if isinstance(part, dict)
            }
    if r.get("status", str) == "inactive":
        raise r.fail("status", "inactive, but no revocation extension says when and by whom")
    return {}
