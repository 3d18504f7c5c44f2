"""Backup runs: a logical, base or incremental backup of a server, from queued to succeeded or failed."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import models
from django.db.models import F, OuterRef, Subquery, Window
from django.db.models.functions import RowNumber
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format

from backups.models.databases import Database
from backups.models.servers import Server


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

    def globals_in_use(self):
        """Ids of runs whose globals file another kept run pairs with (backups.logical): retention
        keeps them, whole, while such a run is kept."""
        named = self.good().filter(details__globals__has_key="run")
        return set(named.values_list("details__globals__run", flat=True))

    def newest_per_target(self):
        """Of these runs, the newest of each server, kind and database: what the monitor holds
        each database's logical backups (and the cluster's physical ones) to."""
        newest_first = [F("finished_at").desc(nulls_last=True), F("pk").desc()]
        rank = Window(RowNumber(), partition_by=[F("server_id"), F("kind"), F("database_id")], order_by=newest_first)
        return self.annotate(rank=rank).filter(rank=1)

    def chains(self, fulls=5, incrementals=100):
        """Of one server's runs, the newest `fulls` good full base backups, newest first, each a
        Chain with the good incrementals on top of it, oldest first (at most the newest
        `incrementals` of them: WAL-chain checks are never deleted, and a chain grows while no
        full is taken). Two queries (three when a parent is not shown), whatever the number of runs."""
        bases = list(self.good().filter(kind=BackupRun.Kind.BASE).order_by("-finished_at", "-pk")[:fulls])
        if not bases:
            return []
        chains = {b.pk: Chain(b) for b in bases}
        later = self.good().filter(kind=BackupRun.Kind.INCREMENTAL, finished_at__gte=bases[-1].finished_at)
        for run in reversed(later.order_by("-finished_at", "-pk")[:incrementals]):
            chain = _chain_of(run, chains, bases)
            if chain is None:
                chains.setdefault(None, Chain(None)).incrementals.append(run)
            else:
                chain.incrementals.append(run)
                chains[run.pk] = chain
        broken = chains.pop(None, None)
        return [chains[b.pk] for b in bases] + ([broken.with_missing_parents()] if broken else [])

    def newest_per_kind(self):
        """Of these runs, the newest to finish of each server and kind, for all servers, in one query.

        The ids come from an index lookup per server and kind (run_server_kind_finished), united
        and looked up by primary key. A window over every run, as before, grew with the catalog,
        and so did the dashboard that reads this."""
        servers = Server.objects.order_by()
        per_kind = [
            servers.annotate(
                newest=Subquery(
                    self.filter(server=OuterRef("pk"), kind=kind)
                    .exclude(finished_at=None)
                    .order_by("-finished_at", "-pk")
                    .values("pk")[:1]
                )
            ).values("newest")
            for kind in BackupRun.Kind.values
        ]
        return self.filter(pk__in=per_kind[0].union(*per_kind[1:], all=True))


def _chain_of(run, chains, bases):
    """The chain a kept incremental belongs to: a block-level one its parent's (None when that is
    not among those listed), a WAL-chain check that of the newest full finished before it."""
    if run.method == "block":
        return chains.get(run.parent_run_id)
    return next((chains[b.pk] for b in bases if b.finished_at <= run.finished_at), None)


@dataclass
class Chain:
    """A full base backup and the incrementals taken on top of it, oldest first: what a restore to
    the newest link reads. `full` is None for incrementals whose parent is not shown: older than
    what the page lists, or gone (`missing_parents`: a broken link, nothing restores past it)."""

    full: "BackupRun | None"
    incrementals: list = field(default_factory=list)
    missing_parents: set = field(default_factory=set)

    @property
    def block_size(self):
        """Bytes a restore to the newest block-level link reads (the full and every block incremental)."""
        blocks = [r.size or 0 for r in self.incrementals if r.method == "block"]
        return (self.full.size or 0) + sum(blocks) if self.full and blocks else None

    def with_missing_parents(self):
        """Which parents of these incrementals are gone (deleted, failed), not merely older: one query."""
        ids = {r.parent_run_id for r in self.incrementals if r.parent_run_id}
        self.missing_parents = ids - set(BackupRun.objects.good().filter(pk__in=ids).values_list("pk", flat=True))
        return self


class BackupRun(models.Model):
    class Kind(models.TextChoices):
        LOGICAL = "logical", "Logical (pg_dump)"
        BASE = "base", "Base (pg_basebackup)"
        # Block-level on 17+, a WAL-chain check on 15 and 16: the run's method says which.
        INCREMENTAL = "incremental", "Incremental"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Manual"
        SCHEDULED = "scheduled", "Scheduled"

    server = models.ForeignKey(Server, on_delete=models.PROTECT, related_name="runs")
    # Logical runs: the database dumped (one run per database). Physical runs: the whole cluster.
    database = models.ForeignKey(
        "backups.Database", on_delete=models.PROTECT, null=True, blank=True, related_name="runs"
    )
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
            # Used by newest_per_kind() whatever the statuses asked for (the dashboard's newest finished).
            models.Index(fields=["server", "kind", "-finished_at"], name="run_server_kind_finished"),
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

    def save(self, *args, **kwargs):
        # Every logical run is of a database: the DSN's unless the caller named one.
        if self.kind == self.Kind.LOGICAL and self.database_id is None and self.server_id is not None:
            self.database = Database.of_dsn(self.server)
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("run", args=[self.pk])

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        if self.started_at:
            return timezone.now() - self.started_at
        return None

    def globals_run(self):
        """The run whose globals file this one pairs with: itself, or the run that dumped the
        cluster's globals that day (BackupRun.DoesNotExist if that row is gone)."""
        owner_id = self.details.get("globals", {}).get("run")
        return BackupRun.objects.get(pk=owner_id) if owner_id else self

    @property
    def database_name(self):
        """What a logical run dumped: its database (the DSN's for a run from before databases)."""
        return self.database.name if self.database_id else self.server.dbname

    @property
    def method(self):
        """How an incremental was taken: "block" (17+, against its parent) or "wal-chain" (15, 16,
        and runs from before the method was recorded, when only 15 was run); "" for other kinds."""
        if self.kind != self.Kind.INCREMENTAL:
            return ""
        return "block" if self.details.get("method") == "block" else "wal-chain"

    @property
    def parent_run_id(self):
        """The run a block-level incremental was taken against (its details' "parent")."""
        return self.details.get("parent") if self.method == "block" else None

    @property
    def method_display(self):
        """An incremental's method as lists say it: "block-level against #12" or "WAL-chain check"."""
        if self.method == "block":
            return f"block-level against #{self.parent_run_id}" if self.parent_run_id else "block-level"
        return "WAL-chain check" if self.method else ""

    @property
    def is_good(self):
        return self.status == self.Status.SUCCEEDED and self.deleted_at is None

    @property
    def base_compression(self):
        """How a base backup's tar is compressed under gpg, as its run recorded it: "zstd"
        (`gpg --decrypt | zstd -d`), or "gpg" for runs from before zstd, whose tar gpg
        compressed itself (`gpg --decrypt` alone). Never guessed from the bytes."""
        return self.details.get("compression", "gpg")

    @property
    def stop_time(self):
        """When a base backup became consistent (pg_basebackup's end): what PITR and retention
        compare a target with. Runs from before it was recorded: their finish."""
        stamp = self.details.get("stop_time")
        return datetime.fromisoformat(stamp) if stamp else self.finished_at
