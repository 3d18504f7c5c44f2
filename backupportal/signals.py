"""Logins, failed logins and changes made in the admin go to the journal."""

from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver

from backupportal import journal
from backupportal.lib.clientaddr import client_address


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
    journal.record(
        "login_failed", actor=str(credentials.get("username", ""))[:150], outcome="failed", address=_client(request)
    )


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
