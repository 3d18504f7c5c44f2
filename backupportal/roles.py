"""The three roles of DESIGN.md's table, as Django groups with model permissions.

Auditors read everything and change nothing. DBAs run backups, request and approve restores,
edit schedules, acknowledge alerts, log drills. Sysadmins edit servers and storage locations,
acknowledge alerts, log drills. django-q2's own admin (it can run any callable) and the
journal's change/delete are given to nobody: superusers only, and nobody, respectively.
"""

from functools import wraps

from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied

from backupportal.models import SsoIdentity

DBA, SYSADMIN, AUDITOR = "DBA", "Sysadmin", "Auditor"

# Why four eyes counts two accounts as one person (why_same_person), for the refusal's message.
OWN_ACCOUNT = "your own"
SAME_ADDRESS = "asked from your other account, same e-mail address"
UNTOLD_APART = (
    "or so the portal must assume: it cannot tell a local account from a single sign-on one whose "
    "e-mail address the identity provider did not verify"
)
NO_ADDRESS = (
    "or so the portal must assume: a local account without an e-mail address cannot be told from a single "
    "sign-on one (an administrator gives it its holder's address)"
)
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
    """Four eyes needs two people: whether these two accounts may be one (why_same_person)."""
    return bool(why_same_person(user, author))


def why_same_person(user, author):
    """Why four eyes counts `user` and `author` as one person, in a few words, or "" when they are
    two people. When in doubt they are one: that only asks for another approver, while two accounts
    of one person taken for two people would let that person approve their own request."""
    if author is None:
        return ""
    if user.pk == author.pk:
        return OWN_ACCOUNT
    if same_address(user, author):
        return SAME_ADDRESS
    if _sso_address_unverified(user, author):
        # The address is the only tie between a local account and a single sign-on one. One the
        # provider did not verify was typed by its holder, who could have typed any other.
        return UNTOLD_APART
    if _local_without_address(user, author):
        return NO_ADDRESS
    return ""


def same_address(user, author):
    """One account, or two with one e-mail address (a local account and the one single sign-on
    made for the same person), whoever vouched for the address."""
    if author is None:
        return False
    if user.pk == author.pk:
        return True
    mail = (user.email or "").strip().lower()
    return bool(mail) and mail == (author.email or "").strip().lower()


def _sso_address_unverified(user, author):
    """One of the two is a local account, the other came from single sign-on with an address the
    provider did not mark verified at its last login. Two single sign-on accounts are two
    identities the provider tells apart; two local accounts carry addresses an administrator set."""
    verified = _sso_accounts(user)
    if (user.pk in verified) == (author.pk in verified):
        return False
    return not verified.get(user.pk, verified.get(author.pk))


def _local_without_address(user, author):
    """One of the two came from single sign-on, the other is a local account with no address:
    the only tie between the two is missing, so whoever holds both could approve their own."""
    sso = _sso_accounts(user)
    if (user.pk in sso) == (author.pk in sso):
        return False
    local = author if user.pk in sso else user
    return not (local.email or "").strip()


def _sso_accounts(user):
    """{account id: whether its address is verified} of every single sign-on account, read once
    per request (kept on the deciding user): the dashboard asks it of every pending request."""
    if not hasattr(user, "_sso_accounts"):
        user._sso_accounts = dict(SsoIdentity.objects.values_list("user_id", "email_verified"))
    return user._sso_accounts


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
