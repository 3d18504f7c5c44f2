from django.contrib import admin
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.admin.options import ShowFacets
from django.utils import timezone

from backupportal import journal
from backupportal.lib.admin import ReadOnlyAdmin
from backupportal.lib.pagination import CappedPaginator
from backupportal.models import JournalEntry

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
