"""Login limits, for every login form (the portal's and the admin's).

The limits are checked before the password, in the authentication backend, so that no form
can be used to go around them; the login page then says why the attempt was refused (429).
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
        if request is not None:
            refusal = LoginFailure.refusal(username, client_address(request))
            if refusal:
                request.login_refused = refusal
                # Stops authenticate() at once: no other backend checks the password.
                raise PermissionDenied(refusal)
        return super().authenticate(request, username=username, password=password, **kwargs)


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
    # user name at its address: polling it from elsewhere keeps nobody else waiting).
    if request is not None and not getattr(request, "login_refused", ""):
        LoginFailure.record(credentials.get("username", ""), client_address(request))


@receiver(user_logged_in, dispatch_uid="backupportal.logins.forget_failures")
def forget_failures(sender, request, user, **kwargs):
    LoginFailure.forget(user.get_username(), client_address(request))
