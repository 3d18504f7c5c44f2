"""Coverage: every database of every cluster, what protects it, and where it falls short.

One row per database the portal knows (backups.databases keeps them in step with each
cluster): its logical schedule, its cluster's physical protection, the tiers holding its
newest good backup, the RPO and RTO objectives against what was achieved, its newest restore
test. A row's gaps are what falls short of the server's declared policy; the dashboard counts
them, the monitor alerts on them (watching.monitor.check_coverage), and DBAs and auditors read
them on the coverage page. Computed in a fixed number of queries, whatever the number of rows.
"""

from dataclasses import dataclass, field

from django.db.models import OuterRef, Subquery
from django.utils import timezone

from backups.models import BackupCopy, BackupRun, BackupSchedule, Database, Server, StorageLocation
from restores.models import RestoreTest
from watching.dashboard import RESTORE_TEST_MAX_AGE, rpo_health

# Without WAL archiving the recovery point is the newest daily dump.
DAILY_MINUTES = 24 * 60


@dataclass
class Row:
    database: Database
    schedule: BackupSchedule | None
    newest: BackupRun | None
    tiers: list = field(default_factory=list)  # location kinds holding a good copy of `newest`
    rpo: dict = field(default_factory=dict)
    rto_s: float | None = None
    test: RestoreTest | None = None
    newest_base_at: object = None  # the cluster's newest good base backup
    gaps: list = field(default_factory=list)

    @property
    def server(self):
        return self.database.server

    @property
    def offsite(self):
        return StorageLocation.Kind.S3 in self.tiers

    @property
    def physical(self):
        """The cluster's physical protection, in words."""
        server = self.server
        if server.archiving == Server.Archiving.NONE:
            return "none (no WAL archiving)"
        base = self.newest_base_at
        return f"WAL archiving ({server.archiving}), " + (
            f"base backup {timezone.localtime(base):%Y-%m-%d %H:%M}" if base else "no good base backup"
        )


def rows(servers=None, now=None):
    """A Row for every database of `servers` (default: all), chosen ones first, gaps found."""
    now = now or timezone.now()
    databases = list(_databases(servers))
    schedules = _logical_schedules(servers)
    newest_ids = [db.newest_id for db in databases if db.newest_id]
    runs = BackupRun.objects.in_bulk(newest_ids)
    tiers = {}
    for run_id, kind in (
        BackupCopy.objects.filter(run_id__in=newest_ids, artifact="main", status=BackupCopy.Status.OK)
        .values_list("run_id", "location__kind")
        .distinct()
    ):
        tiers.setdefault(run_id, set()).add(kind)
    tests = RestoreTest.objects.in_bulk([db.test_id for db in databases if db.test_id])
    result = []
    for db in databases:
        row = Row(
            database=db,
            schedule=schedules.get(db.server_id),
            newest=runs.get(db.newest_id),
            tiers=sorted(tiers.get(db.newest_id, ())),
            rpo=rpo_health(db.server, now),
            rto_s=db.rto_s,
            test=tests.get(db.test_id),
            newest_base_at=db.newest_base_at,
        )
        row.gaps = gaps_of(row, now) if db.protected else []
        result.append(row)
    return result


def _databases(servers):
    good = BackupRun.objects.good().filter(database=OuterRef("pk")).order_by("-finished_at")
    tests = RestoreTest.objects.filter(database=OuterRef("pk")).exclude(status=RestoreTest.Status.RUNNING)
    passed = tests.filter(status=RestoreTest.Status.PASSED, duration_s__isnull=False)
    base = BackupRun.objects.good().filter(server=OuterRef("server"), kind=BackupRun.Kind.BASE)
    queryset = Database.objects.all() if servers is None else Database.objects.filter(server__in=servers)
    return (
        queryset.select_related("server", "server__rpo_status")
        .annotate(
            newest_id=Subquery(good.values("pk")[:1]),
            test_id=Subquery(tests.order_by("-started_at", "-pk").values("pk")[:1]),
            rto_s=Subquery(passed.order_by("-started_at").values("duration_s")[:1]),
            newest_base_at=Subquery(base.order_by("-finished_at").values("finished_at")[:1]),
        )
        .order_by("server__name", "-protected", "name")
    )


def _logical_schedules(servers):
    """{server id: its enabled logical schedule}. One query, also when there is no database yet
    (a prefetch would skip it then: the page's query count would depend on the rows)."""
    schedules = BackupSchedule.objects.filter(job=BackupSchedule.Job.LOGICAL, enabled=True).order_by("pk")
    if servers is not None:
        schedules = schedules.filter(server__in=servers)
    found = {}
    for schedule in schedules:
        found.setdefault(schedule.server_id, schedule)
    return found


def gaps_of(row, now):
    """What falls short of the server's declared policy, one short phrase each."""
    db, server = row.database, row.server
    if db.state == Database.State.GONE:
        return []  # dropped: its backups are kept, nothing more is owed
    if db.state == Database.State.UNREACHABLE:
        return [f"cannot be backed up: {db.problem}"]
    found = []
    if row.newest is None:
        found.append("no backup yet")
    elif not row.offsite:
        found.append("no offsite copy")
    if row.schedule is None:
        found.append("no logical schedule")
    if row.test is None or row.test.started_at < now - RESTORE_TEST_MAX_AGE:
        found.append(f"no restore test in {RESTORE_TEST_MAX_AGE.days} days")
    elif row.test.status == RestoreTest.Status.FAILED:
        found.append("its newest restore test failed")
    if row.rpo.get("colour") == "red":
        found.append("RPO objective not met")
    elif server.archiving == Server.Archiving.NONE and server.rpo_minutes < DAILY_MINUTES:
        found.append(f"an RPO of {server.rpo_minutes} min needs WAL archiving")
    if row.rto_s is not None and row.rto_s > server.rto_critical_minutes * 60:
        found.append("RTO objective not met")
    return found


def gap_count(servers=None):
    """Databases with at least one gap: the dashboard's figure."""
    return sum(1 for row in rows(servers) if row.gaps)
