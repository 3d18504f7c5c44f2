from datetime import date, datetime, timedelta

from django.contrib import admin, messages
from django.contrib.admin.options import ShowFacets
from django.db.models import Prefetch
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince

from backupportal.lib.admin import ReadOnlyAdmin
from backupportal.lib.pagination import CappedPaginator
from backupportal.roles import role_may
from backups import (
    admin_locations,  # noqa: F401 (registers the storage locations' admin)
    admin_servers,  # noqa: F401 (registers the servers' and schedules' admin)
)
from backups.models import (
    BackupCopy,
    BackupRun,
    Verification,
    WalSegment,
)


class CatalogColumns:
    """Columns the catalogs share: sizes in human units, sha256 shortened."""

    @admin.display(description="Size", ordering="size")
    def human_size(self, obj):
        return filesizeformat(obj.size) if obj.size is not None else "-"

    @admin.display(description="sha256")
    def short_sha256(self, obj):
        return obj.sha256[:12]


class ReadOnlyHistoryAdmin(ReadOnlyAdmin):
    """Runs, copies and segments are history: viewable, never added or edited by hand."""


class LargeHistoryAdmin(ReadOnlyHistoryAdmin):
    """History that grows by the million (WAL segments, their copies): pages that never count it all."""

    paginator = CappedPaginator
    show_full_result_count = False
    # "Show counts" would count every filter choice over the whole table.
    show_facets = ShowFacets.NEVER


class ArchivedDayFilter(admin.SimpleListFilter):
    """One day of segments (in TIME_ZONE): a range on the indexed archived_at; any YYYY-MM-DD works,
    the last fortnight is offered. No query: the choices are dates, not what the table holds."""

    title = "day archived"
    parameter_name = "archived_on"
    OFFERED_DAYS = 14

    def lookups(self, request, model_admin):
        today = timezone.localdate()
        days = [today - timedelta(days=i) for i in range(self.OFFERED_DAYS)]
        return [(d.isoformat(), d.strftime("%a %d %b")) for d in days]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        try:
            day = date.fromisoformat(self.value())
        except ValueError:
            messages.warning(request, f"'{self.value()}' is not a day: use YYYY-MM-DD. Showing every day.")
            return queryset
        start = timezone.make_aware(datetime.combine(day, datetime.min.time()))
        return queryset.filter(archived_at__gte=start, archived_at__lt=start + timedelta(days=1))


class ArtifactFilter(admin.SimpleListFilter):
    """The kinds of file a copy holds, listed here: Django's default would SELECT DISTINCT over every copy."""

    title = "artifact"
    parameter_name = "artifact"
    KINDS = [
        ("main", "main (dump or base)"),
        ("globals", "globals"),
        ("manifest", "backup_manifest"),
        ("signed_manifest", "signed manifest"),
        ("wal", "WAL segment"),
    ]

    def lookups(self, request, model_admin):
        return self.KINDS

    def queryset(self, request, queryset):
        return queryset.filter(artifact=self.value()) if self.value() else queryset


def copies_prefetch():
    """Each row's copies with their locations, fetched for the whole page in one query."""
    return Prefetch("copies", queryset=BackupCopy.objects.select_related("location").order_by("location__name"))


def copies_where(obj, artifact=None):
    """Where the copies (of one artifact) are, with their status: "primary ok · nas ok · s3 failed"."""
    copies = [c for c in obj.copies.all() if artifact is None or c.artifact == artifact]
    if not copies:
        return "none"
    return format_html_join(
        " · ", '<span class="status status-{}">{} {}</span>', ((c.status, c.location.name, c.status) for c in copies)
    )


class CopyInline(CatalogColumns, admin.TabularInline):
    model = BackupCopy
    extra = 0
    fields = ["location", "artifact", "key", "size", "short_sha256", "status", "attempts", "last_error", "verified_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(BackupRun)
class BackupRunAdmin(CatalogColumns, ReadOnlyHistoryAdmin):
    list_display = [
        "id",
        "server",
        "kind",
        "method",
        "status_badge",
        "created_at",
        "age",
        "human_size",
        "duration_display",
        "short_sha256",
        "copies",
    ]
    list_filter = ["server", "kind", "status", "trigger", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "server__name", "sha256", "key"]
    list_select_related = ["server"]
    # No date_hierarchy: its links are a DISTINCT over every run (the created_at filter covers dates).
    # 50 a page: at 20,000 runs the page's time is rendering its rows, not SQL (bench/RESULTS.md).
    list_per_page = 50
    inlines = [CopyInline]
    show_full_result_count = False
    actions = ["verify_copies"]

    def has_run_backup_permission(self, request):
        return role_may(request.user, "backups.run_backup")  # as the Back up now action

    @admin.action(description="Verify copies now (re-read every tier)", permissions=["run_backup"])
    def verify_copies(self, request, queryset):
        from backups.tasks import enqueue_verify

        for run in queryset:
            result = enqueue_verify(run, actor=request.user.get_username())
            self.message_user(request, result.message, messages.SUCCESS if result.ok else messages.WARNING)

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related(copies_prefetch())

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj):
        return format_html('<span class="status status-{}">{}</span>', obj.status, obj.get_status_display())

    @admin.display(description="Method")
    def method(self, obj):
        return obj.method_display

    @admin.display(description="Age")
    def age(self, obj):
        return timesince(obj.finished_at or obj.created_at)

    @admin.display(description="Duration")
    def duration_display(self, obj):
        d = obj.duration
        return f"{d.total_seconds():.1f} s" if d is not None else "-"

    @admin.display(description="Copies (main file)")
    def copies(self, obj):
        return copies_where(obj, "main")


@admin.register(BackupCopy)
class BackupCopyAdmin(CatalogColumns, LargeHistoryAdmin):
    list_display = [
        "id",
        "location",
        "artifact",
        "key",
        "human_size",
        "short_sha256",
        "status",
        "attempts",
        "copied_at",
        "verified_at",
    ]
    list_filter = ["location", "status", ArtifactFilter]
    search_fields = ["key", "sha256"]
    list_select_related = ["location"]
    # Newest first on the primary key (created_at has no index: ids grow with it).
    ordering = ["-id"]
    sortable_by = ["id"]


@admin.register(WalSegment)
class WalSegmentAdmin(CatalogColumns, LargeHistoryAdmin):
    list_display = ["name", "server", "timeline", "human_size", "archived_at", "source", "short_sha256", "copies"]
    # No date_hierarchy: its year/month/day links are a DISTINCT over every row of the period.
    list_filter = ["server", ArchivedDayFilter, "source"]
    search_fields = ["name"]
    search_help_text = "A segment's exact file name, e.g. 000000010000000A0000003F or 00000002.history."
    list_select_related = ["server"]
    # Newest first, on the (server, archived_at) and (archived_at) indexes; other sorts would sort it all.
    ordering = ["-archived_at", "-id"]
    sortable_by = ["archived_at"]

    def get_search_results(self, request, queryset, search_term):
        """An exact name on the wal_name index (the admin's own search is a case-blind scan);
        the hex part in upper case as PostgreSQL names it, a suffix (.history, .partial) as it is."""
        term = search_term.strip()
        if not term:
            return queryset, False
        stem, dot, suffix = term.partition(".")
        return queryset.filter(name=stem.upper() + dot + suffix), False

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related(copies_prefetch())

    @admin.display(description="Copies")
    def copies(self, obj):
        return copies_where(obj)


@admin.register(Verification)
class VerificationAdmin(ReadOnlyHistoryAdmin):
    list_display = ["id", "what", "status", "requested_by", "created_at", "copies", "bytes", "duration_display"]
    list_filter = ["status", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "=run__id", "requested_by"]
    list_select_related = ["run__server"]
    show_full_result_count = False

    @admin.display(description="Of")
    def what(self, obj):
        if obj.run_id is None:
            return "every copy"
        return format_html('<a href="{}">run #{} ({})</a>', obj.get_absolute_url(), obj.run_id, obj.run.server)

    @admin.display(description="Copies")
    def copies(self, obj):
        return f"{obj.copies_checked}/{obj.copies_total} ({obj.copies_bad} bad, {obj.copies_unreachable} unreachable)"

    @admin.display(description="Bytes checked")
    def bytes(self, obj):
        return filesizeformat(obj.bytes_checked)

    @admin.display(description="Duration")
    def duration_display(self, obj):
        d = obj.duration
        return f"{d.total_seconds():.1f} s" if d is not None else "-"
