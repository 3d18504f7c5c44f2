from django.contrib import admin

from backupportal.models import Alert, JournalEntry, MaintenanceTask

admin.site.site_header = "backupportal"
admin.site.site_title = "backupportal"
admin.site.index_title = "Catalogs"


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

    # Acknowledging needs a note: it is done on the alert's own page ("View on site").
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(MaintenanceTask)
class MaintenanceTaskAdmin(admin.ModelAdmin):
    list_display = ["kind", "due_at", "completed_at", "completed_by", "evidence"]
    list_filter = ["kind", ("completed_at", admin.EmptyFieldListFilter)]

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return False
