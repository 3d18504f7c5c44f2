"""Verifications: one re-read of copies (one run's, or every copy), followed live by its page."""

import time
from datetime import timedelta

from django.db import models
from django.urls import reverse
from django.utils import timezone

from backups.models.runs import BackupRun


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

    def start(self):
        self.status, self.started_at = self.Status.RUNNING, timezone.now()
        self._save_progress(force=True, extra=["status", "started_at"])

    # The progress hooks verify.py calls while it reads.
    def begin(self, copies, portal=()):
        """copies: the catalog's; portal: [(row, copy)] of the portal's own backups."""
        totals = copies.aggregate(n=models.Count("pk"), size=models.Sum("size"))
        self.copies_total = totals["n"] + len(portal)
        self.bytes_total = (totals["size"] or 0) + sum(row.size or 0 for row, _ in portal)
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
        # A copy S3 holds for less than the catalog says (a lock lifted) fails it too.
        lock_problems = result.get("lock_problems", 0)
        clean = result["checked"] > 0 and result["checked"] == result["ok"] and not lock_problems
        self.status = self.Status.VERIFIED if clean else self.Status.FAILED
        if not result["checked"]:
            self.error = "no copy was in a state to check (each is pending, failed or deleted)"
        elif not clean:
            self.error = f"{result['bad']} bad and {result['unreachable']} unreachable of {result['checked']} copies"
            if lock_problems:
                self.error += f"; {lock_problems} with a shorter S3 Object Lock than catalogued"
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
