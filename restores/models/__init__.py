"""Restores (requested by one DBA, approved by another), restore tests and DR drills (drills.py)."""

import os
import socket
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.urls import reverse
from django.utils import timezone

from backupportal import journal
from backupportal.roles import OWN_ACCOUNT, is_dba, same_person, why_same_person
from backups.models import EncryptionKey


class RestoreRequestQuerySet(models.QuerySet):
    def pending(self):
        return self.filter(status=RestoreRequest.Status.PENDING)


class RestoreRequest(models.Model):
    """A DBA's request to restore; only an approved request runs, and never by its author."""

    class Destination(models.TextChoices):
        NEW_DATABASE = "new_database", "A new database"
        SANDBOX_CLUSTER = "sandbox_cluster", "A new sandbox cluster (PITR)"
        REPLACE = "replace", "Replace the production database"

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for approval"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    server = models.ForeignKey("backups.Server", on_delete=models.PROTECT, related_name="restore_requests")
    backup_run = models.ForeignKey(
        "backups.BackupRun", null=True, blank=True, on_delete=models.PROTECT, related_name="requests"
    )
    target_time = models.DateTimeField(null=True, blank=True, help_text="PITR: the moment to recover to")
    destination = models.CharField(max_length=16, choices=Destination.choices)
    target_database = models.CharField(max_length=63, blank=True)
    into_server = models.ForeignKey("backups.Server", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # A Sysadmin may point a server's DSN elsewhere at any time: the approver approves this place,
    # not a name, and the worker restores nowhere else (restores_into, Server.connection_settings).
    into_destination = models.CharField(
        max_length=300,
        blank=True,
        help_text="HOST:PORT the restore goes into, as it was when requested; empty: a sandbox cluster, "
        "or a request made before destinations were recorded",
    )
    reason = models.TextField()

    status = models.CharField(max_length=9, choices=Status.choices, default=Status.PENDING)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    requested_at = models.DateTimeField(default=timezone.now)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.TextField(blank=True)
    confirm_database = models.CharField(
        max_length=63, blank=True, help_text="what the approver typed to confirm replacing production"
    )

    objects = RestoreRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-requested_at"]
        indexes = [models.Index(fields=["status", "-requested_at"], name="request_status")]
        permissions = [
            ("request_restore", "Can request a restore"),
            ("approve_restore", "Can approve or reject another DBA's restore request"),
        ]

    def __str__(self):
        return f"Restore request #{self.pk} ({self.server}, {self.get_destination_display()})"

    def save(self, *args, **kwargs):
        # Recorded once, when it is asked for: what the approving DBA sees and the worker holds to.
        if self._state.adding and not self.into_destination and (target := self.target_server) is not None:
            self.into_destination = target.destination or ""
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("restore-request", args=[self.pk])

    @property
    def target_server(self):
        """The registered server this request restores into: another one, else its own (a new
        database beside production, or production replaced). None for a sandbox cluster: a new
        cluster on the portal's host."""
        if self.destination == self.Destination.SANDBOX_CLUSTER or self.server_id is None:
            return None
        if self.destination == self.Destination.REPLACE:
            return self.server
        return self.into_server or self.server

    def restores_into(self):
        """target_server, held to into_destination: connecting to it anywhere else fails (a
        request made before destinations were recorded is not held)."""
        target = self.target_server
        if target is not None and self.into_destination:
            target.approved_destination = self.into_destination
        return target

    def destination_moved(self):
        """One line when the target's DSN no longer reaches the destination recorded with the
        request (the one its approver saw); "" when it does, or none was recorded."""
        target = self.target_server
        if target is None or not self.into_destination or target.destination == self.into_destination:
            return ""
        return (
            f"{target} was at {self.into_destination} when restore request #{self.pk} was made; its DSN now "
            f"reaches {target.destination or 'nothing that can be read'}"
        )

    @property
    def production_database(self):
        """The database a replace request overwrites: the one its backup is of."""
        return self.backup_run.database_name if self.backup_run_id else self.server.dbname

    def awaits_decision_by(self, user):
        """Pending, and the user may decide on it: a DBA who is not its author (four eyes)."""
        return self.status == self.Status.PENDING and is_dba(user) and not same_person(user, self.requested_by)

    def approve(self, user, confirm_database="", note=""):
        """Four eyes: never one's own request; replacing production needs the name typed."""
        if not is_dba(user):
            raise PermissionDenied("Only a DBA approves a restore request (being a superuser is not enough).")
        if same_person(user, self.requested_by):
            raise PermissionDenied(
                f"You cannot approve your own restore request{self._other_account(user)}: another DBA must."
            )
        if self.status != self.Status.PENDING:
            raise ValidationError(f"Request #{self.pk} is {self.status}, not waiting for approval.")
        if self.destination == self.Destination.REPLACE and confirm_database != self.production_database:
            raise ValidationError(
                f"Type the production database name ({self.production_database}) to confirm replacing it."
            )
        if self.backup_run_id and self.backup_run.deleted_at:
            raise ValidationError(self.retired())
        if self.target_server is not None and not self.into_destination:
            # Approved, it would run wherever the DSN reaches then: nothing holds it to a place.
            raise ValidationError(
                f"Request #{self.pk} names no HOST:PORT to restore into ({self.target_server}'s DSN could not be "
                "read when it was made): reject it, and ask again once the DSN is fixed."
            )
        self._decide(user, self.Status.APPROVED, note, confirm_database)

    def _other_account(self, user):
        reason = why_same_person(user, self.requested_by)
        return "" if reason == OWN_ACCOUNT else f" ({reason})"

    def retired(self):
        """Why a request whose backup retention deleted since it was asked for may not run: a
        retired backup's files may be gone, or go while it is read (nothing restores from it)."""
        return (
            f"Backup #{self.backup_run_id} was deleted by retention on {self.backup_run.deleted_at:%Y-%m-%d}: "
            "nothing restores from it; reject this request and ask for a restore of a newer backup."
        )

    def reject(self, user, note=""):
        if not is_dba(user):
            raise PermissionDenied("Only a DBA decides on a restore request (being a superuser is not enough).")
        if same_person(user, self.requested_by):
            raise PermissionDenied(
                f"You cannot decide on your own restore request{self._other_account(user)}: another DBA must."
            )
        if self.status != self.Status.PENDING:
            raise ValidationError(f"Request #{self.pk} is {self.status}, not waiting for a decision.")
        self._decide(user, self.Status.REJECTED, note)

    def _decide(self, user, status, note, confirm_database=""):
        """One decision only: two DBAs deciding at once (one approving, one rejecting) meet here, and
        the second is told the first's, never written over it after the worker started the first."""
        now = timezone.now()
        decided = RestoreRequest.objects.filter(pk=self.pk, status=self.Status.PENDING).update(
            status=status, decided_by=user, decided_at=now, decision_note=note, confirm_database=confirm_database
        )
        if not decided:
            self.refresh_from_db(fields=["status"])
            raise ValidationError(f"Request #{self.pk} is {self.status} already: it was decided meanwhile.")
        self.status, self.decided_by, self.decided_at = status, user, now
        self.decision_note, self.confirm_database = note, confirm_database

    expired_because = ""  # set by expire(): what start() refused

    def start(self, actor="job:restore"):
        """Claim an approved request for running, once: returns False if it is not (or no longer)
        approved. One approved longer than QUEUED_RUN_TIMEOUT ago never starts, from the worker
        come back or from the command line: it fails here (expire), as the orphan sweep fails it."""
        fresh = timezone.now() - timedelta(seconds=settings.QUEUED_RUN_TIMEOUT)
        approved = RestoreRequest.objects.filter(pk=self.pk, status=self.Status.APPROVED)
        if approved.filter(models.Q(decided_at__gte=fresh) | models.Q(decided_at=None)).update(
            status=self.Status.RUNNING
        ):
            return True
        self.refresh_from_db(fields=["status", "decided_at"])
        if self.status == self.Status.APPROVED:
            self.expire(actor)  # who tried to start it: the worker, or the OS user of the command line
        return False

    def expire(self, actor):
        """Failed, with a failed run that says why on its page, while no worker has started it:
        run that late, it would restore a backup nobody chose for that day."""
        if not RestoreRequest.objects.filter(pk=self.pk, status=self.Status.APPROVED).update(status=self.Status.FAILED):
            return
        waited = int((timezone.now() - self.decided_at).total_seconds()) // 60
        kind = {
            self.Destination.SANDBOX_CLUSTER: RestoreRun.Kind.PITR,
            self.Destination.REPLACE: RestoreRun.Kind.REPLACE,
        }.get(self.destination, RestoreRun.Kind.LOGICAL)
        why = (
            f"approved {waited} minutes ago and never run (QUEUED_RUN_TIMEOUT): nothing was restored; "
            "is the restore worker (manage.py qcluster) running? Ask for the restore again"
        )
        now = timezone.now()
        restore = RestoreRun.objects.create(
            kind=kind, status=RestoreRun.Status.FAILED, server=self.server, backup_run=self.backup_run,
            request=self, requested_by=actor, started_at=now, finished_at=now, error=why,
        )  # fmt: skip
        journal.record("restore_failed", actor=actor, obj=restore, server=self.server.name, outcome="failed", error=why)
        self.status, self.expired_because = self.Status.FAILED, why


class Interrupted(Exception):
    """A restore found it was failed meanwhile by restores.orphans: it stops."""


class RestoreRun(models.Model):
    """One execution of a restore: logical into a new database, PITR into a new cluster, or a swap."""

    class Kind(models.TextChoices):
        LOGICAL = "logical", "Logical into a new database"
        PITR = "pitr", "Point in time into a new cluster"
        REPLACE = "replace", "Replace production"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        # Restored, but something of the backup could not be applied (an owner role missing on
        # the target, a role's password left out): `warnings` names each one.
        SUCCEEDED_WITH_WARNINGS = "succeeded with warnings", "Succeeded with warnings"
        FAILED = "failed", "Failed"

    kind = models.CharField(max_length=7, choices=Kind.choices)
    status = models.CharField(max_length=23, choices=Status.choices, default=Status.QUEUED)
    server = models.ForeignKey("backups.Server", on_delete=models.PROTECT, related_name="restore_runs")
    backup_run = models.ForeignKey(
        "backups.BackupRun", null=True, blank=True, on_delete=models.PROTECT, related_name="restores"
    )
    request = models.ForeignKey(RestoreRequest, null=True, blank=True, on_delete=models.PROTECT, related_name="runs")
    into_server = models.ForeignKey("backups.Server", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    into_database = models.CharField(max_length=63, blank=True)
    into_datadir = models.CharField(max_length=500, blank=True)
    port = models.IntegerField(null=True, blank=True)
    target = models.CharField(max_length=100, blank=True, help_text="time, latest, LSN or restore point")
    recovered_to = models.CharField(max_length=100, blank=True)
    requested_by = models.CharField(max_length=150, blank=True)
    restore_test = models.ForeignKey(
        "RestoreTest", null=True, blank=True, on_delete=models.SET_NULL, related_name="restores"
    )

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Where it runs (restores.orphans): a pid means something only on its own host.
    pid = models.IntegerField(null=True, blank=True)
    host = models.CharField(max_length=255, blank=True)
    # What it has made so far that is not yet a restore: {"database": name} or {"datadir":
    # path, "created": bool}. Emptied when it finishes; a run that died with it set has it
    # removed by restores.orphans on its host, so a half-restored copy is never taken for one.
    left = models.JSONField(default=dict, blank=True)
    bytes_done = models.BigIntegerField(default=0, verbose_name="bytes restored")
    error = models.TextField(blank=True)
    notes = models.TextField(blank=True, help_text="e.g. which copy was read, fallbacks")
    warnings = models.JSONField(default=list, blank=True, help_text="what of the backup could not be applied")
    # Onto another server: the roles its globals created. A restore test drops them with its copy,
    # and the orphan sweep when the test's worker died after the restore (restores.orphans).
    created_roles = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["server", "-created_at"], name="restore_server_created")]

    def __str__(self):
        return f"Restore #{self.pk} {self.kind} {self.status}"

    @property
    def duration_s(self):
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    @property
    def succeeded(self):
        """Restored, with or without warnings."""
        return self.status in (self.Status.SUCCEEDED, self.Status.SUCCEEDED_WITH_WARNINGS)

    @property
    def done(self):
        return self.succeeded or self.status == self.Status.FAILED

    @classmethod
    def begin(cls, kind, actor, **fields):
        """A restore running from now on; the caller journals what it restores."""
        now = timezone.now()
        return cls.objects.create(
            kind=kind,
            status=cls.Status.RUNNING,
            requested_by=actor,
            started_at=now,
            heartbeat_at=now,
            pid=os.getpid(),
            host=socket.gethostname(),
            **fields,
        )

    def leaves(self, **made):
        """Record what this run is about to make (see `left`) before it makes it. Interrupted
        when the orphan sweep failed it meanwhile: it makes nothing more, and its own failure
        path removes what it made."""
        if not RestoreRun.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(left=made):
            raise Interrupted(f"restore #{self.pk} was failed meanwhile (taken for one whose worker died)")
        self.left = made

    def finish(self, error=None, fields=()):
        """Failed with `error` (a string), or, when None, succeeded (with warnings when it has
        any: never a plain success that hides them); saved with the `fields` the caller has set.
        Only while still running: a run the orphan sweep failed meanwhile (what it made removed)
        stays failed, never a success without its copy."""
        if error is not None:
            status = self.Status.FAILED
        else:
            status = self.Status.SUCCEEDED_WITH_WARNINGS if self.warnings else self.Status.SUCCEEDED
        self.error, self.finished_at, self.left = (error or "")[:2000], timezone.now(), {}
        saved = {f: getattr(self, f) for f in ("error", "finished_at", "left", *fields)}
        if not RestoreRun.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(status=status, **saved):
            self.refresh_from_db(fields=["status", "error", "finished_at"])
            return
        self.status = status


class RestoreTestQuerySet(models.QuerySet):
    def failing(self, server):
        """The newest finished test of each kind (and database, for logical ones), where it failed:
        a test that passes says nothing of another kind or database, so the alert stays open
        until each passes. The monthly test of a key (of_key) proves that key's older backup, not
        the newest one: it stands apart, per key, until that key leaves the keyring."""
        finished = self.filter(server=server).exclude(status=RestoreTest.Status.RUNNING).select_related("database")
        dropped = set(EncryptionKey.objects.exclude(dropped_at=None).values_list("pk", flat=True))
        newest = {}
        for test in finished.order_by("-started_at", "-pk"):
            if test.of_key and test.encryption_key in dropped:
                continue
            key = test.encryption_key if test.of_key else None
            newest.setdefault((test.kind, test.database_id, key), test)
        return [test for test in newest.values() if test.status == RestoreTest.Status.FAILED and test.still_owed]


class RestoreTest(models.Model):
    """Proof that a backup restores: restore it somewhere scratch, check it, time it."""

    class Kind(models.TextChoices):
        LOGICAL = "logical", "Logical backup, into a scratch database"
        BASE = "base", "Base backup, into a throwaway cluster"

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        PASSED = "passed", "Passed"
        FAILED = "failed", "Failed"

    server = models.ForeignKey("backups.Server", on_delete=models.PROTECT, related_name="restore_tests")
    # Known before a backup is chosen: a test that found no good backup of its kind still says which.
    kind = models.CharField(max_length=7, choices=Kind.choices, default=Kind.LOGICAL)
    backup_run = models.ForeignKey(
        "backups.BackupRun", null=True, blank=True, on_delete=models.PROTECT, related_name="restore_tests"
    )
    # A logical test is of one database: known too when it found no backup of it to test.
    database = models.ForeignKey(
        "backups.Database", null=True, blank=True, on_delete=models.PROTECT, related_name="restore_tests"
    )
    status = models.CharField(max_length=7, choices=Status.choices, default=Status.RUNNING)
    # What a running test is doing, for its page: queued, restoring, checking, cleaning up.
    phase = models.CharField(max_length=12, blank=True)
    monthly = models.BooleanField(default=False, help_text="the strategy's monthly full restore test")
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Set once a worker takes it, then beaten while it runs (restores.orphans), as a restore's.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    host = models.CharField(max_length=255, blank=True)
    duration_s = models.FloatField(null=True, blank=True, help_text="the measured RTO", verbose_name="duration (s)")
    checks = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    # The keyring's key the tested backup was encrypted with: a passed test proves that key opens
    # it (the key custody page). Recorded at the test, as re-encryption may change the backup's.
    encryption_key = models.CharField(max_length=16, blank=True, db_default="", verbose_name="key id")
    of_key = models.BooleanField(default=False, db_default=False, help_text="the monthly test of a key (restores.keys)")

    objects = RestoreTestQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["server", "-started_at"], name="restoretest_server_started")]

    def __str__(self):
        return f"Restore test #{self.pk} {self.server} {self.status}"

    def get_absolute_url(self):
        return reverse("restore-test", args=[self.pk])

    @property
    def still_owed(self):
        """A test of a database no longer backed up (not chosen, or dropped) owes no pass."""
        return self.database is None or self.database.is_backed_up

    @property
    def done(self):
        return self.status != self.Status.RUNNING

    @property
    def state(self):
        """What its page shows: the phase while it runs, then passed or failed."""
        return self.status if self.done else (self.phase or self.status)

    def elapsed_s(self):
        """Since it was asked for (the queue included), until it finished."""
        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()

    def progress(self):
        """The JSON its page polls: the same shape as a backup run's progress."""
        restore = self.restores.order_by("-created_at").first()
        return {
            "id": self.pk,
            "status": self.state,
            "bytes_done": restore.bytes_done if restore else 0,
            "elapsed_s": round(self.elapsed_s(), 1),
            "error": self.error,
            "done": self.done,
        }

    def take(self):
        """A worker runs it from now on: where, for restores.orphans, which also reads its
        heartbeat. False when it may not: failed meanwhile (queued past QUEUED_RUN_TIMEOUT), or
        taken by another worker."""
        self.pid, self.host, self.heartbeat_at = os.getpid(), socket.gethostname(), timezone.now()
        return bool(
            RestoreTest.objects.filter(pk=self.pk, status=self.Status.RUNNING, pid__isnull=True).update(
                pid=self.pid, host=self.host, heartbeat_at=self.heartbeat_at
            )
        )

    def set_phase(self, phase):
        RestoreTest.objects.filter(pk=self.pk).update(phase=phase)
        self.phase = phase


class ValidationCheck(models.Model):
    """A DBA's own SQL check, run against every restored copy of a server's database."""

    server = models.ForeignKey("backups.Server", on_delete=models.CASCADE, related_name="validation_checks")
    name = models.CharField(max_length=100)
    sql = models.TextField(
        help_text="A read-only query whose first column of the first row is compared. Name tables with their "
        "schema (public.users): it sees pg_catalog only, so that no operator or function of the database "
        "owner's runs as the portal's role.",
        verbose_name="SQL",
    )
    expected = models.CharField(max_length=200, help_text="The expected value, as text (e.g. 0, t, 5).")
    enabled = models.BooleanField(default=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["server", "name"], name="one_check_name_per_server")]

    def __str__(self):
        return f"{self.server}: {self.name}"


from restores.models.drills import DrDrill, DrDrillStep  # noqa: E402 - registered with the app here

__all__ = [
    "DrDrill",
    "DrDrillStep",
    "Interrupted",
    "RestoreRequest",
    "RestoreRun",
    "RestoreTest",
    "ValidationCheck",
]
