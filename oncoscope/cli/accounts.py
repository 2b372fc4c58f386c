"""``oncoscope users create|token``: accounts and personal API tokens from the command line."""

from __future__ import annotations

import click
from sqlalchemy import select

from ..config import Settings
from ..store import tokens as token_store
from ..store import users as user_store
from ..store.audit import record_system
from ..store.db import make_engine, make_session_factory, session_scope, standalone_session
from ..store.models import User


@click.group()
def users():
    """User accounts."""


@users.command("create")
@click.option("--email", required=True)
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["doctor", "admin"]), default="doctor", show_default=True)
@click.password_option(help="Password (prompted when omitted).")
def users_create(email, name, role, password):
    """Create a user account."""
    st = Settings.from_env().prepare()
    with session_scope(make_session_factory(make_engine(st.database_url))) as s:
        try:
            u = user_store.create_user(s, email, name, password, role)
        except user_store.AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created {u.role} {u.email}")
    record_system(st, "user.create_cli", email=email, role=role)


@users.command("token")
@click.option("--email", required=True, help="The account the token acts as.")
@click.option("--days", type=click.IntRange(1, 3650), default=None, help="Expires after this many days (default: never).")
@click.option("--name", "label", default="command line", show_default=True, help="What uses it (shown on the token page).")
def users_token(email, days, label):
    """Print a new personal API token for an account (e.g. a service account for a LIS bridge).

    Stored and audited like a token made on the API tokens page: only its hash is kept, the owner
    sees and can revoke it there, and it is shown only this once."""
    st = Settings.from_env().prepare()
    with standalone_session(st.database_url) as s:
        user = s.scalar(select(User).where(User.email == user_store.normalise_email(email)))
        if user is None or not user.is_active:
            raise click.ClickException(f"No active account with the address {email!r}.")
        t, secret = token_store.create(s, user, label, days)
        s.commit()
        made = {"label": t.name, "prefix": t.prefix, "email": user.email,
                "expires_at": t.expires_at.isoformat() if t.expires_at else None}
        token_id = t.id
    record_system(st, "auth.token_create", resource=("api_token", token_id), **made)
    click.echo(secret)
    click.echo(f"token {made['prefix']} ({made['label']}) for {made['email']}, "
               f"{'expires ' + made['expires_at'] if made['expires_at'] else 'no expiry'}: shown only now", err=True)
