"""The three roles of DESIGN.md's table, as Django groups with model permissions.

Auditors read everything and change nothing. DBAs run backups, request and approve restores,
edit schedules, acknowledge alerts, log drills. Sysadmins edit servers and storage locations,
acknowledge alerts, log drills. django-q2's own admin (it can run any callable) and the
journal's change/delete are given to nobody: superusers only, and nobody, respectively.
"""

from functools import wraps

from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied

DBA, SYSADMIN, AUDITOR = "DBA", "Sysadmin", "Auditor"
ROLES = (DBA, SYSADMIN, AUDITOR)

# Apps whose models every role may view.
VIEW_APPS = ["backups", "restores", "watching", "backupportal"]

EXTRA = {
    DBA: [
        "backups.run_backup",
        "backups.change_backupschedule",
        "backups.add_backupschedule",
        "backups.change_critical_tables",
        "restores.request_restore",
        "restores.approve_restore",
        "backups.hold_backup",
        "backups.request_change",
        "backups.approve_change",
        "watching.acknowledge_alert",
        "restores.log_drill",
        "restores.add_drdrill",
        "restores.change_drdrill",
        "restores.add_drdrillstep",
        "restores.change_drdrillstep",
        "watching.complete_maintenance",
        "watching.make_evidence_pack",
    ],
    SYSADMIN: [
        "backups.add_server",
        "backups.change_server",
        "backups.add_storagelocation",
        "backups.change_storagelocation",
        "backups.request_change",
        "backups.approve_change",
        "watching.acknowledge_alert",
        "restores.log_drill",
        "restores.add_drdrill",
        "restores.change_drdrill",
        "restores.add_drdrillstep",
        "restores.change_drdrillstep",
        "watching.complete_maintenance",
        "watching.add_alertchannel",
        "watching.change_alertchannel",
    ],
    AUDITOR: ["watching.make_evidence_pack"],
}


def sync_groups(apps=None, **kwargs):
    """Create the groups and give them exactly their permissions. Idempotent."""
    from django.contrib.auth.management import create_permissions

    if apps is None:
        from django.apps import apps
    # post_migrate reaches the apps one by one: make sure every app's permissions exist
    # before the groups are given them (after a flush, later apps' are not there yet).
    for app_config in apps.get_app_configs():
        if app_config.label in VIEW_APPS:
            models_module = getattr(app_config, "models_module", None)
            app_config.models_module = True  # create_permissions skips an app without it
            create_permissions(app_config, apps=apps, verbosity=0)
            app_config.models_module = models_module
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    views = list(Permission.objects.filter(content_type__app_label__in=VIEW_APPS, codename__startswith="view_"))
    for name, extra in EXTRA.items():
        group, _ = Group.objects.get_or_create(name=name)
        perms = list(views)
        for dotted in extra:
            app_label, codename = dotted.split(".")
            perms += list(Permission.objects.filter(content_type__app_label=app_label, codename=codename))
        group.permissions.set(perms)


def role_names(user):
    """The roles (DBA, Sysadmin, Auditor) the user holds; being a superuser is none of them."""
    if not user.is_authenticated:
        return set()
    if not hasattr(user, "_role_names"):
        user._role_names = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
    return user._role_names


def has_role(user):
    """Every page but the login needs one of the three roles (DESIGN.md's role table)."""
    return bool(role_names(user))


def is_dba(user):
    """Approving a restore needs DBA membership: a superuser without it may not."""
    return DBA in role_names(user)


def same_person(user, author):
    """Four eyes needs two people: one account, or two accounts with one e-mail address (a local
    account and the one single sign-on made for the same person, who logs in with either), are one."""
    if author is None:
        return False
    if user.pk == author.pk:
        return True
    mail = (user.email or "").strip().lower()
    return bool(mail) and mail == (author.email or "").strip().lower()


def role_may(user, perm):
    """`perm` ("app.codename") as given by the user's roles only. Django's has_perm gives a
    superuser every permission; in the portal a superuser may do what their role may."""
    if not role_names(user):
        return False
    if not hasattr(user, "_role_perms"):
        perms = Permission.objects.filter(group__user=user, group__name__in=ROLES)
        user._role_perms = {
            f"{app}.{codename}" for app, codename in perms.values_list("content_type__app_label", "codename")
        }
    return perm in user._role_perms


def role_of(user):
    """The user's role name for pages ('DBA', 'Sysadmin', 'Auditor'), or ''."""
    if not user.is_authenticated:
        return ""
    names = role_names(user)
    for name in ROLES:
        if name in names:
            return name
    return "Superuser" if user.is_superuser else ""


def context_processor(request):
    user = getattr(request, "user", None)
    return {"role": role_of(user) if user is not None else ""}


def require_perm(perm):
    """View decorator: 403 (not a login redirect) for a logged-in user without `perm`."""

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not role_may(request.user, perm):
                raise PermissionDenied(f"Your role may not do this ({perm}).")
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
