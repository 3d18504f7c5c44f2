"""The second factor: a TOTP authenticator and recovery codes per account (django-otp).

Who must have one (REQUIRE_2FA: DBAs, Sysadmins and superusers), what a session has proved
(django-otp's is_verified(), and when: a code of the last FRESH_SECONDS), and the one question
approvals ask before a restore or a destructive change is approved: approval_refusal().

The TOTP secret is shown once, on the page that enrols it (an SVG QR code and the base32 text);
it never reaches the journal, a log line, a message or the admin. Recovery codes are shown once
too, and each one works once. Wrong codes slow the next attempt down per device (django-otp's
throttling: 1, 2, 4... seconds), which is what keeps six digits from being guessed.
"""

import re
import time
from base64 import b32encode

import segno
from django.conf import settings
from django.contrib.auth.signals import user_logged_in
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone
from django_otp import devices_for_user
from django_otp import login as otp_login
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from backupportal import journal
from backupportal.roles import DBA, SYSADMIN, role_names, same_address

# "a fresh second factor within the last 5 minutes" (DESIGN.md's role table: approvals).
FRESH_SECONDS = 300
RECOVERY_CODES = 10
# Session keys: when this session last proved the second factor, and whether its user had one
# enrolled (read on every request by the middleware: no query for the many who have none).
FRESH_KEY = "second_factor_at"
ENROLLED_KEY = "second_factor_enrolled"
# What a code may look like: six digits (TOTP) or a recovery code (django-otp's are 8 base32
# characters). Anything else is refused before the database sees it (a NUL breaks PostgreSQL).
TOTP_CODE = re.compile(r"[0-9]{6}")
RECOVERY_CODE = re.compile(r"[a-z2-7]{8,16}")


def required_of(user):
    """Must this account have a second factor before using the portal?"""
    if not settings.REQUIRE_2FA or not user.is_authenticated:
        return False
    return user.is_superuser or bool(role_names(user) & {DBA, SYSADMIN})


def has_device(user):
    """An enrolled (confirmed) authenticator or recovery codes: asked at every login."""
    return any(True for _ in devices_for_user(user, confirmed=True))


def remember_enrolment(request):
    """Keep in the session whether the user has a second factor (the middleware reads it)."""
    enrolled = has_device(request.user)
    if request.session.get(ENROLLED_KEY) != enrolled:  # a session unchanged is not saved again
        request.session[ENROLLED_KEY] = enrolled
    return enrolled


@receiver(user_logged_in, dispatch_uid="backupportal.twofactor.on_login")
def on_login(sender, request, user, **kwargs):
    # Asked once per login, so that the pages after it need no query for it.
    if request is not None and hasattr(request, "session"):
        request.session[ENROLLED_KEY] = has_device(user)


def session_enrolled(request):
    """Whether the session's user has a second factor: asked of the database once per login, and
    again on every POST, so that an authenticator enrolled in another session counts before any change."""
    if ENROLLED_KEY not in request.session or request.method == "POST":
        return remember_enrolment(request)
    return request.session[ENROLLED_KEY]


def is_fresh(request):
    at = request.session.get(FRESH_KEY)
    return at is not None and 0 <= time.time() - at <= FRESH_SECONDS


def normalise(token):
    """A code as people type it ("123 456", "ABCD EFGH") as the devices store it, or ''."""
    token = re.sub(r"[\s-]", "", str(token or "")).lower()
    return token if TOTP_CODE.fullmatch(token) or RECOVERY_CODE.fullmatch(token) else ""


def verify(request, token, purpose):
    """Check a code against the user's devices. Returns '' when it was right (the session is then
    verified and fresh), else one line saying what is wrong. Wrong codes are journaled."""
    user, code = request.user, normalise(token)
    if not code:
        problem = "That is not a code: type the 6 digits your authenticator app shows, or a recovery code."
        return _failed(user, purpose, problem)
    kind = TOTPDevice if TOTP_CODE.fullmatch(code) else StaticDevice
    waits = []
    with transaction.atomic():
        for device in kind.objects.devices_for_user(user, confirmed=True).select_for_update():
            allowed, info = device.verify_is_allowed()
            if not allowed:
                waits.append(info.get("locked_until") if info else None)
                continue
            if device.verify_token(code):
                return _verified(request, device, purpose)
    if waits and all(waits):
        seconds = max(1, int((max(waits) - timezone.now()).total_seconds()) + 1)
        return _failed(user, purpose, f"Too many wrong codes: wait {seconds} seconds, then type a new one.")
    what = "authenticator code" if kind is TOTPDevice else "recovery code"
    return _failed(user, purpose, f"That {what} is wrong or was already used: type the current one.")


def _verified(request, device, purpose):
    _proved(request, device)
    kind = "recovery code" if isinstance(device, StaticDevice) else "authenticator"
    journal.record("second_factor_verified", actor=request.user.get_username(), purpose=purpose, kind=kind)
    return ""


def _proved(request, device):
    """The session now holds a second factor: it gets a new key, so that a copy of its cookie
    taken after the password alone (an unlocked desktop, a proxy's log) does not gain it."""
    otp_login(request, device)
    request.session.cycle_key()
    request.session[FRESH_KEY] = time.time()
    request.session[ENROLLED_KEY] = True


def _failed(user, purpose, problem):
    journal.record("second_factor_failed", actor=user.get_username(), outcome="failed", purpose=purpose, reason=problem)
    return problem


def approval_refusal(request):
    """'' when the user may approve now; else why not, in one line.

    Asked whenever REQUIRE_2FA is on or the approver has enrolled: a second factor proved in the
    last FRESH_SECONDS (at login, say), or the code typed beside the Approve button."""
    user = request.user
    enrolled = has_device(user)
    if not settings.REQUIRE_2FA and not enrolled:
        return ""
    if not enrolled:
        return (
            "Approvals need a second factor: set up an authenticator on your account page (Two-factor), then approve."
        )
    token = request.POST.get("otp_token", "").strip()
    if token:
        return verify(request, token, "approval")
    if is_fresh(request):
        return ""
    minutes = FRESH_SECONDS // 60
    return f"Type the code from your authenticator beside Approve: approvals need a second factor of the last {minutes} minutes."


def refused_approval(request, obj, **details):
    """approval_refusal(), journaled against `obj` (a restore request, a change request) when it
    refuses: the one place both kinds of approval ask for the second factor."""
    refusal = approval_refusal(request)
    if refusal:
        journal.record(
            "approval_needs_second_factor",
            actor=request.user.get_username(),
            obj=obj,
            outcome="refused",
            reason=refusal,
            **details,
        )
    return refusal


def asks_code(request):
    """Whether the approval forms show the code field (the check itself is approval_refusal)."""
    return (settings.REQUIRE_2FA or session_enrolled(request)) and not is_fresh(request)


# --- enrolment, recovery codes, reset ---


def start_enrolment(user):
    """A new authenticator, not yet confirmed (a code from it confirms it): replaces one left unconfirmed."""
    TOTPDevice.objects.filter(user=user, confirmed=False).delete()
    return TOTPDevice.objects.create(user=user, name="authenticator", confirmed=False)


def pending(user, device_id):
    return TOTPDevice.objects.filter(user=user, confirmed=False, pk=device_id).first()


def confirm_enrolment(request, device, token):
    """The first code from a new authenticator. Returns (recovery codes, '') or ([], problem)."""
    code = normalise(token)
    if not TOTP_CODE.fullmatch(code) or not device.verify_token(code):
        return [], _failed(request.user, "enrolment", "That code does not match: type the 6 digits the app shows now.")
    with transaction.atomic():
        replaced = TOTPDevice.objects.filter(user=request.user, confirmed=True).exclude(pk=device.pk).delete()[0]
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        codes = _new_recovery_codes(request.user)
    _proved(request, device)
    journal.record("second_factor_enrolled", actor=request.user.get_username(), replaced=bool(replaced))
    return codes, ""


def new_recovery_codes(user):
    """Fresh recovery codes (the old ones stop working); only for an enrolled account."""
    if not TOTPDevice.objects.filter(user=user, confirmed=True).exists():
        raise PermissionDenied("Set up an authenticator first: recovery codes come with it.")
    codes = _new_recovery_codes(user)
    journal.record("recovery_codes_made", actor=user.get_username(), count=len(codes))
    return codes


def _new_recovery_codes(user):
    StaticDevice.objects.filter(user=user).delete()
    device = StaticDevice.objects.create(user=user, name="recovery codes", confirmed=True)
    codes = [StaticToken.random_token() for _ in range(RECOVERY_CODES)]
    StaticToken.objects.bulk_create(StaticToken(device=device, token=code) for code in codes)
    return codes


def recovery_codes_left(user):
    return StaticToken.objects.filter(device__user=user, device__confirmed=True).count()


def reset(user, by):
    """An administrator removes another person's authenticator and recovery codes (a lost phone):
    that person enrols again at the next login. Nobody resets their own: it would let a stolen
    password remove the factor that protects it. Their other account is known by its address only
    (same_address): four eyes' doubt about an unverified single sign-on address (same_person)
    would leave a local administrator unable to reset any such account's factor, and a stolen
    local password still does not open the other account, whose login is at the provider."""
    if same_address(user, by):
        raise PermissionDenied(
            "You cannot reset your own second factor (nor your other account's): ask another administrator."
        )
    removed = 0
    for device in list(devices_for_user(user, confirmed=None)):
        device.delete()
        removed += 1
    journal.record(
        "second_factor_reset",
        actor=by.get_username(),
        obj=journal.Ref(user._meta.label, user.pk, user.get_username()),
        devices=removed,
    )
    return removed


def qr_svg_data_uri(device):
    """The otpauth:// URI as an SVG QR code in a data: URI (the CSP allows data: images)."""
    return segno.make(device.config_url, error="m").svg_data_uri(scale=5, border=2)


def secret_text(device):
    """The base32 secret in groups of four, for typing into an app that cannot scan."""
    text = b32encode(device.bin_key).decode()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))
