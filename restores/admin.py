from django.contrib import admin

from backupportal import journal
from backups.admin import ReadOnlyHistoryAdmin
from restores.drill_forms import DrillAdminForm, StepAdminForm
from restores.models import DrDrill, DrDrillStep, RestoreRequest, RestoreRun, RestoreTest


@admin.register(RestoreRequest)
class RestoreRequestAdmin(ReadOnlyHistoryAdmin):
    # Requests are made, approved and rejected on the portal's pages, where the four-eyes
    # rule is enforced; here they are read.
    list_display = ["id", "server", "destination", "status", "requested_by", "requested_at", "decided_by", "decided_at"]
    list_filter = ["status", "destination", "server"]
    list_select_related = ["server", "requested_by", "decided_by"]


@admin.register(RestoreRun)
class RestoreRunAdmin(ReadOnlyHistoryAdmin):
    list_display = ["id", "kind", "server", "status", "into_database", "into_datadir", "created_at", "duration_s"]
    list_filter = ["kind", "status", "server"]
    list_select_related = ["server"]


@admin.register(RestoreTest)
class RestoreTestAdmin(ReadOnlyHistoryAdmin):
    list_display = ["id", "server", "backup_run", "status", "monthly", "started_at", "duration_s"]
    list_filter = ["status", "monthly", "server"]
    list_select_related = ["server"]


class DrDrillStepInline(admin.TabularInline):
    # A drill is created with its eight steps; here they are filled in, never added or removed.
    model = DrDrillStep
    form = StepAdminForm
    extra = 0
    can_delete = False
    readonly_fields = ["step"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(DrDrill)
class DrDrillAdmin(admin.ModelAdmin):
    form = DrillAdminForm
    list_display = ["title", "server", "started_at", "critical_restored_at", "logged_by"]
    list_select_related = ["server", "logged_by"]
    inlines = [DrDrillStepInline]
    readonly_fields = ["logged_by"]

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if not change:
            obj.logged_by = request.user
        super().save_model(request, obj, form, change)

    def save_formset(self, request, form, formset, change):
        # A step filled in here is journaled as on the drill's page: the evidence pack checks
        # each step's row against its newest drill_step_recorded entry.
        super().save_formset(request, form, formset, change)
        for step, _ in formset.changed_objects:
            journal.record(
                "drill_step_recorded",
                actor=request.user.get_username(),
                obj=step.drill,
                step=step.step,
                who=step.who,
                started_at=step.started_at,
                finished_at=step.finished_at,
                outcome=step.outcome,
            )
