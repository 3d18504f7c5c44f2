from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.admin.options import ShowFacets
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef
from django.utils import timezone
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice

from backupportal import journal, twofactor
from backupportal.lib.admin import ReadOnlyAdmin
from backupportal.lib.pagination import CappedPaginator
from backupportal.models import JournalEntry, SsoIdentity

admin.site.site_header = "backupportal"
admin.site.site_title = "backupportal"
admin.site.index_title = "Catalogs"


@admin.action(permissions=["delete"], description=delete_selected.short_description)
def delete_selected_journaled(modeladmin, request, queryset):
    """Django's bulk delete, journaled: it logs several deletions with bulk_create, which sends
    no post_save, so backupportal.signals cannot see them (a single deletion it does see)."""
    since = timezone.now()
    response = delete_selected(modeladmin, request, queryset)
    if response is None:  # deleted; a response is the confirmation page
        from backupportal.signals import journal_admin_log

        logged = LogEntry.objects.filter(user=request.user, action_flag=DELETION, action_time__gte=since)
        if len(logged) > 1:
            for log_entry in logged:
                journal_admin_log(log_entry)
    return response


admin.site.add_action(delete_selected_journaled, "delete_selected")


class JournalActionFilter(admin.SimpleListFilter):
    """The actions the portal writes, listed from journal.ACTIONS: Django's default would
    SELECT DISTINCT action over every entry on every page."""

    title = "action"
    parameter_name = "action"

    def lookups(self, request, model_admin):
        return sorted(journal.ACTIONS.items())

    def queryset(self, request, queryset):
        return queryset.filter(action=self.value()) if self.value() else queryset


@admin.register(JournalEntry)
class JournalEntryAdmin(ReadOnlyAdmin):
    """The journal is append-only: nobody adds, changes or deletes here, superusers included.

    A million entries: a capped count, no facets and no date_hierarchy (a DISTINCT over the
    period); the auditor's own journal page pages by keyset."""

    list_display = ["id", "at", "actor", "action", "server", "object_repr", "outcome"]
    list_filter = [JournalActionFilter, "outcome", ("at", admin.DateFieldListFilter)]
    search_fields = ["actor", "server", "object_repr", "=object_id"]
    paginator = CappedPaginator
    show_full_result_count = False
    show_facets = ShowFacets.NEVER


# --- accounts: the second factor's reset and single sign-on identities ---

# django-otp's own device pages would show the TOTP secrets and the recovery codes: the portal
# has none of them. A person manages their own second factor; an administrator resets another's
# from the user list below.
for _model in (TOTPDevice, StaticDevice):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)


@admin.action(description="Reset the second factor (a lost phone): they enrol again at their next login")
def reset_second_factor(modeladmin, request, queryset):
    for user in queryset:
        try:
            removed = twofactor.reset(user, request.user)
        except PermissionDenied as e:
            modeladmin.message_user(request, str(e), messages.ERROR)
        else:
            modeladmin.message_user(request, f"{user.get_username()}: {removed} second-factor device(s) removed.")


class PortalUserAdmin(UserAdmin):
    """Django's user admin (superusers only), with the second factor: whether it is set up, and
    its reset by another administrator. Never a secret."""

    actions = [reset_second_factor]
    list_display = [*UserAdmin.list_display, "second_factor"]

    def get_queryset(self, request):
        confirmed = TOTPDevice.objects.filter(user=OuterRef("pk"), confirmed=True)
        return super().get_queryset(request).annotate(has_authenticator=Exists(confirmed))

    @admin.display(boolean=True, description="second factor", ordering="has_authenticator")
    def second_factor(self, obj):
        return obj.has_authenticator


if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, PortalUserAdmin)


@admin.register(SsoIdentity)
class SsoIdentityAdmin(ReadOnlyAdmin):
    """Who logged in through single sign-on, linked by issuer and subject (backupportal/sso.py)."""

    list_display = ["user", "issuer", "subject", "email_verified", "last_groups", "created_at", "last_login_at"]
    list_select_related = ["user"]
    search_fields = ["user__username", "=subject"]
