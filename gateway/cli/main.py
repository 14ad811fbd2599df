"""The ``cgw`` entry point: the command tree and its error conventions.

Bad input and missing records end with one line on stderr and exit code 1;
usage errors exit with 2 (click's convention).
"""

from __future__ import annotations

import click

from gateway.cli.audit import audit
from gateway.cli.cert import cert
from gateway.cli.check import check
from gateway.cli.consent import consent
from gateway.cli.demo import demo
from gateway.cli.patient import patient
from gateway.cli.quarantine import quarantine
from gateway.cli.queue import queue
from gateway.cli.relationship import relationship
from gateway.cli.serve import config, init, serve
from gateway.cli.status import status
from gateway.cli.user import user


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="consent-gateway", prog_name="cgw")
def cli() -> None:
    """Consent Gateway: consent-aware secure e-mail for medical practices."""


cli.add_command(init)
cli.add_command(serve)
cli.add_command(config)
cli.add_command(status)
cli.add_command(user)
cli.add_command(patient)
cli.add_command(relationship)
cli.add_command(consent)
cli.add_command(cert)
cli.add_command(check)
cli.add_command(queue)
cli.add_command(audit)
cli.add_command(quarantine)
cli.add_command(demo)


def main() -> None:
    cli(prog_name="cgw")


if __name__ == "__main__":  # how ``cgw serve`` starts its other workers
    main()
