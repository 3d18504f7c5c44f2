"""The protected servers (PostgreSQL clusters) and when each one's jobs run."""

import re
from pathlib import Path

import psycopg
from django.apps import apps
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

from backupportal.lib.cron import cron_problem, in_words, next_runs
from backupportal.lib.libpq import DsnError, parse
from backups import binaries
from backups.connection import ServerConnection

name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_.-]{0,62}$",
    "Use lower-case letters, digits, '.', '_' or '-' (at most 63 characters).",
)


def default_critical_tables():
    # None: every table is counted and compared anyway; the DBAs name the ones that must
    # also never be empty or shrink (the strategy's were users, roles, audit_logs and
    # financial_records, which other databases do not have).
    return []


ALL_DATABASES = "all"
# The first PostgreSQL with block-level incrementals (pg_basebackup --incremental, pg_combinebackup).
BLOCK_INCREMENTAL_MAJOR = 17


def parse_protect_databases(value):
    """A server's protect_databases: "" (the DSN's database only), "all", or "a,b,c". Returns
    ALL_DATABASES or a list of names (empty: the DSN's); ValidationError naming what is wrong."""
    text = (value or "").strip()
    if text.lower() == ALL_DATABASES:
        return ALL_DATABASES
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if len(name.encode()) > 63 or any(ord(c) < 32 for c in name):
            raise ValidationError(f"{name[:70]!r} is not a database name: at most 63 bytes, no control characters.")
    if ALL_DATABASES in (n.lower() for n in names):
        raise ValidationError('"all" stands alone: give all, or the names of the databases, not both.')
    if len(set(names)) != len(names):
        raise ValidationError("A database is named twice in the list: name each once.")
    return names


def validate_protect_databases(value):
    parse_protect_databases(value)


def destination_of(dsn):
    """HOST:PORT, the cluster a DSN reaches (its user, database and parameters reach the same
    one); None for a DSN that cannot be read (nothing connects with it)."""
    try:
        parts = parse(dsn)
    except DsnError:
        return None
    return f"{parts.host}:{parts.port}"


class Server(ServerConnection):
    """A PostgreSQL cluster that the portal protects: physically as a whole (base backups, WAL,
    PITR), and logically database by database (its databases, backups/models/databases.py)."""

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
    protect_databases = models.CharField(
        "databases to back up",
        max_length=2000,
        blank=True,
        validators=[validate_protect_databases],
        help_text="Empty: the DSN's database. all: every database that allows connections (templates aside), "
        "new ones picked up each day. Or names separated by commas.",
    )

    rpo_minutes = models.PositiveIntegerField("RPO objective (minutes)", default=15)
    rto_critical_minutes = models.PositiveIntegerField("RTO objective, critical functions (minutes)", default=240)
    rto_full_minutes = models.PositiveIntegerField("RTO objective, full system (minutes)", default=480)

    logical_retention_days = models.PositiveIntegerField(default=30)
    base_retention_days = models.PositiveIntegerField(default=30)
    wal_retention_days = models.PositiveIntegerField(default=7, verbose_name="WAL retention (days)")
    # The strategy's 7 days. At least one: retention keeps whole chains, so a shorter setting
    # deletes the incrementals only, never a full a kept one needs.
    incremental_retention_days = models.PositiveIntegerField(
        "incremental retention (days)",
        default=7,
        validators=[MinValueValidator(1)],
        help_text="Block-level incrementals (PostgreSQL 17+) are kept this long; their full backups stay while "
        "a kept incremental needs them.",
    )

    # GFS on top of the days above (backups/gfs.py), for each database's logical backups and the
    # cluster's base backups: 0 turns a tier off, so a new server keeps what it kept before.
    keep_weekly = models.PositiveIntegerField(
        "weekly backups kept", default=0, help_text="The newest of each of the newest N weeks with one; 0: off."
    )
    keep_monthly = models.PositiveIntegerField(
        "monthly backups kept", default=0, help_text="The newest of each of the newest N months with one; 0: off."
    )
    keep_yearly = models.PositiveIntegerField(
        "yearly backups kept", default=0, help_text="The newest of each of the newest N years with one; 0: off."
    )
    # At least one: retention never deletes a database's (or the cluster's) newest good backup.
    retention_floor = models.PositiveIntegerField(
        "backups always kept",
        default=3,
        validators=[MinValueValidator(1)],
        help_text="The newest N good backups of each database and of the cluster are kept whatever their age, "
        "so failing jobs never let retention empty the catalog.",
    )

    shrink_threshold_pct = models.PositiveIntegerField(
        verbose_name="shrink threshold (%)",
        default=20,
        help_text="A restore test fails when a critical table shrank more than this against the previous backup.",
    )
    # Read through `sandbox`, which holds it to sandbox_destination. Changed only by a change
    # request a DBA approves (backups.changes): restore tests decrypt production's backups there.
    sandbox_server = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name="sandbox",
        help_text="Where restore tests restore; empty: this server, as the strategy does. "
        "A change waits for a DBA's approval.",
    )
    sandbox_destination = models.CharField(
        max_length=300,
        blank=True,
        editable=False,
        help_text="HOST:PORT restore tests restore into, as approved (the sandbox's, or this server's own)",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]
        permissions = [("change_critical_tables", "Can choose a database's critical tables")]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        # A new server's own backups may go back where they come from; anywhere else is approved.
        if self._state.adding and not self.sandbox_destination:
            self.sandbox_destination = (self.sandbox_server or self).destination or ""
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("server", args=[self.name])

    def clean(self):
        self.clean_dsn()
        self.clean_name()

    def clean_name(self):
        """A server's files lie under its name in every location: not where another location's
        directory is inside a primary one (WAL_ROOT under BACKUP_ROOT: a server named wal)."""
        if self.pk and Server.objects.filter(pk=self.pk, name=self.name).exists():
            return  # its files are where they are: a name it has is never refused on its next edit
        locations = apps.get_model("backups", "StorageLocation").objects.filter(kind="primary")
        for location in locations:
            for prefix, other in location.nested().items():
                if self.name == prefix.split("/")[0]:
                    raise ValidationError(
                        {"name": f"{self.name!r} is where location {other.name} keeps its files: choose another name"}
                    )

    @property
    def destination(self):
        return destination_of(self.dsn)

    @property
    def sandbox(self):
        """Where restore tests restore (this server when it has no sandbox), read afresh and held
        to the destination a DBA approved: it refuses to connect anywhere else."""
        if self.pk is None:
            return None
        target = Server.objects.get(pk=self.sandbox_server_id or self.pk)
        target.approved_destination = self.sandbox_destination
        return target

    def restore_tests_from(self):
        """The servers whose restore tests restore into this one: itself without a sandbox, and
        those whose sandbox it is."""
        return Server.objects.filter(models.Q(sandbox_server=self.pk) | models.Q(pk=self.pk, sandbox_server=None))

    def connection_settings(self, dbname=None):
        approved = getattr(self, "approved_destination", None)
        if approved is not None and approved != self.destination:
            # Raised as a failed connection is, so the restore test fails saying so.
            raise psycopg.OperationalError(
                f"{self} may be reached at {approved or 'no approved destination'} only, as a DBA approved, not at "
                f"{self.destination}: its DSN changed since; ask again and have a DBA approve the new place"
            )
        return super().connection_settings(dbname)

    @property
    def version_display(self):
        if not self.pg_version:
            return "unknown"
        return f"{self.pg_version // 10000}.{self.pg_version % 10000}"

    @property
    def takes_block_incrementals(self):
        """17 and newer: the 6-hourly incremental is block-level; on 15 and 16 it checks the WAL chain."""
        return bool(self.pg_version) and self.pg_version // 10000 >= BLOCK_INCREMENTAL_MAJOR

    def bin_dir(self) -> Path:
        """The directory of this server's client tools (backups.binaries chooses it)."""
        return binaries.client_dir(self)

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
        INCREMENTAL = "incremental", "Incremental backup"
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
