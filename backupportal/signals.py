"""Logins, failed logins and changes made in the admin go to the journal."""

import hashlib
import hmac
from datetime import timedelta

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth.models import User
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone

from backupportal import journal
from backupportal.lib.clientaddr import client_address
from backupportal.models import JournalEntry


def _client(request):
    return client_address(request)


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
    address, refused = _client(request), bool(getattr(request, "login_refused", ""))
    if refused and _refusal_journaled(address):
        return  # the limits refused it unchecked: one line per address and window says they held
    extra = {"refused": True} if refused else {}
    name, unknown = _journaled_name(credentials.get("username"))
    journal.record("login_failed", actor=name, outcome="failed", address=address, **unknown, **extra)


# What a failed login journals for a user name that no account has.
UNKNOWN_NAME = "(unknown user name)"


def _journaled_name(typed):
    """(actor, details) for a failed login: the account's name when `typed` names one (in any
    case), else UNKNOWN_NAME and a keyed hash of what was typed. A password typed into the
    user-name box must never reach the append-only journal, which every role reads; the hash
    lets an auditor see one unknown name tried again and again, and gives nobody the text."""
    typed = str(typed or "").strip()[:150]
    if not typed:
        return "", {}  # single sign-on's failures carry no name
    names = list(User.objects.filter(username__iexact=typed).values_list("username", flat=True))
    if names:
        return (typed if typed in names else names[0]), {}
    digest = hmac.new(journal._read_key(), b"failed login user name\0" + typed.lower().encode(), hashlib.sha256)
    return UNKNOWN_NAME, {"name_hmac": digest.hexdigest()[:16]}


def _refusal_journaled(address):
    """Whether an attempt the login limits refused from `address` is already in the journal for
    this window: a flood of refused attempts, each checking no password, would otherwise grow the
    append-only journal without end."""
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
    refused = JournalEntry.objects.filter(action="login_failed", at__gte=since, details__address=address)
    return refused.filter(details__refused=True).exists()


# Admin pages whose saves journal themselves, with their own action names (backups/admin.py).
SELF_JOURNALED = {"backups.server", "backups.storagelocation", "backups.backupschedule"}
ADMIN_ACTIONS = {ADDITION: "admin_added", CHANGE: "admin_changed", DELETION: "admin_deleted"}


@receiver(post_save, sender=LogEntry)
def on_admin_change(sender, instance, created, **kwargs):
    """Every add, change and delete made in the admin: users and groups, django-q2's schedules, drills..."""
    if created:
        label = f"{instance.content_type.app_label}.{instance.content_type.model}" if instance.content_type else ""
        if instance.action_flag == DELETION or label not in SELF_JOURNALED:
            journal_admin_log(instance)


def journal_admin_log(log_entry):
    ct = log_entry.content_type
    label = ct.model_class()._meta.label if ct and ct.model_class() else ""
    journal.record(
        ADMIN_ACTIONS[log_entry.action_flag],
        actor=log_entry.user.get_username(),
        obj=journal.Ref(label, log_entry.object_id, log_entry.object_repr),
        change=log_entry.get_change_message(),
    )
