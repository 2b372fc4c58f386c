"""Administration of accounts: what an administrator may do to their own account, and what the
audit trail records of each change (which change, old and new role)."""

from __future__ import annotations

from sqlalchemy import select

from oncoscope.store.models import AuditEvent, User

from .conftest import ADMIN, DOC_A, flashes, login, sessions_of


def _last_entry(app) -> AuditEvent:
    """The newest entry of a change (a POST; following a redirect adds the page view after it)."""
    with sessions_of(app)() as s:
        return s.scalar(select(AuditEvent).where(AuditEvent.method == "POST").order_by(AuditEvent.seq.desc()).limit(1))


def test_an_admin_cannot_reset_their_own_password_without_the_current_one(app, client_for):
    admin = client_for("admin")
    page = admin.get(f"/admin/users/{ADMIN.id}").data.decode()
    assert 'name="pw-password"' not in page and "/account/password" in page
    before = _password_hash(app, ADMIN.id)
    r = admin.post(f"/admin/users/{ADMIN.id}", data={"pw-password": "taken-over-4242!"}, follow_redirects=True)
    assert any(m.startswith("Change your own password") for m in flashes(r.data))
    assert _password_hash(app, ADMIN.id) == before
    e = _last_entry(app)
    assert (e.action, e.outcome, e.details["change"]) == ("admin.user_update", "denied", "password_reset")
    assert login(app.test_client(), ADMIN.email, "taken-over-4242!").status_code == 401


def _password_hash(app, uid: int) -> str:
    with sessions_of(app)() as s:
        return s.get(User, uid).password_hash


def test_role_changes_resets_and_activation_are_audited_with_what_changed(app, client_for):
    admin = client_for("admin")
    assert admin.post(f"/admin/users/{DOC_A.id}", data={"role-role": "admin"}).status_code == 302
    e = _last_entry(app)
    assert (e.action, e.resource_id, e.outcome) == ("admin.user_update", str(DOC_A.id), "success")
    assert {"change": "role", "old_role": "doctor", "new_role": "admin", "email": DOC_A.email}.items() <= e.details.items()
    assert admin.post(f"/admin/users/{DOC_A.id}", data={"pw-password": "reset-pass-4242!"}).status_code == 302
    e = _last_entry(app)
    assert e.details["change"] == "password_reset" and "reset-pass-4242!" not in str(e.details)
    assert admin.post(f"/admin/users/{DOC_A.id}/active").status_code == 302
    assert _last_entry(app).details["change"] == "deactivated"
    assert admin.post(f"/admin/users/{DOC_A.id}/active").status_code == 302
    assert _last_entry(app).details["change"] == "reactivated"
    with sessions_of(app)() as s:
        changes = [e.details.get("change") for e in s.scalars(select(AuditEvent).where(
            AuditEvent.resource_type == "user", AuditEvent.resource_id == str(DOC_A.id)).order_by(AuditEvent.seq))]
        assert changes == ["role", "password_reset", "deactivated", "reactivated"]
