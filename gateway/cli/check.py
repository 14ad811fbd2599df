"""``cgw check``: what the gateway would decide, before anyone sends."""

from __future__ import annotations

from dataclasses import asdict

import click

from consent_registry.addresses import AddressError, parse_address
from consent_registry.users import login_record
from gateway import replies
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.policy_gate import PolicyGate
from policies.decision import Decision, Outcome


@click.command()
@click.option("--from", "sender", required=True, metavar="EMAIL", help="The sending address.")
@click.option("--to", "recipients", multiple=True, required=True, metavar="EMAIL")
@context.json_option
def check(sender: str, recipients: tuple[str, ...], as_json: bool) -> None:
    """Dry run: what the gateway would decide for these recipients, and why.

    The recipients are taken as if all were in To:, so sending one message to
    several patients shows the refusal it would get.
    """
    config = context.settings()
    try:
        addresses = [parse_address(r) for r in recipients]
    except AddressError as exc:
        raise CliError(f"--to: {exc}") from None
    with context.registry(config) as engine:
        with engine.connect() as connection:
            found = login_record(connection, sender)
        if found is None or found.disabled:
            raise CliError(f"{sender} is not the address of an active cgw user")
        gate = PolicyGate(engine, config.policy())
        decisions = gate.decide(found.sender, addresses)
        patients = frozenset(
            d.patient_id for d in decisions if d.patient_id and d.outcome is not Outcome.DENY
        )
        exposure = gate.exposure(patients, [a.written for a in addresses])
    rows = [(a.written, d) for a, d in zip(addresses, decisions, strict=True)]
    if as_json:
        print_json(
            {
                "from": sender,
                "recipients": [{"to": a, **_plain(d)} for a, d in rows],
                "message": _plain(exposure) if exposure else None,
            }
        )
        return
    print_table(
        ["to", "decision", "reason", "protection", "what the sender sees"],
        [(a, d.outcome.value, d.reason.value, d.protection.value, _reply(d, a)) for a, d in rows],
        empty="",
    )
    if exposure is not None:
        click.echo(f"\nThe message as a whole: {replies.PATIENTS_EXPOSED}")


def _plain(decision: Decision) -> dict[str, object]:
    return {**asdict(decision), "sentence": decision.sentence, "code": decision.enhanced_code}


def _reply(decision: Decision, address: str) -> str:
    return replies.decision(decision, address)
