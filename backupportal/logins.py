"""Login limits, for every login form (the portal's and the admin's).

The limits are checked before the password, in the authentication backend, so that no form
can be used to go around them; the login page then says why the attempt was refused (429).
A password attempt is counted as a failure in the same step as the check, before its password
is checked, so attempts sent at once are counted one after another.
Counting is in LoginFailure (backupportal.models), shared by every web worker.
"""

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver

from backupportal.lib.clientaddr import client_address
from backupportal.models import LoginFailure


class LimitedModelBackend(ModelBackend):
    """Django's own backend, behind the login limits."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        attempt = _admit(request, username, password) if request is not None else None
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if attempt is not None:
            request.login_counted = True  # count_failure: already counted
            if user is not None:
                attempt.delete()
        return user


def _admit(request, username, password):
    """This attempt, counted as a failure before its password is checked (None when there is no
    password to check: single sign-on's callback, whose failure count_failure counts after);
    PermissionDenied when the login limits refuse it."""
    address = client_address(request)
    if username is None or password is None:
        refusal, attempt = LoginFailure.refusal(username, address), None
    else:
        refusal, attempt = LoginFailure.admit(username, address)
    if refusal:
        request.login_refused = refusal
        # Stops authenticate() at once: no other backend checks the password.
        raise PermissionDenied(refusal)
    return attempt


class LoginView(auth_views.LoginView):
    def get_context_data(self, **kwargs):
        # The single sign-on button, when OIDC_RP_CLIENT_ID is set (backupportal/sso.py).
        sso = settings.OIDC_PROVIDER_NAME if settings.OIDC_RP_CLIENT_ID else ""
        return super().get_context_data(sso=sso, **kwargs)

    def form_invalid(self, form):
        refusal = getattr(self.request, "login_refused", "")
        if refusal:
            return self.render_to_response(self.get_context_data(form=form, refusal=refusal), status=429)
        return super().form_invalid(form)


@receiver(user_login_failed, dispatch_uid="backupportal.logins.count_failure")
def count_failure(sender, credentials, request=None, **kwargs):
    # A refused attempt checked no password: it does not make the wait longer (the wait is of its
    # user name at its address: polling it from elsewhere keeps nobody else waiting). A password
    # attempt was counted before its check (LoginFailure.admit).
    counted = getattr(request, "login_refused", "") or getattr(request, "login_counted", False)
    if request is not None and not counted:
        LoginFailure.record(credentials.get("username", ""), client_address(request))


@receiver(user_logged_in, dispatch_uid="backupportal.logins.forget_failures")
def forget_failures(sender, request, user, **kwargs):
    LoginFailure.forget(user.get_username(), client_address(request))
