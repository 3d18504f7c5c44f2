"""Auditors read everything and change nothing: every request that could change something is
refused for them here, whatever page it is sent to, including pages added later."""

from django.core.exceptions import PermissionDenied

from backupportal.roles import AUDITOR, role_of

# What an auditor may still send: logging in and out, and changing their own password.
ALLOWED = {"login", "logout", "admin:logout", "admin:password_change"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}


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
