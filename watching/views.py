"""The watching pages: the dashboard, each server's page, the alerts, and /metrics for Prometheus."""

import hmac

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Case, IntegerField, Value, When
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from backupportal import journal
from backupportal.models import JournalEntry
from backupportal.roles import require_perm
from backups import binaries, retention
from backups.critical import CriticalTablesForm, choose_critical_tables, dropped_tables
from backups.models import BackupSchedule, Database, Server, StorageLocation
from watching import coverage
from watching import dashboard as figures
from watching.charts import server_charts
from watching.metrics import CatalogCollector
from watching.models import ALERT_STATES, Alert


def dashboard(request):
    return render(
        request,
        "dashboard.html",
        {
            "waiting": figures.waiting_for(request.user),
            "alert_counts": Alert.objects.tally(),  # as the alerts page counts them
            "servers": [figures.server_health(s) for s in figures.servers()],
            "locations": [location.health() for location in StorageLocation.objects.filter(enabled=True)],
            "storage_legend": figures.storage_legend(),
            "coverage_gaps": coverage.gap_count(),
            "portal_backup": figures.portal_backup(),
        },
    )


def coverage_view(request):
    """Every database of every cluster, what protects it and where it falls short (read-only)."""
    rows = coverage.rows()
    return render(
        request,
        "coverage.html",
        {"rows": rows, "with_gaps": sum(1 for r in rows if r.gaps), "max_test_age": coverage.RESTORE_TEST_MAX_AGE},
    )


def alert_list(request):
    """Open alerts first (unacknowledged, then acknowledged), newest first; filters in the query string."""
    state = request.GET.get("state", "active")
    if state not in ALERT_STATES:
        state = "active"
    alerts = Alert.objects.in_state(state).select_related("server", "location", "acknowledged_by")
    for field, lookup in (("condition", "condition"), ("server", "server__name"), ("location", "location__name")):
        if request.GET.get(field):
            alerts = alerts.filter(**{lookup: request.GET[field]})
    rank = Case(
        When(state="open", then=Value(0)),
        When(state="acknowledged", then=Value(1)),
        default=Value(2),
        output_field=IntegerField(),
    )
    alerts = alerts.annotate(rank=rank).order_by("rank", "-opened_at", "-pk")
    page = Paginator(alerts, 50).get_page(request.GET.get("page"))
    return render(
        request,
        "alerts/list.html",
        {
            "page": page,
            "state": state,
            "states": list(ALERT_STATES),
            "conditions": Alert.Condition.choices,
            "servers": Server.objects.values_list("name", flat=True),
            "filters": {k: request.GET.get(k, "") for k in ("condition", "server", "location")},
        },
    )


def alert_detail(request, alert_id):
    alert = get_object_or_404(Alert.objects.select_related("server", "location", "acknowledged_by"), pk=alert_id)
    # Entries written before the model moved name it by its old label (journal.MOVED_LABELS).
    history = JournalEntry.objects.filter(object_type__in=journal.labels_of(Alert), object_id=str(alert.pk)).order_by(
        "id"
    )
    deliveries = alert.deliveries.select_related("channel").order_by("channel__name", "event")
    return render(request, "alerts/detail.html", {"alert": alert, "history": history, "deliveries": deliveries})


@require_POST
@require_perm("watching.acknowledge_alert")
def acknowledge_alert(request, alert_id):
    alert = get_object_or_404(Alert, pk=alert_id)
    note = request.POST.get("note", "").strip()
    if not note:
        messages.error(request, "Write a note to acknowledge: what you are doing about it, or why it can wait.")
    elif "\x00" in note:
        messages.error(request, "The note holds a NUL character, which the database cannot store: remove it.")
    elif alert.acknowledge(request.user, note[:2000]):
        messages.success(request, f"Alert #{alert.pk} acknowledged; it resolves by itself when its condition clears.")
    else:
        messages.warning(request, f"Alert #{alert.pk} is {alert.get_state_display().lower()}: nothing to acknowledge.")
    return redirect(alert)


def server_detail(request, name, critical_form=None):
    """A server's page: its health and charts, backup chains, runs, schedules, restore tests, critical tables."""
    server = get_object_or_404(Server, name=name)
    tests = list(server.restore_tests.order_by("-started_at")[:10])
    schedules = {s.job: s for s in server.schedules.all()}
    context = {
        "health": figures.server_health(server),
        "server": server,
        "runs": server.runs.select_related("database").order_by("-created_at")[:20],
        "coverage": coverage.rows([server]),
        "schedules": list(schedules.values()),
        "chains": server.runs.chains(),
        "retention": retention.card(server),
        "base_schedule": schedules.get(BackupSchedule.Job.BASE),
        "incremental_schedule": schedules.get(BackupSchedule.Job.INCREMENTAL),
        "binaries": binaries.describe(server),
        "tests": tests,
        "last_test": tests[0] if tests else None,
        "untested": server.runs.good().filter(restore_tests=None).order_by("-finished_at")[:20],
        "charts": server_charts(server),
        "critical_forms": critical_forms(server, critical_form),
    }
    return render(request, "backups/server.html", context)


@require_POST
@require_perm("backups.change_critical_tables")
def critical_tables_edit(request, name):
    """DBAs choose the tables that must never be empty or shrink; each is checked on the database.

    Here beside the server page, which shows the form again with its errors."""
    server = get_object_or_404(Server, name=name)
    database = _chosen_database(server, request.POST.get("database", ""))
    form = CriticalTablesForm(database, request.POST)
    if not form.is_valid():
        return server_detail(request, name, critical_form=form)
    try:
        change = choose_critical_tables(
            database, form.cleaned_data["tables"], request.user, form.cleaned_data["reason"]
        )
    except ValidationError as e:
        form.add_error("reason", e.messages[0])
        return server_detail(request, name, critical_form=form)
    chosen = ", ".join(database.critical_tables) or "none"
    messages.success(request, f"Critical tables of {database}: {chosen}.")
    if change is not None:
        off = ", ".join(dropped_tables(database, form.cleaned_data["tables"]))
        messages.warning(
            request, f"Taking {off} off waits for {change.deciders} to approve change request #{change.pk}."
        )
    return redirect(server)


def _chosen_database(server, given):
    """The database a critical-tables form is for: one the server backs up (404 otherwise), the
    DSN's when none is named."""
    if not given:
        return Database.of_dsn(server)
    if not given.isdigit() or len(given) > 18:
        raise Http404("no such database: choose one on the server page")
    return get_object_or_404(server.databases, protected=True, pk=int(given))


def critical_forms(server, with_errors=None):
    """A form per database the server backs up (the DSN's one at least), one maybe with errors."""
    databases = list(server.databases.filter(protected=True)) or [Database.of_dsn(server)]
    return [
        with_errors if with_errors is not None and with_errors.database.pk == db.pk else CriticalTablesForm(db)
        for db in databases
    ]


@login_not_required  # Prometheus has no session: the bearer token is the login (DESIGN.md, who may do what)
def metrics(request):
    token = settings.METRICS_TOKEN
    if not token:
        raise Http404("metrics are off: set METRICS_TOKEN")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = HttpResponse("Send Authorization: Bearer <METRICS_TOKEN>.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="backupportal metrics"'
        return response
    registry = CollectorRegistry()
    registry.register(CatalogCollector())
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
