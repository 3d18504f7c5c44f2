"""Admin pages of what the portal watches: alerts (read only) and the maintenance calendar."""

from django.contrib import admin
from django.utils.html import format_html

from backupportal.lib.admin import ReadOnlyAdmin
from watching.models import Alert, MaintenanceTask


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """Read only: the monitor alone opens and resolves alerts, and acknowledging needs a note,
    given on the alert's own page ("View on site")."""

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
