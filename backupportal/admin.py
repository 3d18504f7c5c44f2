from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.models import DELETION, LogEntry
from django.utils import timezone
from django.utils.html import format_html

from backupportal import journal
from backupportal.models import Alert, JournalEntry, MaintenanceTask

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


@admin.register(JournalEntry)
class JournalEntryAdmin(admin.ModelAdmin):
    """The journal is append-only: nobody adds, changes or deletes here, superusers included."""

    list_display = ["id", "at", "actor", "action", "server", "object_repr", "outcome"]
    list_filter = ["action", "outcome", ("at", admin.DateFieldListFilter)]
    search_fields = ["actor", "server", "object_repr", "=object_id"]
    date_hierarchy = "at"
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "condition",
        "subject",
        "state",
        "opened_at",
        "last_seen_at",
        "resolved_at",
        "opened_mail_sent_at",
    ]
    list_filter = ["state", "condition"]
    search_fields = ["subject", "message"]
    actions = ["acknowledge"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_acknowledge_permission(self, request):
        return request.user.has_perm("backupportal.acknowledge_alert")

    @admin.action(description="Acknowledge", permissions=["acknowledge"])
    def acknowledge(self, request, queryset):
        n = 0
        for alert in queryset.filter(state=Alert.State.OPEN):
            alert.state, alert.acknowledged_by, alert.acknowledged_at = (
                Alert.State.ACKNOWLEDGED,
                request.user,
                timezone.now(),
            )
            alert.save(update_fields=["state", "acknowledged_by", "acknowledged_at"])
            journal.record(
                "alert_acknowledged", actor=request.user.get_username(), obj=alert, server=alert.server or ""
            )
            n += 1
        self.message_user(request, f"{n} alert(s) acknowledged.", messages.SUCCESS)


@admin.register(MaintenanceTask)
class MaintenanceTaskAdmin(admin.ModelAdmin):
    # Tasks are completed on the calendar page (with their evidence); a superuser may move a due date here.
    list_display = ["kind", "due_on", "completed_at", "completed_by", "evidence"]
    list_filter = ["kind", ("completed_at", admin.EmptyFieldListFilter)]
    list_select_related = ["completed_by", "evidence_entry", "evidence_restore_test", "evidence_drill"]
    raw_id_fields = ["evidence_entry", "evidence_restore_test", "evidence_drill"]

    @admin.display(description="Evidence")
    def evidence(self, obj):
        link = obj.evidence_link()
        return format_html('<a href="{}">{}</a>', *link) if link else "-"

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return False
