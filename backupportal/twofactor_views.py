"""One's own second factor: the account page, enrolment (the secret shown once), recovery codes
(shown once) and the code asked after the password. Every account manages its own, auditors
included; resetting another person's is the admin's (backupportal/admin.py).

An account that has a second factor replaces it, or makes new recovery codes, only with a code of
the last FRESH_SECONDS, as approvals do: a session verified at its login hours ago (a laptop left
open, a stolen session cookie with the password) must not swap in its own authenticator."""

from urllib.parse import urlencode

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST, require_safe

from backupportal import twofactor
from backupportal.forms import CodeForm

# Session keys: the authenticator being enrolled, whether its secret was shown, new recovery codes.
PENDING_KEY = "two_factor_pending"
SHOWN_KEY = "two_factor_secret_shown"
CODES_KEY = "two_factor_new_codes"


@require_safe
@never_cache
def account(request):
    user = request.user
    context = {
        "enrolled": twofactor.remember_enrolment(request),
        "required": twofactor.required_of(user),
        "codes_left": twofactor.recovery_codes_left(user),
        "verified": user.is_verified(),
        "fresh": twofactor.is_fresh(request),
        "fresh_minutes": twofactor.FRESH_SECONDS // 60,
    }
    return render(request, "two_factor/account.html", context)


def _stale(request, what, back):
    """A redirect to the verify page (coming back to `back`) when the user has a second factor
    and this session has not proved it in the last FRESH_SECONDS; else None."""
    if twofactor.is_fresh(request) or not twofactor.has_device(request.user):
        return None
    minutes = twofactor.FRESH_SECONDS // 60
    messages.info(request, f"{what} needs a code of the last {minutes} minutes: type the current one, then try again.")
    return redirect(f"{reverse('two-factor-verify')}?{urlencode({'next': reverse(back)})}")


@require_POST
def start(request):
    stale = _stale(request, "Replacing the authenticator", "two-factor")
    if stale:
        return stale
    device = twofactor.start_enrolment(request.user)
    request.session[PENDING_KEY], request.session[SHOWN_KEY] = device.pk, False
    return redirect("two-factor-enrol")


@require_safe
@never_cache
def enrol(request):
    """The new authenticator's secret, once: a reload shows only the form for its first code."""
    device = twofactor.pending(request.user, request.session.get(PENDING_KEY))
    show = device is not None and not request.session.get(SHOWN_KEY, True)
    if show:
        request.session[SHOWN_KEY] = True
    context = {"device": device, "form": CodeForm(), "show": show}
    if show:
        context.update(qr=twofactor.qr_svg_data_uri(device), secret=twofactor.secret_text(device))
    return render(request, "two_factor/enrol.html", context)


@require_POST
def confirm(request):
    device = twofactor.pending(request.user, request.session.get(PENDING_KEY))
    form = CodeForm(request.POST)
    if device is None:
        messages.error(request, "No authenticator is waiting for its first code: start again.")
        return redirect("two-factor")
    stale = _stale(request, "Replacing the authenticator", "two-factor-enrol")
    if stale:
        return stale
    if not form.is_valid():
        messages.error(request, form.errors["otp_token"][0])
        return redirect("two-factor-enrol")
    codes, problem = twofactor.confirm_enrolment(request, device, form.cleaned_data["otp_token"])
    if problem:
        messages.error(request, problem)
        return redirect("two-factor-enrol")
    request.session.pop(PENDING_KEY, None)
    request.session[CODES_KEY] = codes
    messages.success(request, "Your authenticator is set up: every login now asks for its code.")
    return redirect("two-factor-codes")


@require_POST
def recovery(request):
    stale = _stale(request, "Making new recovery codes", "two-factor")
    if stale:
        return stale
    try:
        request.session[CODES_KEY] = twofactor.new_recovery_codes(request.user)
    except PermissionDenied as e:
        messages.error(request, str(e))
        return redirect("two-factor")
    messages.success(request, "New recovery codes: the old ones no longer work.")
    return redirect("two-factor-codes")


@require_safe
@never_cache
def codes(request):
    """New recovery codes, shown once: they leave the session as this page is made."""
    return render(request, "two_factor/codes.html", {"codes": request.session.pop(CODES_KEY, [])})


@never_cache
def verify(request):
    """The code after the password (or after single sign-on), once per login."""
    following = _next(request)
    enrolled = twofactor.remember_enrolment(request)
    form = CodeForm(request.POST or None)
    if request.method == "POST":
        if not enrolled:
            messages.info(request, "Your account has no second factor to check: set one up here.")
            return redirect("two-factor")
        problem = form.errors["otp_token"][0] if not form.is_valid() else ""
        problem = problem or twofactor.verify(request, form.cleaned_data["otp_token"], "login")
        if not problem:
            return redirect(following or "dashboard")
        messages.error(request, problem)
        return redirect(request.get_full_path())
    return render(request, "two_factor/verify.html", {"form": form, "next": following, "enrolled": enrolled})


def _next(request):
    target = request.POST.get("next") or request.GET.get("next") or ""
    safe = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return target if safe and "\x00" not in target else ""
