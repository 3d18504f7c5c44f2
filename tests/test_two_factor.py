"""The second factor: Bob, a DBA, approves Owner's restore request and release of a hold.

With REQUIRE_2FA on (as in production; the test settings turn it off for the rest of the suite)
Bob cannot approve anything before he has an authenticator; he enrols through the pages (the
secret is read off the enrolment page, as a person scans it, and the codes are computed from it
here by RFC 6238), and then approves with a fresh code. Logins ask for the code after the
password; recovery codes work once; an administrator resets another person's second factor,
never their own; no secret reaches the journal or the admin.
"""

import base64
import hashlib
import hmac
import re
import struct
import time
from base64 import b32encode
from urllib.parse import quote

import pytest
import time_machine
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from backupportal.models import JournalEntry
from backups.models import BackupHold, ChangeRequest
from restores.models import RestoreRequest
from tests.helpers import DEMO_PASSWORD, make_user


def totp(secret, at=None):
    """The 6-digit code an authenticator app shows for `secret` (base32, as the enrolment page
    shows it, spaces allowed) at `at` (default now): RFC 6238 written out here, not django-otp's."""
    key = base64.b32decode(secret.replace(" ", "").upper() + "=" * (-len(secret.replace(" ", "")) % 8))
    counter = int((time.time() if at is None else at) // 30)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    return f"{(struct.unpack('>I', digest[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000:06d}"


@pytest.fixture
def queued_tasks(monkeypatch):
    """An approval enqueues the restore for a worker; no worker runs here (the approval is the subject)."""
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", False)


@pytest.fixture
def required(settings):
    settings.REQUIRE_2FA = True


def log_in(client, username):
    response = client.post(reverse("login"), {"username": username, "password": DEMO_PASSWORD})
    assert response.status_code == 302, response.content[-500:]
    return response


def enrol(client):
    """Enrol through the pages as a person does; returns (base32 secret, recovery codes)."""
    assert client.post(reverse("two-factor-start"))["Location"] == reverse("two-factor-enrol")
    page = client.get(reverse("two-factor-enrol")).content.decode()
    secret = re.search(r'<code id="secret">([A-Z2-7 ]+)</code>', page).group(1)
    assert 'src="data:image/svg+xml' in page  # the QR code of the otpauth:// URI
    response = client.post(reverse("two-factor-confirm"), {"otp_token": totp(secret)})
    assert response["Location"] == reverse("two-factor-codes"), response
    codes = re.findall(r"<li><code>([a-z2-7]+)</code></li>", client.get(reverse("two-factor-codes")).content.decode())
    return secret, codes


def approve_restore(client, req, **data):
    return client.post(reverse("restore-request-approve", args=[req.pk]), {"note": "ok", **data})


def approve_change(client, change, **data):
    return client.post(reverse("change-approve", args=[change.pk]), data)


def test_a_dba_without_a_second_factor_cannot_approve_when_2fa_is_required(client, catalog, required, queued_tasks):
    bob = make_user("bob", "DBA")
    req, change = catalog[RestoreRequest], catalog[ChangeRequest]

    response = log_in(client, "bob")
    assert client.get(response["Location"])["Location"].startswith(reverse("two-factor"))
    for response in (approve_restore(client, req), approve_change(client, change)):
        assert response.status_code == 302 and response["Location"] == reverse("two-factor")
    page = client.get(reverse("two-factor")).content.decode()
    assert "Your role needs a second factor" in page

    req.refresh_from_db()
    change.refresh_from_db()
    assert req.status == "pending" and req.decided_by is None
    assert change.state == "pending" and catalog[BackupHold].released_at is None
    assert not TOTPDevice.objects.filter(user=bob, confirmed=True).exists()


def test_a_dba_with_an_authenticator_approves_with_a_fresh_code(client, catalog, required, queued_tasks):
    bob = make_user("bob", "DBA")
    req, change = catalog[RestoreRequest], catalog[ChangeRequest]
    start = timezone.now()
    log_in(client, "bob")

    with time_machine.travel(start, tick=False):
        secret, codes = enrol(client)
        assert len(codes) == 10
        # Enrolling proved the second factor a moment ago: the approval goes through.
        assert approve_restore(client, req).status_code == 302
    req.refresh_from_db()
    assert req.status == "approved" and req.decided_by == bob

    with time_machine.travel(start + timezone.timedelta(minutes=6), tick=False):
        # Six minutes later the code is stale: asked again, refused without it.
        page = client.get(reverse("changes")).content.decode()
        assert 'name="otp_token"' in page
        response = approve_change(client, change)
        assert response["Location"] == reverse("changes")
        change.refresh_from_db()
        assert change.state == "pending"
        refused = JournalEntry.objects.get(action="approval_needs_second_factor")
        assert refused.actor == "bob" and refused.outcome == "refused"
        assert "second factor of the last 5 minutes" in refused.details["reason"]

        # A wrong code is refused too (and journaled); the code of this moment approves.
        approve_change(client, change, otp_token="000000" if totp(secret) != "000000" else "111111")
        change.refresh_from_db()
        assert change.state == "pending"
        assert JournalEntry.objects.filter(action="second_factor_failed", actor="bob").exists()
    with time_machine.travel(start + timezone.timedelta(minutes=6, seconds=40), tick=False):
        assert approve_change(client, change, otp_token=totp(secret)).status_code == 302
    change.refresh_from_db()
    assert change.state == "approved" and change.decided_by == bob
    assert catalog[BackupHold].__class__.objects.get(pk=catalog[BackupHold].pk).released_at is not None

    actions = set(JournalEntry.objects.filter(actor="bob").values_list("action", flat=True))
    assert {"second_factor_enrolled", "second_factor_verified", "restore_approved", "change_approved"} <= actions
    for entry in JournalEntry.objects.all():
        text = str(entry.details) + entry.object_repr
        assert secret.replace(" ", "") not in text.replace(" ", "").upper()
        assert not any(code in text for code in codes)


def test_an_enrolled_approver_is_asked_even_when_2fa_is_not_required(client, catalog, queued_tasks, settings):
    settings.REQUIRE_2FA = False
    bob = make_user("bob", "DBA")
    device = TOTPDevice.objects.create(user=bob, name="authenticator", confirmed=True)
    secret = b32encode(device.bin_key).decode()
    client.force_login(bob)
    # The session has not proved the second factor: every page asks for it first.
    assert client.get(reverse("dashboard"))["Location"].startswith(reverse("two-factor-verify"))
    client.post(reverse("two-factor-verify"), {"otp_token": totp(secret)})
    assert client.get(reverse("dashboard")).status_code == 200

    with time_machine.travel(timezone.now() + timezone.timedelta(minutes=10), tick=False):
        approve_restore(client, catalog[RestoreRequest])
        assert RestoreRequest.objects.get().status == "pending"
        approve_restore(client, catalog[RestoreRequest], otp_token=totp(secret))
        assert RestoreRequest.objects.get().status == "approved"


def test_the_login_asks_for_the_code_after_the_password_and_recovery_codes_work_once(client, catalog, required):
    make_user("bob", "DBA")
    log_in(client, "bob")
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        secret, codes = enrol(client)
    client.post(reverse("logout"))

    with time_machine.travel(start + timezone.timedelta(minutes=1), tick=False):
        response = log_in(client, "bob")
        response = client.get(response["Location"])
        assert response["Location"].startswith(reverse("two-factor-verify"))
        assert client.get(reverse("journal"))["Location"].startswith(reverse("two-factor-verify"))

        client.post(reverse("two-factor-verify"), {"otp_token": "12345"})  # not a code at all
        wrong = "000000" if totp(secret) != "000000" else "111111"
        client.post(reverse("two-factor-verify"), {"otp_token": wrong})
        # The next try within the second is throttled, right code or not.
        response = client.post(reverse("two-factor-verify"), {"otp_token": totp(secret)}, follow=True)
        assert "Too many wrong codes" in response.content.decode()
        assert client.get(reverse("dashboard")).status_code == 302
    with time_machine.travel(start + timezone.timedelta(minutes=1, seconds=30), tick=False):
        copied = Client()  # the cookie as it was after the password alone
        copied.cookies["sessionid"] = client.cookies["sessionid"].value
        response = client.post(reverse("two-factor-verify") + "?next=/journal/", {"otp_token": totp(secret)})
        assert response["Location"] == "/journal/"
        assert client.get(reverse("dashboard")).status_code == 200
        assert copied.get(reverse("dashboard")).status_code == 302  # the code renewed the session's key
    client.post(reverse("logout"))

    # A recovery code, in place of the phone: once.
    for attempt in range(2):
        with time_machine.travel(start + timezone.timedelta(minutes=3 + attempt), tick=False):
            log_in(client, "bob")
            client.post(reverse("two-factor-verify"), {"otp_token": codes[0].upper()})
            status = client.get(reverse("dashboard")).status_code
            assert status == (200 if attempt == 0 else 302)
            client.post(reverse("logout"))
    assert JournalEntry.objects.filter(action="second_factor_failed", actor="bob").count() >= 3
    assert JournalEntry.objects.filter(action="second_factor_verified", details__kind="recovery code").count() == 1


def test_the_secret_is_shown_once_and_never_in_the_admin(client, catalog):
    charlie = make_user("charlie", "Auditor")  # every account may enrol, an auditor's too
    client.force_login(charlie)
    secret, codes = enrol(client)
    assert secret.replace(" ", "") not in client.get(reverse("two-factor-enrol")).content.decode()
    assert "No new recovery codes to show" in client.get(reverse("two-factor-codes")).content.decode()
    device = TOTPDevice.objects.get(user=charlie)

    admin = Client()
    admin.force_login(make_user("root", superuser=True))
    pages = [
        reverse("admin:auth_user_changelist"),
        reverse("admin:auth_user_change", args=[charlie.pk]),
    ]
    for url in pages:
        page = admin.get(url).content.decode()
        assert secret.replace(" ", "") not in page and device.key not in page
        assert not any(code in page for code in codes)
    # django-otp's own device pages (which show the keys) are not there at all.
    assert admin.get("/admin/otp_totp/totpdevice/").status_code == 404
    assert admin.get("/admin/otp_static/staticdevice/").status_code == 404


def test_an_admin_resets_another_persons_second_factor_but_never_their_own(client, catalog):
    bob = make_user("bob", "DBA")
    root = make_user("root", superuser=True)
    for user in (bob, root):
        TOTPDevice.objects.create(user=user, name="authenticator", confirmed=True)
    root_secret = b32encode(TOTPDevice.objects.get(user=root).bin_key).decode()
    client.force_login(root)
    client.post(reverse("two-factor-verify"), {"otp_token": totp(root_secret)})
    url = reverse("admin:auth_user_changelist")

    response = client.post(url, {"action": "reset_second_factor", "_selected_action": [root.pk]}, follow=True)
    assert "You cannot reset your own second factor" in response.content.decode()
    assert TOTPDevice.objects.filter(user=root).exists()

    client.post(url, {"action": "reset_second_factor", "_selected_action": [bob.pk]})
    assert not TOTPDevice.objects.filter(user=bob).exists()
    entry = JournalEntry.objects.get(action="second_factor_reset")
    assert entry.actor == "root" and entry.object_repr == "bob" and entry.details["devices"] == 1
    assert User.objects.filter(pk=bob.pk).exists()


def test_a_code_is_checked_by_its_shape_before_the_database_sees_it(client, catalog):
    bob = make_user("bob", "DBA")
    TOTPDevice.objects.create(user=bob, name="authenticator", confirmed=True)
    client.force_login(bob)
    for typed in ("a\x00b", "x" * 5000, "1e999", "' OR 1=1 --", "１２３４５６"):
        response = client.post(reverse("two-factor-verify"), {"otp_token": typed}, follow=True)
        assert response.status_code == 200
        assert 'class="msg-error"' in response.content.decode()
    # Nothing was counted against the device: shapes are refused before any check.
    assert TOTPDevice.objects.get(user=bob).throttling_failure_count == 0
    assert client.get(reverse("dashboard")).status_code == 302


def test_replacing_the_authenticator_or_the_recovery_codes_needs_a_fresh_code(client, catalog):
    """A session verified long ago (someone else's hands on an open laptop, say) cannot enrol
    another authenticator or mint recovery codes: a code of the last 5 minutes is asked first."""
    bob = make_user("bob", "DBA")
    client.force_login(bob)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        secret, codes = enrol(client)  # the first enrolment asks nothing more
        old = TOTPDevice.objects.get(user=bob, confirmed=True)
        # Within the 5 minutes of that code: a new authenticator may be started (confirmed later).
        assert client.post(reverse("two-factor-start"))["Location"] == reverse("two-factor-enrol")
        page = client.get(reverse("two-factor-enrol")).content.decode()
        new_secret = re.search(r'<code id="secret">([A-Z2-7 ]+)</code>', page).group(1)

    with time_machine.travel(start + timezone.timedelta(minutes=6), tick=False):
        verify_then = reverse("two-factor-verify") + "?next="
        pending = TOTPDevice.objects.get(user=bob, confirmed=False).pk
        for name, data, back in [
            ("two-factor-start", {}, reverse("two-factor")),
            ("two-factor-confirm", {"otp_token": totp(new_secret)}, reverse("two-factor-enrol")),
            ("two-factor-recovery", {}, reverse("two-factor")),
        ]:
            response = client.post(reverse(name), data)
            assert response.status_code == 302 and response["Location"] == verify_then + quote(back, safe=""), name
            page = client.get(response["Location"]).content.decode()
            assert "a code of the last 5 minutes" in page and 'name="otp_token"' in page
        # Nothing changed: the old authenticator and codes, the new one still unconfirmed (and kept).
        assert list(TOTPDevice.objects.filter(user=bob, confirmed=True)) == [old]
        assert TOTPDevice.objects.filter(user=bob, confirmed=False, pk=pending).exists()
        assert not JournalEntry.objects.filter(action="recovery_codes_made").exists()
        assert JournalEntry.objects.filter(action="second_factor_enrolled").count() == 1
        assert "No new recovery codes to show" in client.get(reverse("two-factor-codes")).content.decode()

    with time_machine.travel(start + timezone.timedelta(minutes=6, seconds=40), tick=False):
        # A code of now, and back where bob was: the new authenticator's first code confirms it.
        back = reverse("two-factor-enrol")
        response = client.post(reverse("two-factor-verify"), {"otp_token": totp(secret), "next": back})
        assert response["Location"] == back
        assert client.post(reverse("two-factor-confirm"), {"otp_token": totp(new_secret)})["Location"] == reverse(
            "two-factor-codes"
        )
        assert TOTPDevice.objects.get(user=bob, confirmed=True).pk == pending
        assert client.post(reverse("two-factor-recovery"))["Location"] == reverse("two-factor-codes")
        assert JournalEntry.objects.filter(action="recovery_codes_made", actor="bob").count() == 1


def test_a_session_verified_by_a_recovery_code_long_ago_cannot_enrol_its_own_authenticator(client, catalog):
    bob = make_user("bob", "DBA")
    client.force_login(bob)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        secret, codes = enrol(client)
    client.logout()
    with time_machine.travel(start + timezone.timedelta(minutes=1), tick=False):
        log_in(client, "bob")
        client.post(reverse("two-factor-verify"), {"otp_token": codes[0]})
        assert client.get(reverse("dashboard")).status_code == 200
    with time_machine.travel(start + timezone.timedelta(hours=2), tick=False):
        assert client.post(reverse("two-factor-start"))["Location"].startswith(reverse("two-factor-verify"))
        assert client.post(reverse("two-factor-recovery"))["Location"].startswith(reverse("two-factor-verify"))
        assert not TOTPDevice.objects.filter(user=bob, confirmed=False).exists()
        # The account page says so beside the buttons.
        assert "asks for a code first" in client.get(reverse("two-factor")).content.decode()
