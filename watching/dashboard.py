"""The dashboard's figures: each server's backups, RPO, RTO and alerts, each with a colour.

servers() fetches what server_health() reads for every server in the same few queries, whatever
their number; the dashboard, the server page and /metrics read it. waiting_for() is the
dashboard's first panel: what the logged-in user is to act on.
"""

from datetime import timedelta

from django.conf import settings
from django.db.models import OuterRef, Prefetch, Q, Subquery
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone

from backupportal.roles import role_may
from backups.models import BackupCopy, BackupRun, ChangeRequest, PortalBackup, Server, StorageLocation
from restores.models import RestoreRequest, RestoreTest
from watching.models import Alert, MaintenanceTask

# The monitor measures every minute; a measurement older than this means it stopped.
RPO_STALE_AFTER = timedelta(minutes=5)
# The panel lists this many open alerts; the alerts page has the rest.
WAITING_ALERTS_SHOWN = 10


def waiting_for(user):
    """What waits for this user, each item with the page where it is handled.

    Restore requests and change requests (destructive changes) another DBA or Sysadmin must
    approve (the requester sees his own as waiting), open alerts to acknowledge, overdue
    maintenance: each only to a role that may act on it.
    """
    pending = list(
        RestoreRequest.objects.pending()
        .select_related("server", "into_server", "requested_by")
        .order_by("requested_at")
    )
    changes = list(ChangeRequest.objects.pending().select_related("requested_by").order_by("requested_at"))
    may_acknowledge = role_may(user, "watching.acknowledge_alert")
    alerts = Alert.objects.in_state("open").select_related("server", "location").order_by("opened_at", "pk")
    return {
        "to_decide": [r for r in pending if r.awaits_decision_by(user)],
        "own_requests": [r for r in pending if r.requested_by_id == user.pk],
        "changes_to_decide": [c for c in changes if c.awaits_decision_by(user)],
        "own_changes": [c for c in changes if c.requested_by_id == user.pk],
        "to_acknowledge": list(alerts[:WAITING_ALERTS_SHOWN]) if may_acknowledge else [],
        "overdue": list(MaintenanceTask.objects.overdue()) if role_may(user, "watching.complete_maintenance") else [],
    }


def servers(queryset=None):
    """Servers with what server_health() reads, in the same few queries whatever their number."""
    passed = RestoreTest.objects.filter(server=OuterRef("pk"), status="passed", duration_s__isnull=False)
    # The server's RTO: its slowest restore test passed in the last five weeks (a small database's
    # test passed after a big one's is not the time the big one takes), else its newest passed.
    recent = passed.filter(finished_at__gte=timezone.now() - RESTORE_TEST_MAX_AGE).order_by("-duration_s")
    newest = passed.order_by("-started_at")
    runs = BackupRun.objects.order_by()
    return (
        (Server.objects.all() if queryset is None else queryset)
        .select_related("rpo_status")
        .annotate(
            last_rto_s=Coalesce(Subquery(recent.values("duration_s")[:1]), Subquery(newest.values("duration_s")[:1])),
            last_rto_test=Coalesce(Subquery(recent.values("pk")[:1]), Subquery(newest.values("pk")[:1])),
            last_rto_at=Subquery(newest.values("finished_at")[:1]),
        )
        .prefetch_related(
            Prefetch(
                "runs",
                queryset=runs.good()
                .newest_per_kind()
                .prefetch_related(Prefetch("copies", queryset=BackupCopy.objects.select_related("location"))),
                to_attr="newest_good_runs",
            ),
            Prefetch("runs", queryset=runs.finished().newest_per_kind(), to_attr="newest_finished_runs"),
            Prefetch("runs", queryset=runs.active().order_by("created_at"), to_attr="active_runs"),
            Prefetch(
                "alerts",
                queryset=Alert.objects.active().order_by("-opened_at"),
                to_attr="active_alerts",
            ),
        )
    )


def server_health(server):
    """What the dashboard shows for this server, each figure with a colour.

    Reads what servers() fetched for every server at once; a plain instance fetches it for itself.
    """
    if not hasattr(server, "newest_good_runs"):
        server = servers().get(pk=server.pk)
    now = timezone.now()
    newest = {run.kind: run for run in server.newest_good_runs}
    alerts = server.active_alerts
    unacknowledged = [a for a in alerts if a.state == Alert.State.OPEN]
    return {
        "server": server,
        "backups": [
            backup_health(kind, newest.get(kind), now) for kind in (BackupRun.Kind.LOGICAL, BackupRun.Kind.BASE)
        ],
        "running": server.active_runs,
        "failed": [run for run in server.newest_finished_runs if run.status == BackupRun.Status.FAILED],
        "rpo": rpo_health(server, now),
        "rto": rto_health(server),
        "alerts": alerts,
        # Counted as the alerts page counts them: "open" is not yet acknowledged.
        "open_alerts": len(unacknowledged),
        "acknowledged_alerts": len(alerts) - len(unacknowledged),
        "alerts_colour": "red" if unacknowledged else "amber" if alerts else "green",
    }


def rpo_health(server, now):
    """Achieved RPO (measured by the monitor, see RpoStatus) against the objective."""
    objective = server.rpo_minutes * 60
    figure = {"seconds": None, "objective_s": objective, "colour": "grey", "note": "", "status": None}
    if server.archiving == Server.Archiving.NONE:
        return figure | {"note": "no WAL archiving: the newest backup is the recovery point"}
    status = getattr(server, "rpo_status", None)
    if status is None:
        return figure | {"note": "not measured yet: is the monitor running?"}
    figure |= {"status": status, "seconds": status.seconds}
    if status.seconds is None:
        return figure | {"colour": "amber", "note": f"could not measure: {status.error}"}
    if now - status.measured_at > RPO_STALE_AFTER:
        return figure | {"colour": "amber", "note": "measurement is old: is the monitor running?"}
    return figure | {"colour": colour_against(status.seconds, objective)}


FAILING = (BackupCopy.Status.FAILED, BackupCopy.Status.BAD)
# The strategy tests restores weekly and monthly: five weeks without a passed test is a gap
# (coverage), and the RTO it measured too old to vouch for today (the tile turns amber).
RESTORE_TEST_MAX_AGE = timedelta(days=35)


def rto_health(server, now=None):
    """The measured RTO (the slowest restore test passed in the last five weeks) against the
    critical objective: amber once the newest passed test is older than RESTORE_TEST_MAX_AGE,
    however fast it was (a restore measured months ago says little about one today); red while a
    restore test fails (its alert, open until each kind and database passes again)."""
    objective = server.rto_critical_minutes * 60
    seconds, at = getattr(server, "last_rto_s", None), getattr(server, "last_rto_at", None)
    colour = colour_against(seconds, objective)
    stale = at is not None and at < (now or timezone.now()) - RESTORE_TEST_MAX_AGE
    if stale and colour == "green":
        colour = "amber"
    test = getattr(server, "last_rto_test", None)
    figure = {"seconds": seconds, "objective_s": objective, "at": at, "colour": colour, "stale": stale}
    figure |= {"test_url": reverse("restore-test", args=[test]) if test else "", "test_id": test, "failed": None}
    failing = [a for a in server.active_alerts if a.condition == Alert.Condition.RESTORE_TEST_FAILED]
    if failing:
        # The RTO measured before says nothing while a test says a backup does not restore.
        figure |= {"colour": "red", "failed": {"url": failing[0].get_absolute_url(), "message": failing[0].message}}
    return figure


def colour_against(value, objective):
    """Green within 80% of an objective, amber up to it, red past it; grey when never measured."""
    if value is None:
        return "grey"
    if value > objective:
        return "red"
    return "amber" if value > 0.8 * objective else "green"


def backup_health(kind, run, now):
    """A daily job: green within a day (and a bit), amber within two, red after; amber too while a
    copy of it failed or went bad (an offsite copy that did not upload: the upload alert is the
    location's, not the server's, and the card said nothing)."""
    age = (now - run.finished_at) if run else None
    if age is None:
        colour = "red" if kind == BackupRun.Kind.LOGICAL else "grey"
    else:
        colour = "green" if age < timedelta(hours=26) else "amber" if age < timedelta(hours=50) else "red"
    failing = [c.location.name for c in run.copies.all() if c.status in FAILING] if run else []
    if failing and colour == "green":
        colour = "amber"
    label = BackupRun.Kind(kind).label
    return {"kind": kind, "label": label, "run": run, "age": age, "colour": colour, "failing": failing}


def storage_legend():
    """What each dot of the storage table means, in the thresholds StorageLocation.health() uses."""
    red, amber = StorageLocation.LOW_FREE, StorageLocation.WARN_FREE
    return [
        ("green", f"{amber:.0%} free or more"),
        ("amber", f"under {amber:.0%} free"),
        ("red", f"under {red:.0%} free (the minimum the strategy sets), or free space unreadable"),
        ("grey", "not measured: no capacity known"),
    ]


def portal_backup(now=None):
    """The portal's own database as the dashboard shows it: its newest good selfbackup, a newer
    failed one, and a colour (red past SELFBACKUP_MAX_AGE_HOURS or never, as the monitor holds it)."""
    now = now or timezone.now()
    # One query while the newest attempt succeeded (the usual day); a second only after a failure.
    shown = Q(status=PortalBackup.Status.FAILED) | Q(deleted_at=None)
    newest = PortalBackup.objects.filter(shown).order_by("-finished_at", "-pk").first()
    failed = None
    if newest is not None and newest.status == PortalBackup.Status.FAILED:
        failed, newest = newest, PortalBackup.objects.newest_good()
    elif newest is not None and not newest.good_copies:
        newest = PortalBackup.objects.newest_good()  # every copy read back bad: alerted as corruption
    fresh = newest is not None and newest.age(now) <= timedelta(hours=settings.SELFBACKUP_MAX_AGE_HOURS)
    return {
        "newest": newest,
        "failed": failed,
        "colour": "green" if fresh and not failed else "amber" if fresh else "red",
        "max_age_hours": settings.SELFBACKUP_MAX_AGE_HOURS,
    }
