"""``cgw user``: the staff accounts that may send through the gateway."""

from __future__ import annotations

import sys

import click

from consent_registry import users
from consent_registry.users import UserView
from gateway import registry_audit
from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password; use --password-stdin")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


def _user_json(user: UserView) -> dict[str, object]:
    return {
        "id": user.id,
        "username": user.username,
        "role": user.role.value,
        "addresses": list(user.addresses),
        "disabled": user.disabled,
        "created_at": user.created_at,
    }


@click.group()
def user() -> None:
    """Staff accounts: who may send, and as which addresses."""


@user.command("add")
@click.argument("username")
@click.option(
    "--address", "addresses", multiple=True, required=True, help="A professional address."
)
@click.option(
    "--role",
    type=click.Choice(["clinician", "staff", "admin"]),
    default="clinician",
    show_default=True,
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@context.actor_option
def add(
    username: str, addresses: tuple[str, ...], role: str, password_stdin: bool, actor: str
) -> None:
    """Add a user who may send as the given addresses."""
    config = context.settings()
    password = _read_password(password_stdin)
    with context.transaction(config) as session:
        now = context.now()
        view = users.add_user(session, username, addresses, role, password, actor, now)
        context.audit(config).record(session, registry_audit.user_added(actor, view), now)
    click.echo(f"added user {view.username} ({view.role.value}): {', '.join(view.addresses)}")


@user.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """List users."""
    config = context.settings()
    with context.transaction(config) as session:
        found = users.list_users(session)
    if as_json:
        print_json([_user_json(u) for u in found])
        return
    print_table(
        ["username", "role", "addresses", "disabled", "created"],
        [(u.username, u.role.value, u.addresses, u.disabled, u.created_at) for u in found],
        empty="no users yet; add one with: cgw user add NAME --address EMAIL",
    )


@user.command()
@click.argument("username")
@context.actor_option
def disable(username: str, actor: str) -> None:
    """Disable a user: they can no longer log in (the record stays)."""
    config = context.settings()
    with context.transaction(config) as session:
        now = context.now()
        users.disable_user(session, username, actor, now)
        context.audit(config).record(
            session, AuditEntry(AuditAction.USER_DISABLED, actor, username=username), now
        )
    click.echo(f"disabled user {username}")


@user.command()
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@context.actor_option
def passwd(username: str, password_stdin: bool, actor: str) -> None:
    """Set a user's password."""
    config = context.settings()
    password = _read_password(password_stdin)
    with context.transaction(config) as session:
        now = context.now()
        users.set_password(session, username, password)
        context.audit(config).record(
            session, AuditEntry(AuditAction.USER_PASSWORD_CHANGED, actor, username=username), now
        )
    click.echo(f"changed the password of {username}")
