"""The backup catalog: protected servers, storage locations, backup runs, copies, WAL."""

import os
import re
import time
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format

from backupportal.lib.cron import cron_problem, in_words, next_runs
from backups import binaries
from backups.connection import ServerConnection
from backups.tables import validate_table_list

name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_.-]{0,62}$",
    "Use lower-case letters, digits, '.', '_' or '-' (at most 63 characters).",
)


def default_critical_tables():
    # None: every table is counted and compared anyway; the DBAs name the ones that must
    # also never be empty or shrink (the strategy's were users, roles, audit_logs and
    # financial_records, which other databases do not have).
    return []


class Server(ServerConnection):
    """A PostgreSQL database that the portal protects."""

    class Archiving(models.TextChoices):
        NONE = "none", "None"
        PUSH = "push", "Push (archive_command)"
        PULL = "pull", "Pull (pg_receivewal)"

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    # dsn and the sealed password: backups/connection.py.
    # Chosen among PG_BIN_DIRS, never typed: whoever names the directory runs code as the worker.
    pg_bin = models.CharField(
        "PostgreSQL bin directory",
        max_length=300,
        blank=True,
        validators=[binaries.validate_bin_dir],
        help_text="One of PG_BIN_DIRS; empty: that of the server's major version, else the newest at least as new.",
    )
    pg_version = models.IntegerField(
        null=True, editable=False, help_text="server_version_num at registration", verbose_name="PostgreSQL version"
    )
    archiving = models.CharField(max_length=4, choices=Archiving.choices, default=Archiving.NONE)
    # Read from the server (initdb --wal-segsize), never assumed: segment names and numbers depend on it.
    wal_segment_size = models.IntegerField(
        null=True, blank=True, editable=False, help_text="bytes", verbose_name="WAL segment size (bytes)"
    )
    enabled = models.BooleanField(default=True)

    rpo_minutes = models.PositiveIntegerField("RPO objective (minutes)", default=15)
    rto_critical_minutes = models.PositiveIntegerField("RTO objective, critical functions (minutes)", default=240)
    rto_full_minutes = models.PositiveIntegerField("RTO objective, full system (minutes)", default=480)

    logical_retention_days = models.PositiveIntegerField(default=30)
    base_retention_days = models.PositiveIntegerField(default=30)
    wal_retention_days = models.PositiveIntegerField(default=7, verbose_name="WAL retention (days)")

    critical_tables = models.JSONField(
        default=default_critical_tables,
        blank=True,
        validators=[validate_table_list],
        help_text=(
            'Tables that must never be empty or shrink past the threshold, as a list: ["public.users", '
            '"sales.orders"]. Empty: none (every table\'s row count is compared by restore tests anyway).'
        ),
    )
    shrink_threshold_pct = models.PositiveIntegerField(
        verbose_name="shrink threshold (%)",
        default=20,
        help_text="A restore test fails when a critical table shrank more than this against the previous backup.",
    )
    sandbox = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Where restore tests restore; empty: this server, as the strategy does.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]
        permissions = [("change_critical_tables", "Can choose a server's critical tables")]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("server", args=[self.name])

    def clean(self):
        self.clean_dsn()

    @property
    def version_display(self):
        if not self.pg_version:
            return "unknown"
        return f"{self.pg_version // 10000}.{self.pg_version % 10000}"

    def bin_dir(self) -> Path:
        """The directory of this server's client tools (backups.binaries chooses it)."""
        return binaries.client_dir(self)

    def ensure_schedules(self):
        """The default schedules of the strategy, created once (DBAs edit them afterwards), and
        django-q2's rows in step with them. Runs after every save of a server (backups.schedules)."""
        from backups.schedules import ensure_for  # it imports this module

        ensure_for(self)

    @property
    def replication_slot(self):
        """The slot pg_receivewal streams from: the server keeps WAL while the receiver is down."""
        return ("backupportal_" + re.sub(r"[^a-z0-9_]", "_", self.name))[:63]

    def latest_good_backup(self, kind):
        return self.runs.good().filter(kind=kind).order_by("-finished_at").first()


class BackupSchedule(models.Model):
    """When a job runs for a server: cron fields in the portal's TIME_ZONE (Indian/Maldives).

    DBAs edit these; a django-q2 Schedule row (superusers only) is kept in step by name.
    """

    class Job(models.TextChoices):
        LOGICAL = "logical", "Logical backup"
        BASE = "base", "Base backup"
        INCREMENTAL = "incremental", "WAL switch and chain check"
        RESTORE_TEST = "restoretest", "Weekly restore test"
        MONTHLY_RESTORE_TEST = "restoretest_monthly", "Monthly full restore test"
        INGEST_WAL = "ingestwal", "WAL spool ingest"

    DEFAULT_CRON = {
        Job.LOGICAL: "0 2 * * *",
        Job.BASE: "30 2 * * *",
        Job.INCREMENTAL: "0 8,14,20 * * *",
        Job.RESTORE_TEST: "0 5 * * 3",
        Job.MONTHLY_RESTORE_TEST: "0 3 * * 0#1",
        Job.INGEST_WAL: "* * * * *",
    }

    # The jobs every new server gets. Each is added here when its job exists.
    DEFAULT_JOBS = [Job.LOGICAL, Job.RESTORE_TEST, Job.MONTHLY_RESTORE_TEST]
    # And those of a server that archives WAL (push or pull).
    ARCHIVING_JOBS = [Job.BASE, Job.INCREMENTAL, Job.INGEST_WAL]

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="schedules")
    job = models.CharField(max_length=20, choices=Job.choices)
    cron = models.CharField(
        max_length=100,
        help_text="minute hour day-of-month month day-of-week",
        verbose_name="cron (minute hour day month weekday)",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["server", "job"], name="one_schedule_per_server_job")]
        ordering = ["server__name", "job"]

    def __str__(self):
        return f"{self.server} {self.get_job_display()} ({self.cron})"

    def clean(self):
        # As django-q2 will run it: five fields in range, firing within four years.
        problem = cron_problem(self.cron)
        if problem:
            raise ValidationError({"cron": problem})

    def in_words(self):
        return in_words(self.cron) if not cron_problem(self.cron) else self.cron

    def next_runs(self):
        """When it fires next, for the server page: a DBA checks a cron by its times."""
        return next_runs(self.cron) if self.enabled and not cron_problem(self.cron) else []

    @property
    def q_name(self):
        """The django-q2 Schedule's name: unique, so creating it is idempotent."""
        return f"{self.job}:{self.server.name}"


class StorageLocation(models.Model):
    """Where artifacts are kept: the primary directory, a NAS mirror, S3-compatible storage."""

    class Kind(models.TextChoices):
        PRIMARY = "primary", "Primary (local)"
        NAS = "nas", "NAS mirror"
        S3 = "s3", "S3-compatible offsite"

    # Restores read the first healthy copy in this order.
    READ_ORDER = {Kind.PRIMARY: 0, Kind.NAS: 1, Kind.S3: 2}
    # The strategy's alert condition: less than 20% free.
    LOW_FREE = 0.20
    # The dashboard's amber, on the way there. A constant of its own: 1.5 * 0.20 is a hair over
    # 0.30 in floating point, which made exactly 30% free amber.
    WARN_FREE = 0.30

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    kind = models.CharField(max_length=7, choices=Kind.choices)
    path = models.CharField(
        max_length=500,
        blank=True,
        help_text="Filesystem locations: a directory under BACKUP_ROOT, WAL_ROOT or NAS_ROOT.",
    )
    bucket = models.CharField(max_length=255, blank=True)
    prefix = models.CharField(max_length=255, blank=True)
    endpoint_url = models.CharField(max_length=255, blank=True, verbose_name="endpoint URL")
    region = models.CharField(max_length=64, blank=True)
    sse = models.CharField("server-side encryption", max_length=32, blank=True)
    storage_class = models.CharField(max_length=32, blank=True)
    capacity_bytes = models.BigIntegerField(
        verbose_name="capacity (bytes)",
        null=True,
        blank=True,
        help_text="The space the portal may use here; counted against the 20% free rule.",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def clean(self):
        if self.kind == self.Kind.S3:
            if not self.bucket:
                raise ValidationError({"bucket": "An S3 location needs a bucket name."})
            from backups.s3 import check_options

            check_options(self)
            return
        if not self.path:
            raise ValidationError({"path": "A filesystem location needs a directory path."})
        check_storage_path(self.path)

    @property
    def read_order(self):
        return self.READ_ORDER[self.kind]

    def usage(self):
        """(free bytes, total bytes), or None where it cannot be told (S3 without a configured capacity)."""
        from backups.storage import store_for

        return store_for(self).usage()

    def health(self):
        """Free space for the dashboard: red under the strategy's 20%, amber under 30%."""
        figure = {"location": self, "free": None, "total": None, "ratio": None, "colour": "grey", "error": ""}
        try:
            usage = self.usage()
        except OSError as e:
            return figure | {"colour": "red", "error": f"cannot read its free space: {e}"}
        if not usage or not usage[1]:
            return figure
        free, total = usage
        ratio = free / total
        colour = "red" if ratio < self.LOW_FREE else "amber" if ratio < self.WARN_FREE else "green"
        return figure | {"free": free, "total": total, "ratio": ratio, "colour": colour}

    @classmethod
    def sync_from_settings(cls):
        """Create or update the locations that BACKUP_ROOT, NAS_ROOT and S3_BUCKET describe."""
        cls.objects.update_or_create(
            name="primary", defaults={"kind": cls.Kind.PRIMARY, "path": str(settings.BACKUP_ROOT)}
        )
        # The WAL archive's own primary location (the strategy's separate partition).
        cls.objects.update_or_create(
            name=WAL_LOCATION, defaults={"kind": cls.Kind.PRIMARY, "path": str(settings.WAL_ROOT)}
        )
        if settings.NAS_ROOT:
            cls.objects.update_or_create(name="nas", defaults={"kind": cls.Kind.NAS, "path": settings.NAS_ROOT})
        if settings.S3_BUCKET:
            cls.objects.update_or_create(
                name="s3",
                defaults={
                    "kind": cls.Kind.S3,
                    "bucket": settings.S3_BUCKET,
                    "prefix": settings.S3_PREFIX,
                    "endpoint_url": settings.S3_ENDPOINT_URL,
                    "region": os.environ.get("AWS_DEFAULT_REGION", ""),
                    "sse": settings.S3_SSE,
                    "storage_class": settings.S3_STORAGE_CLASS,
                },
            )


# The name of the primary location that holds the WAL archive (WAL_ROOT).
WAL_LOCATION = "wal"


def allowed_storage_roots():
    roots = [settings.BACKUP_ROOT, settings.WAL_ROOT]
    if settings.NAS_ROOT:
        roots.append(Path(settings.NAS_ROOT))
    return [Path(r).resolve() for r in roots]


def check_storage_path(path):
    """Refuse a storage path outside the configured roots, or one that climbs with '..'."""
    if ".." in Path(path).parts:
        raise ValidationError(f"Storage path {path} contains '..': give the directory itself.")
    if not Path(path).is_absolute():
        raise ValidationError(f"Storage path {path} is relative: give an absolute directory.")
    resolved = Path(path).resolve()
    roots = allowed_storage_roots()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ValidationError(
            f"Storage path {path} is outside the allowed roots ({allowed}): set BACKUP_ROOT or NAS_ROOT."
        )


class BackupRunQuerySet(models.QuerySet):
    def good(self):
        """Complete, checksummed, catalogued, and not deleted by retention."""
        return self.filter(status=BackupRun.Status.SUCCEEDED, deleted_at=None)

    def active(self):
        return self.filter(status__in=[BackupRun.Status.QUEUED, BackupRun.Status.RUNNING])

    def finished(self):
        return self.filter(status__in=[BackupRun.Status.SUCCEEDED, BackupRun.Status.FAILED])

    def restorable_bases(self):
        """Good base backups a PITR can start from: their WAL range is known (start_wal)."""
        return self.good().filter(kind=BackupRun.Kind.BASE).exclude(start_wal="")

    def newest_per_kind(self):
        """Of these runs, the newest to finish of each server and kind: one query for all servers."""
        newest_first = [F("finished_at").desc(nulls_last=True), F("pk").desc()]
        rank = Window(RowNumber(), partition_by=[F("server_id"), F("kind")], order_by=newest_first)
        return self.annotate(rank=rank).filter(rank=1)


class BackupRun(models.Model):
    class Kind(models.TextChoices):
        LOGICAL = "logical", "Logical (pg_dump)"
        BASE = "base", "Base (pg_basebackup)"
        INCREMENTAL = "incremental", "Incremental (WAL chain)"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Manual"
        SCHEDULED = "scheduled", "Scheduled"

    server = models.ForeignKey(Server, on_delete=models.PROTECT, related_name="runs")
    kind = models.CharField(max_length=11, choices=Kind.choices)
    status = models.CharField(max_length=9, choices=Status.choices, default=Status.QUEUED)
    trigger = models.CharField(max_length=9, choices=Trigger.choices, default=Trigger.MANUAL)
    requested_by = models.CharField(max_length=150, blank=True, help_text="user, or job:<name>")

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The worker touches this while it streams; a run whose heartbeat stopped was orphaned.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    pid = models.IntegerField(null=True, blank=True, verbose_name="worker process id")

    key = models.CharField(max_length=500, blank=True, help_text="the artifact's path relative to each location")
    size = models.BigIntegerField(null=True, blank=True)
    bytes_done = models.BigIntegerField(default=0, verbose_name="bytes written")
    sha256 = models.CharField(max_length=64, blank=True, verbose_name="SHA-256")
    error = models.TextField(blank=True)
    notes = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True, help_text="row counts, tool versions, compression")

    # Physical and WAL-chain runs: where in the WAL they start and end.
    timeline = models.IntegerField(null=True, blank=True)
    start_lsn = models.CharField(max_length=32, blank=True, verbose_name="start LSN")
    end_lsn = models.CharField(max_length=32, blank=True, verbose_name="end LSN")
    start_wal = models.CharField(max_length=24, blank=True, verbose_name="first WAL segment")
    end_wal = models.CharField(max_length=24, blank=True, verbose_name="last WAL segment")

    deleted_at = models.DateTimeField(null=True, blank=True, help_text="set when retention removed the artifact")

    objects = BackupRunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Used by the dashboard, the runs list and latest_good_backup().
            models.Index(fields=["server", "kind", "status", "-finished_at"], name="run_server_kind_status"),
            models.Index(fields=["-created_at"], name="run_created"),
            # Used by the orphan sweep and the lock check.
            models.Index(fields=["status"], name="run_active", condition=models.Q(status__in=["queued", "running"])),
        ]
        permissions = [("run_backup", "Can back up now, verify and run restore tests")]

    def __str__(self):
        """What a DBA picks a backup by: what, when, how big ("#12 maldives logical, 2026-12-03 02:00, 41.2 MB")."""
        when = self.finished_at or self.created_at
        text = f"#{self.pk} {self.server} {self.kind}"
        if when:
            text += f", {date_format(timezone.localtime(when), 'DATETIME_FORMAT')}"
        if self.size:
            text += f", {filesizeformat(self.size)}"
        return text if self.status == self.Status.SUCCEEDED else f"{text} ({self.status})"

    def get_absolute_url(self):
        return reverse("run", args=[self.pk])

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        if self.started_at:
            return timezone.now() - self.started_at
        return None

    @property
    def is_good(self):
        return self.status == self.Status.SUCCEEDED and self.deleted_at is None

    @property
    def stop_time(self):
        """When a base backup became consistent (pg_basebackup's end): what PITR and retention
        compare a target with. Runs from before it was recorded: their finish."""
        stamp = self.details.get("stop_time")
        return datetime.fromisoformat(stamp) if stamp else self.finished_at


class WalSegment(models.Model):
    """One archived WAL segment (or history file) of a server."""

    server = models.ForeignKey(Server, on_delete=models.PROTECT, related_name="wal_segments")
    timeline = models.IntegerField()
    name = models.CharField(max_length=40, help_text="000000010000000000000001, or a .history / .partial file")
    # The segment's position in the WAL (whatever the timeline); empty for history, backup
    # and partial files. Gap checks and retention compare these numbers.
    segno = models.BigIntegerField(null=True, blank=True)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, verbose_name="SHA-256")
    key = models.CharField(max_length=500, blank=True)
    archived_at = models.DateTimeField(help_text="when PostgreSQL (or pg_receivewal) handed it over")
    ingested_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=4, choices=[("push", "push"), ("pull", "pull")], default="push")
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["server", "timeline", "name"]
        constraints = [models.UniqueConstraint(fields=["server", "name"], name="one_segment_per_name")]
        verbose_name = "WAL segment"
        indexes = [
            # Used by the WAL list filtered by server and day, and by retention.
            models.Index(fields=["server", "archived_at"], name="wal_server_archived"),
            models.Index(fields=["archived_at"], name="wal_archived"),
            # Used by the gap check, the incremental runs, restores and retention.
            models.Index(fields=["server", "segno"], name="wal_server_segno"),
            # Used by the WAL catalog's search by segment name, whatever the server.
            models.Index(fields=["name"], name="wal_name"),
        ]

    def __str__(self):
        return f"{self.server} {self.name}"


class BackupCopy(models.Model):
    """One file of a run (or one WAL segment) in one storage location, with its own sha256."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        COPYING = "copying", "Copying"
        OK = "ok", "OK"
        FAILED = "failed", "Failed"
        BAD = "bad", "Bad (checksum or missing)"
        DELETED = "deleted", "Deleted"

    run = models.ForeignKey(BackupRun, null=True, blank=True, on_delete=models.CASCADE, related_name="copies")
    wal_segment = models.ForeignKey(
        WalSegment, null=True, blank=True, on_delete=models.CASCADE, related_name="copies", verbose_name="WAL segment"
    )
    location = models.ForeignKey(StorageLocation, on_delete=models.PROTECT, related_name="copies")
    artifact = models.CharField(max_length=16, default="main", help_text="main, globals, manifest or wal")
    key = models.CharField(max_length=500, help_text="path relative to the location, or the object key")
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, verbose_name="SHA-256")
    status = models.CharField(max_length=7, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    copied_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "backup copies"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["run", "location", "artifact"], name="one_copy_per_run_location_artifact"),
            models.UniqueConstraint(fields=["wal_segment", "location"], name="one_copy_per_segment_location"),
            models.CheckConstraint(
                condition=models.Q(run__isnull=False) | models.Q(wal_segment__isnull=False), name="copy_of_something"
            ),
        ]
        indexes = [
            # Used by the copy worker: what is left to copy or retry.
            models.Index(
                fields=["next_attempt_at"], name="copy_todo", condition=models.Q(status__in=["pending", "failed"])
            ),
            models.Index(fields=["location", "status"], name="copy_location_status"),
            # Used by the copies catalog filtered by status (the bad ones, wherever they are).
            models.Index(fields=["status"], name="copy_status"),
        ]

    def __str__(self):
        return f"{self.location}:{self.key} ({self.status})"

    @classmethod
    def record_made(cls, location, key, size, sha256, **of):
        """The copy a run or an ingest just wrote and hashed (of: run=, or wal_segment=; artifact=)."""
        return cls.objects.create(
            location=location,
            key=key,
            size=size,
            sha256=sha256,
            status=cls.Status.OK,
            copied_at=timezone.now(),
            attempts=1,
            **of,
        )


class VerificationQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=[Verification.Status.QUEUED, Verification.Status.RUNNING])


class Verification(models.Model):
    """One re-read of copies, followed live by its page: one run's (a DBA's click) or every copy's
    (the weekly check). verify.py does the reading; this row is what the page and the catalog see."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        VERIFIED = "verified", "Verified"  # every copy read back and its sha256 matched
        FAILED = "failed", "Failed"  # a copy bad or unreachable, or the check itself stopped

    # A running verification touches heartbeat_at at least this often while bytes flow...
    PROGRESS_EVERY = 1.0
    # ...so one silent for this long was left by a dead worker.
    STALE_AFTER = timedelta(minutes=5)

    run = models.ForeignKey(
        BackupRun,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="verifications",
        help_text="empty: every copy",
    )
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    requested_by = models.CharField(max_length=150, blank=True, help_text="user, os:<user>, or job:<name>")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    copies_total = models.PositiveIntegerField(default=0)
    copies_checked = models.PositiveIntegerField(default=0)
    copies_bad = models.PositiveIntegerField(default=0)
    copies_unreachable = models.PositiveIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0, verbose_name="bytes to check")
    bytes_checked = models.BigIntegerField(default=0, verbose_name="bytes checked")
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True, help_text="what verify returned: the copies listed")

    objects = VerificationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Used by the run page (its newest verifications) and by enqueue's one-at-a-time check.
            models.Index(fields=["run", "-created_at"], name="verification_run_created"),
        ]

    def __str__(self):
        what = f"run #{self.run_id}" if self.run_id else "every copy"
        return f"verification #{self.pk} of {what} ({self.status})"

    def get_absolute_url(self):
        return reverse("verification", args=[self.pk])

    @property
    def is_done(self):
        return self.status in (self.Status.VERIFIED, self.Status.FAILED)

    @property
    def duration(self) -> timedelta | None:
        if self.started_at:
            return (self.finished_at or timezone.now()) - self.started_at
        return None

    def fail_if_stale(self, now=None):
        """A verification whose worker died is failed, so it holds up no new one. True if it was."""
        now = now or timezone.now()
        beat = self.heartbeat_at or self.started_at or self.created_at
        if self.status != self.Status.RUNNING or now - beat <= self.STALE_AFTER:
            return False
        self.finish_failed(f"interrupted: no progress since {timezone.localtime(beat):%Y-%m-%d %H:%M:%S}")
        return True

    def execute(self):
        """Read every copy now (on a worker, or in the foreground) and return verify's result."""
        from backups.verify import verify_all, verify_run

        self.status, self.started_at = self.Status.RUNNING, timezone.now()
        self._save_progress(force=True, extra=["status", "started_at"])
        actor = self.requested_by or "job:verify"
        try:
            result = verify_run(self.run, actor, progress=self) if self.run_id else verify_all(actor, progress=self)
        except Exception as e:
            self.finish_failed(f"the verification stopped: {e}")
            raise
        self.finish(result)
        return result | {"verification": self.pk}

    # The progress hooks verify.py calls while it reads.
    def begin(self, copies):
        totals = copies.aggregate(n=models.Count("pk"), size=models.Sum("size"))
        self.copies_total, self.bytes_total = totals["n"], totals["size"] or 0
        self._save_progress(force=True, extra=["copies_total", "bytes_total"])

    def read(self, nbytes):
        self.bytes_checked += nbytes
        self._save_progress()

    def checked(self, verdict):
        self.copies_checked += 1
        self.copies_bad += verdict == "bad"
        self.copies_unreachable += verdict == "unreachable"
        self._save_progress()

    def finish(self, result):
        clean = result["checked"] > 0 and result["checked"] == result["ok"]
        self.status = self.Status.VERIFIED if clean else self.Status.FAILED
        if not result["checked"]:
            self.error = "no copy was in a state to check (each is pending, failed or deleted)"
        elif not clean:
            self.error = f"{result['bad']} bad and {result['unreachable']} unreachable of {result['checked']} copies"
        self.result = {"copies": result["copies"], "duration_s": result["duration_s"]}
        self.finished_at = timezone.now()
        self._save_progress(force=True, extra=["status", "error", "result", "finished_at"])

    def finish_failed(self, message):
        self.status, self.error, self.finished_at = self.Status.FAILED, message, timezone.now()
        self.save(update_fields=["status", "error", "finished_at"])

    def _save_progress(self, force=False, extra=()):
        """Counters to the catalog at most once a second: the page polls them, the reading must not wait."""
        now = time.monotonic()
        if not force and now - getattr(self, "_saved_at", 0) < self.PROGRESS_EVERY:
            return
        self._saved_at = now
        self.heartbeat_at = timezone.now()
        fields = ["heartbeat_at", "bytes_checked", "copies_checked", "copies_bad", "copies_unreachable", *extra]
        self.save(update_fields=fields)

    def progress(self):
        """What the page polls."""
        duration = self.duration
        return {
            "id": self.pk,
            "status": self.status,
            "copies_checked": self.copies_checked,
            "copies_total": self.copies_total,
            "copies_bad": self.copies_bad,
            "copies_unreachable": self.copies_unreachable,
            "bytes_checked": self.bytes_checked,
            "bytes_total": self.bytes_total,
            "elapsed_s": round(duration.total_seconds(), 1) if duration else 0,
            "error": self.error,
            "done": self.is_done,
        }
