"""Access rules that hold on every page, including pages added later.

- A logged-in user with none of the three roles gets a page saying so, and nothing else: no
  dashboard, no server names or DSNs. Superusers keep the admin (django-q2's task admin and
  the users are theirs alone), but the portal's pages need a role for them too.
- Auditors read everything and change nothing: every request that could change something is
  refused for them, but for making an evidence pack (it only adds the pack and its journal entry).
- Every response carries a Content-Security-Policy: scripts and styles from our own static
  files only, never inline.
- A query string the database cannot take (a NUL character, a date in the year 1) is a 400.
- A second factor: asked after the password when the account has one; when REQUIRE_2FA
  requires one and the account has none, the enrolment page is the only page open to it.
"""

import logging
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.http import HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse

from backupportal import twofactor
from backupportal.lib.clientaddr import from_trusted_proxy, on_this_host
from backupportal.roles import AUDITOR, has_role, role_of

logger = logging.getLogger(__name__)

# One's own second factor: every account's, whatever its role (an auditor's too).
TWO_FACTOR_ENROL = {"two-factor", "two-factor-start", "two-factor-enrol", "two-factor-confirm", "two-factor-codes"}
TWO_FACTOR = TWO_FACTOR_ENROL | {"two-factor-verify", "two-factor-recovery"}
# What an auditor may still send: logging in and out, changing their own password, and their
# own second factor.
ALLOWED = {"login", "logout", "admin:logout", "admin:password_change"}
ALLOWED |= {"two-factor-start", "two-factor-confirm", "two-factor-recovery", "two-factor-verify"}
# ...and making an evidence pack, the auditor's own work: a POST, so that it needs the page's CSRF
# token and a link from another site cannot make one in their name (watching/evidence_views.py).
ALLOWED |= {"evidence-make"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}
# What a user without a role may still reach: the way out, and the second factor (a superuser
# without a role enrols before the admin opens).
NO_ROLE_ALLOWED = {"logout", "admin:logout"} | TWO_FACTOR

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ForwardedProtoMiddleware:
    """X-Forwarded-Proto says https (SECURE_PROXY_SSL_HEADER) only from a proxy in
    TRUSTED_PROXIES, or one on this host (a loopback address, or a Unix socket: no address), as
    the README's TLS proxy in front of gunicorn on 127.0.0.1 is: from anyone else, a client on
    plain http could claim https, and the portal would neither redirect it nor hold it to the
    referer checks https gets."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "HTTP_X_FORWARDED_PROTO" in request.META and not (on_this_host(request) or from_trusted_proxy(request)):
            del request.META["HTTP_X_FORWARDED_PROTO"]
        return self.get_response(request)


class RoleRequiredMiddleware:
    """After LoginRequiredMiddleware: the anonymous were sent to the login page already."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if not getattr(view_func, "login_required", True) or not request.user.is_authenticated:
            return None  # public views (login, /metrics with its token), or the login redirect's job
        match = request.resolver_match
        name = match.view_name if match is not None else ""
        if name in NO_ROLE_ALLOWED or has_role(request.user):
            return None
        if request.user.is_superuser and match is not None and "admin" in match.namespaces:
            return None
        return render(request, "no_role.html", status=403)


class PrivatePagesMiddleware:
    """A page shown to a logged-in user (DSNs, restore reasons, the journal) is never stored by
    the browser or a proxy between: after logout, Back or a shared cache would show it again."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and not response.has_header("Cache-Control"):
            response["Cache-Control"] = "no-store, private"
        return response


class SecondFactorMiddleware:
    """After the roles: an account with a second factor proves it once per login (the verify
    page) before anything else opens; one that REQUIRE_2FA requires it of enrols first."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        user = request.user
        if not getattr(view_func, "login_required", True) or not user.is_authenticated:
            return None
        match = request.resolver_match
        name = match.view_name if match is not None else ""
        if name in ("logout", "admin:logout", "two-factor-verify") or user.is_verified():
            return None
        if twofactor.session_enrolled(request):
            return _to("two-factor-verify", request)
        if twofactor.required_of(user) and name not in TWO_FACTOR_ENROL:
            return _to("two-factor", request)
        return None


def _to(name, request):
    """A redirect to the second factor's page that comes back to where the user was going."""
    back = request.get_full_path() if request.method == "GET" else ""
    return HttpResponseRedirect(reverse(name) + (f"?{urlencode({'next': back})}" if back else ""))


class AuditorsChangeNothingMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.method in SAFE_METHODS or not request.user.is_authenticated:
            return None
        match = request.resolver_match
        if match is not None and match.view_name in ALLOWED:
            return None
        if role_of(request.user) == AUDITOR:
            raise PermissionDenied("Auditors read the portal and change nothing.")
        return None


class BadQueryMiddleware:
    """A query string the database cannot take (a filter, the admin's search) is refused with 400.

    PostgreSQL cannot compare text with a NUL character in it, and a date in the year 1 shifted
    to UTC overflows: both were 500s. The filters that read the query string are plain
    parameters and the admin's, with no form to show an error on, so one line says what to
    correct. Forms (POST) give form errors instead: an overflow there is still a bug to fix."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "\x00" in request.path_info:  # a server's or a run's name in the path
            return HttpResponseBadRequest(
                "The address holds a NUL character (%00): remove it and try again.\n",
                content_type="text/plain; charset=utf-8",
            )
        for name, values in request.GET.lists():
            if "\x00" in name or any("\x00" in value for value in values):
                shown = name.replace("\x00", "%00")[:60]
                return HttpResponseBadRequest(
                    f"The address holds a NUL character (%00) in {shown!r}: remove it and try again.\n",
                    content_type="text/plain; charset=utf-8",
                )
        return self.get_response(request)

    def process_exception(self, request, exception):
        if request.method not in ("GET", "HEAD") or not isinstance(exception, OverflowError):
            return None
        logger.warning("Bad Request (out of range): %s?%s", request.path, request.META.get("QUERY_STRING", "")[:200])
        return HttpResponseBadRequest(
            "A value in the address is out of range (a date before 1900, a number too large?): correct it.\n",
            content_type="text/plain; charset=utf-8",
        )


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response
