"""Logins and failed logins go to the journal."""

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from backupportal import journal


def _client(request):
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


@receiver(user_logged_in)
def on_login(sender, request, user, **kwargs):
    journal.record("login", actor=user.get_username(), address=_client(request))


@receiver(user_logged_out)
def on_logout(sender, request, user, **kwargs):
    if user is not None:
        journal.record("logout", actor=user.get_username(), address=_client(request))


@receiver(user_login_failed)
def on_login_failed(sender, credentials, request=None, **kwargs):
    # credentials holds the username and a masked password (Django cleanses it); keep the name only.
    journal.record(
        "login_failed", actor=str(credentials.get("username", ""))[:150], outcome="failed", address=_client(request)
    )
