"""What the portal watches: alerts, the achieved RPO and its history, the maintenance calendar.

These models were born in backupportal/ and moved here with their tables: each keeps its old
db_table, so the move changed no row (migrations 0001 here and backupportal 0008).
"""

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from backupportal import journal
from backupportal.lib.links import url_for
from backupportal.models import JournalEntry

# An alert that still owes the admins a mail (see alerts.send_pending_mail).
MAIL_PENDING = models.Q(opened_mail_sent_at=None) | models.Q(state="resolved", resolved_mail_sent_at=None)

# The alerts page's state filter, and the dashboard's counts: one definition, so the two agree.
ALERT_STATES = {
    "active": ~models.Q(state="resolved"),  # open or acknowledged: the condition still holds
    "open": models.Q(state="open"),  # nobody has said yet that they are on it
    "acknowledged": models.Q(state="acknowledged"),
    "resolved": models.Q(state="resolved"),
    "all": models.Q(),
}


class AlertQuerySet(models.QuerySet):
    def in_state(self, name):
        """The alerts one of ALERT_STATES names ("active", "open", ...)."""
        return self.filter(ALERT_STATES[name])

    def active(self):
        return self.in_state("active")

    def tally(self):
        """{"open": n, "acknowledged": n}, in one query, as the alerts page counts them."""
        return self.aggregate(
            **{name: models.Count("pk", filter=ALERT_STATES[name]) for name in ("open", "acknowledged")}
        )


class Alert(models.Model):
    """One alert condition holding for one server or location. One open alert per subject."""

    class Condition(models.TextChoices):
        BACKUP_MISSING = "backup_missing", "Daily backup missing"
        BACKUP_FAILED = "backup_failed", "Backup job failure or timeout"
        CORRUPTION = "corruption", "Backup corruption detected"
        STORAGE_LOW = "storage_low", "Insufficient storage space"
        UPLOAD_FAILED = "upload_failed", "Cloud upload failure"
        RESTORE_TEST_FAILED = "restore_test_failed", "Restore test failure"
        RPO_BREACHED = "rpo_breached", "RPO breached"
        WAL_GAP = "wal_gap", "WAL gap"
        ARCHIVE_FAILING = "archive_failing", "WAL archiving failing"
        RECEIVER_DOWN = "receiver_down", "Replication slot or pg_receivewal down"
        MAINTENANCE_OVERDUE = "maintenance_overdue", "Maintenance task overdue"
        DATABASE_UNCOVERED = "database_uncovered", "Database not backed up"
        COVERAGE_GAP = "coverage_gap", "Short of the protection policy"
        PORTAL_BACKUP_STALE = "portal_backup_stale", "The portal's own backup is missing or old"
        SERVER_UNREACHABLE = "server_unreachable", "Server does not answer"
        DATA_SHRANK = "data_shrank", "Critical table emptied or shrunk"
        SLOT_LEFT_OVER = "slot_left_over", "Replication slot left over, holding WAL"

    class State(models.TextChoices):
        OPEN = "open", "Open"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        RESOLVED = "resolved", "Resolved"

    condition = models.CharField(max_length=24, choices=Condition.choices)
    # "server:<name>", "location:<name>" or "task:<id>": a string, so that the one-open-alert
    # rule is a plain unique constraint on every database.
    subject = models.CharField(max_length=100)
    server = models.ForeignKey("backups.Server", null=True, blank=True, on_delete=models.CASCADE, related_name="alerts")
    location = models.ForeignKey(
        "backups.StorageLocation", null=True, blank=True, on_delete=models.CASCADE, related_name="alerts"
    )
    state = models.CharField(max_length=12, choices=State.choices, default=State.OPEN)
    message = models.TextField()
    opened_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    ack_note = models.TextField(blank=True)
    # Mail is tracked on the row so that an SMTP outage delays it and never loses it.
    opened_mail_sent_at = models.DateTimeField(null=True, blank=True)
    resolved_mail_sent_at = models.DateTimeField(null=True, blank=True)
    mail_attempts = models.PositiveIntegerField(default=0)
    mail_error = models.TextField(blank=True)

    objects = AlertQuerySet.as_manager()

    class Meta:
        db_table = "backupportal_alert"  # its table from before the move: no row moved
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["condition", "subject"],
                condition=~models.Q(state="resolved"),
                name="one_open_alert_per_condition_subject",
            )
        ]
        indexes = [
            models.Index(fields=["state", "-opened_at"], name="alert_state"),
            # Used by the monitor's mail pass: what still has a mail to send.
            models.Index(fields=["id"], name="alert_mail_pending", condition=MAIL_PENDING),
        ]
        permissions = [("acknowledge_alert", "Can acknowledge an alert")]

    def __str__(self):
        return f"{self.get_condition_display()} ({self.subject})"

    def get_absolute_url(self):
        return reverse("alert", args=[self.pk])

    @property
    def subject_label(self):
        """What the alert is about, as an admin reads it: a server, a location, or the subject."""
        if self.server_id:
            return self.server.name
        if self.location_id:
            return f"location {self.location.name}"
        kind, _, ref = self.subject.partition(":")
        return f"maintenance task #{ref}" if kind == "task" else self.subject

    @property
    def is_active(self):
        return self.state != self.State.RESOLVED

    def acknowledge(self, user, note):
        """A DBA or Sysadmin has seen it: it stays until its condition clears. False if not open."""
        now = timezone.now()
        updated = Alert.objects.filter(pk=self.pk, state=self.State.OPEN).update(
            state=self.State.ACKNOWLEDGED, acknowledged_by=user, acknowledged_at=now, ack_note=note
        )
        self.refresh_from_db()
        if updated:
            journal.record(
                "alert_acknowledged",
                actor=user.get_username(),
                obj=self,
                server=self.server or "",
                condition=self.condition,
                note=note,
            )
        return bool(updated)

    def pending_mails(self):
        """The mails this alert still owes the admins, in order: "opened", then "resolved"."""
        pending = []
        if self.opened_mail_sent_at is None:
            pending.append("opened")
        if self.state == self.State.RESOLVED and self.resolved_mail_sent_at is None:
            pending.append("resolved")
        return pending


class RpoStatus(models.Model):
    """The monitor's newest measurement of a server's achieved RPO: one row per server.

    Achieved RPO is the age of the oldest WAL written but not yet archived (0 when all is
    archived). PostgreSQL does not date WAL, so the monitor dates it itself: the first pass
    that sees WAL beyond the archive's end notes the write position and the time, and so does
    each later pass that sees it move (`points`); the first point past the archive's end dates
    the oldest unarchived WAL (`pending_lsn`, `pending_since`): it is at least that old. Pages and /metrics read this row and never connect
    to a production server themselves.
    """

    server = models.OneToOneField("backups.Server", on_delete=models.CASCADE, related_name="rpo_status")
    measured_at = models.DateTimeField(default=timezone.now)
    seconds = models.FloatField(null=True, blank=True, help_text="empty: could not be measured (see error)")
    error = models.TextField(blank=True)
    current_wal = models.CharField(max_length=40, blank=True, help_text="the WAL file being written")
    archived_wal = models.CharField(max_length=40, blank=True, help_text="the newest WAL file archived")
    pending_lsn = models.BigIntegerField(null=True, blank=True)
    pending_since = models.DateTimeField(null=True, blank=True)
    # [write position, first seen (ISO)] of each pass that saw the write position move while
    # WAL was unarchived, oldest first: when the archive catches up part of the way, the oldest
    # WAL still unarchived is dated by the first point past the archive's end, never "now".
    points = models.JSONField(default=list, blank=True)

    class Meta:
        db_table = "backupportal_rpostatus"  # its table from before the move: no row moved
        verbose_name = "RPO status"
        verbose_name_plural = "RPO statuses"

    def __str__(self):
        return f"{self.server} RPO {self.seconds}"


class Reachability(models.Model):
    """Since when the monitor has found a server not answering (None: it answered last time). A
    pass that fails once is a blip (a restart); one unanswered for UNREACHABLE_AFTER_MINUTES is
    an alert, where before nothing said so until the next day's backup failed."""

    server = models.OneToOneField("backups.Server", on_delete=models.CASCADE, related_name="reachability")
    unreachable_since = models.DateTimeField(null=True, blank=True)
    # The pass before: after a long gap (the server disabled, the monitor stopped) nobody was
    # looking, and a failure starts the count again rather than reading as hours of silence.
    checked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return (
            f"{self.server} unreachable since {self.unreachable_since}" if self.unreachable_since else str(self.server)
        )


class MaintenanceTaskQuerySet(models.QuerySet):
    def overdue(self, today=None):
        """Open tasks past their due day: the day itself still counts as in time."""
        return self.filter(completed_at=None, due_on__lt=today or timezone.localdate())


class MaintenanceTask(models.Model):
    """One occurrence of a recurring task of the strategy's maintenance calendar.

    watching/maintenance.py puts tasks on the calendar, raises the overdue alert and,
    when one is completed, schedules the next occurrence.
    """

    class Kind(models.TextChoices):
        WEEKLY_VERIFY = "weekly_verify", "Weekly: verify backup completion and integrity"
        MONTHLY_RESTORE_TEST = "monthly_restore_test", "Monthly: test restore procedures"
        QUARTERLY_RETENTION_REVIEW = "quarterly_retention_review", "Quarterly: review retention policies"
        ANNUAL_DR_DRILL = "annual_dr_drill", "Annually: DR drill and documentation update"
        STRATEGY_REVIEW = "strategy_review", "Review of the backup strategy document"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    due_on = models.DateField(help_text="done by the end of this day (TIME_ZONE), or it is overdue")
    completed_at = models.DateTimeField(null=True, blank=True)
    completed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The evidence: one of these, as EVIDENCE allows for the kind.
    evidence_entry = models.ForeignKey(
        JournalEntry,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="a journal entry, e.g. of a verify run",
    )
    evidence_restore_test = models.ForeignKey(
        "restores.RestoreTest", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    evidence_drill = models.ForeignKey(
        "restores.DrDrill", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    evidence_url = models.CharField(
        max_length=500, blank=True, help_text="a link to a document or ticket (https://...) or a portal page (/...)"
    )
    notes = models.TextField(blank=True)

    objects = MaintenanceTaskQuerySet.as_manager()

    class Meta:
        db_table = "backupportal_maintenancetask"  # its table from before the move: no row moved
        ordering = ["due_on", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=models.Q(completed_at=None), name="one_open_task_per_kind"
            )
        ]
        indexes = [
            # Used by check_overdue() every minute and by the calendar page.
            models.Index(fields=["due_on"], name="task_open_due", condition=models.Q(completed_at=None)),
        ]
        permissions = [("complete_maintenance", "Can complete a maintenance task")]

    def __str__(self):
        return f"{self.get_kind_display()} due {self.due_on:%Y-%m-%d}"

    def get_absolute_url(self):
        return reverse("maintenance") + f"#task-{self.pk}"

    def is_overdue(self, today=None):
        return self.completed_at is None and self.due_on < (today or timezone.localdate())

    def days_overdue(self, today=None):
        return max(0, ((today or timezone.localdate()) - self.due_on).days) if self.completed_at is None else 0

    def completed_late(self):
        return self.completed_at is not None and timezone.localdate(self.completed_at) > self.due_on

    def evidence_accepted(self):
        """What may prove this task done, in words (EVIDENCE)."""
        return " or ".join(sorted(EVIDENCE_NAMES[e] for e in EVIDENCE[self.kind]))

    def evidence_object(self):
        return self.evidence_entry or self.evidence_restore_test or self.evidence_drill

    def evidence_link(self):
        """(url, label) of the evidence, or None."""
        obj = self.evidence_object()
        if obj is not None:
            return url_for(obj), str(obj)
        if self.evidence_url:
            return self.evidence_url, self.evidence_url
        return None


# Which evidence each kind accepts: entry (a journal entry), restore_test, drill, url.
EVIDENCE = {
    MaintenanceTask.Kind.WEEKLY_VERIFY: {"entry", "restore_test"},
    MaintenanceTask.Kind.MONTHLY_RESTORE_TEST: {"restore_test"},
    MaintenanceTask.Kind.QUARTERLY_RETENTION_REVIEW: {"entry", "url"},
    MaintenanceTask.Kind.ANNUAL_DR_DRILL: {"drill"},
    MaintenanceTask.Kind.STRATEGY_REVIEW: {"url", "entry"},
}
EVIDENCE_NAMES = {"entry": "a journal entry", "restore_test": "a restore test", "drill": "a DR drill", "url": "a link"}


class RpoSample(models.Model):
    """The worst achieved RPO the monitor saw in one hour: the history behind the RPO chart.

    One row per server and hour (the monitor runs every minute), so a year is under 9,000 rows.
    """

    server = models.ForeignKey("backups.Server", on_delete=models.CASCADE, related_name="rpo_samples")
    hour = models.DateTimeField()
    worst_seconds = models.FloatField()

    class Meta:
        db_table = "backupportal_rposample"  # its table from before the move: no row moved
        constraints = [models.UniqueConstraint(fields=["server", "hour"], name="one_rpo_sample_per_hour")]

    def __str__(self):
        return f"{self.server} {self.hour:%Y-%m-%d %H}:00 {self.worst_seconds:.0f} s"

    @classmethod
    def record(cls, server, at, seconds):
        hour = at.replace(minute=0, second=0, microsecond=0)
        sample, created = cls.objects.get_or_create(server=server, hour=hour, defaults={"worst_seconds": seconds})
        if not created and seconds > sample.worst_seconds:
            cls.objects.filter(pk=sample.pk).update(worst_seconds=seconds)


class EvidencePack(models.Model):
    """An auditor's evidence pack made on the evidence page (watching/evidence_pack.py): the ZIP and
    its detached signature lie in EVIDENCE_DIR under `file_name` and `file_name`.sig."""

    period_start = models.DateField()
    period_end = models.DateField(help_text="the last day of the period, included")
    made_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    made_at = models.DateTimeField(default=timezone.now)
    file_name = models.CharField(max_length=100, unique=True)
    sha256 = models.CharField(max_length=64, help_text="of the ZIP")
    size = models.BigIntegerField()

    class Meta:
        ordering = ["-made_at", "-id"]
        permissions = [("make_evidence_pack", "Can make and download an evidence pack")]

    def __str__(self):
        return f"Evidence pack {self.period_start:%Y-%m-%d} to {self.period_end:%Y-%m-%d}"

    def get_absolute_url(self):
        return reverse("evidence-pack", args=[self.pk])


# The alert channels' models live in their own module; Django finds them through this import.
from watching.channel_models import AlertChannel, ChannelDelivery  # noqa: E402, F401
