"""Legal holds on backups, and change requests: destructive changes that wait for a second person.

A held backup is never deleted by retention (nor what it needs to restore). Releasing a hold is
a destructive change: a ChangeRequest that another DBA or Sysadmin approves, never its author;
until then the hold stays. ChangeRequest is generic (a kind, a target and the fields it sets):
shorter retention, a schedule off or weakened, deleting a backup by hand, removing or retiring a
location wait the same way; so do choosing where a server's restore tests restore (its sandbox)
and moving such a destination to another host or port, which only a DBA approves (DBA_DECIDES).
Each kind is applied by one small function registered with ChangeRequest.applies (releasing a
hold here, the others in backups.changes).
"""

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.utils import timezone

from backupportal import journal
from backupportal.roles import NO_ADDRESS, UNTOLD_APART, is_dba, role_may, same_person, why_same_person
from backups.models.runs import BackupRun


class BackupHoldQuerySet(models.QuerySet):
    def active(self):
        return self.filter(released_at=None)


class BackupHold(models.Model):
    """A DBA's legal hold on one backup, with the reason; released only by an approved request."""

    run = models.ForeignKey(BackupRun, on_delete=models.PROTECT, related_name="holds")
    reason = models.TextField()
    held_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    held_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    objects = BackupHoldQuerySet.as_manager()

    class Meta:
        ordering = ["-held_at"]
        permissions = [("hold_backup", "Can put a legal hold on a backup")]

    def __str__(self):
        return f"Hold on #{self.run_id}: {self.reason[:60]}"

    @classmethod
    def place(cls, run, user, reason):
        """Hold `run` (a good backup) for `reason`; journaled. One active hold per backup is enough."""
        if not role_may(user, "backups.hold_backup"):
            raise PermissionDenied("Only a DBA puts a legal hold on a backup.")
        reason = (reason or "").strip()
        if not reason:
            raise ValidationError("Give the reason for the hold (a case, a ticket): auditors read it.")
        with transaction.atomic():
            # Locked as retention locks it before deleting (retention._retired_unless_kept).
            run = BackupRun.objects.select_for_update().get(pk=run.pk)
            return cls._place(run, user, reason)

    @classmethod
    def _place(cls, run, user, reason):
        if not run.is_good:
            raise ValidationError(
                f"Backup #{run.pk} is {run.status if run.deleted_at is None else 'deleted'}: only a kept good backup can be held."
            )
        if run.holds.active().exists():
            raise ValidationError(f"Backup #{run.pk} is already held: its hold stays until a release is approved.")
        hold = cls.objects.create(run=run, reason=reason, held_by=user)
        journal.record("backup_held", actor=user.get_username(), obj=run, server=run.server.name, reason=reason)
        return hold

    def request_release(self, user, reason):
        """Ask for this hold to be released: a ChangeRequest another DBA or Sysadmin decides."""
        if self.released_at is not None:
            raise ValidationError(f"The hold on #{self.run_id} is already released.")
        if ChangeRequest.objects.pending().filter(kind=ChangeRequest.Kind.RELEASE_HOLD, target_id=self.pk).exists():
            raise ValidationError(f"A release of the hold on #{self.run_id} is already waiting for approval.")
        return ChangeRequest.open(ChangeRequest.Kind.RELEASE_HOLD, self, user, reason)

    def release(self, request):
        """Called once its release request is approved."""
        self.released_at = timezone.now()
        self.save(update_fields=["released_at"])


class ChangeRequestQuerySet(models.QuerySet):
    def pending(self):
        return self.filter(state=ChangeRequest.State.PENDING)


class ChangeRequest(models.Model):
    """A destructive change one person asks for and another (DBA or Sysadmin) approves; journaled
    at each step. Nothing changes until it is approved: approve() applies it."""

    class Kind(models.TextChoices):
        RELEASE_HOLD = "release_hold", "Release a legal hold"
        SHORTEN_RETENTION = "shorten_retention", "Shorten retention"
        LOOSEN_OBJECTIVES = "loosen_objectives", "Raise a server's RPO, RTO or shrink threshold"
        SCHEDULE_LESS_OFTEN = (
            "schedule_less_often",
            "Disable a schedule, or make it fire less often or with longer gaps",
        )
        DISABLE_SERVER = "disable_server", "Disable a server (every schedule of it)"
        STOP_ARCHIVING = "stop_archiving", "Turn a server's WAL archiving off (no PITR from then on)"
        FEWER_CRITICAL_TABLES = "fewer_critical", "Take tables off a database's critical tables"
        BACK_UP_FEWER = "back_up_fewer", "Stop backing up some of a server's databases"
        DELETE_BACKUP = "delete_backup", "Delete a backup by hand"
        REMOVE_LOCATION = "remove_location", "Remove a storage location"
        RETIRE_LOCATION = "retire_location", "Retire (disable) a storage location"
        SHORTEN_LOCK = "shorten_lock", "Shorten a location's S3 Object Lock"  # target: models.lockchanges
        SET_SANDBOX = "set_sandbox", "Choose where a server's restore tests restore (its sandbox)"
        MOVE_SANDBOX = "move_sandbox", "Move a server restore tests restore into to another host or port"

    class State(models.TextChoices):
        PENDING = "pending", "Waiting for approval"
        APPROVED = "approved", "Approved and applied"
        REJECTED = "rejected", "Rejected"

    # A restore test decrypts production's newest backup into its destination: choosing it is a
    # restore elsewhere, which needs a DBA. A Sysadmin asks (servers are theirs), never approves.
    DBA_DECIDES = {Kind.SET_SANDBOX, Kind.MOVE_SANDBOX}

    # Each kind: (the model of its target, the function applying an approved request to it, as
    # apply(target, change)). Filled by ChangeRequest.applies; a new kind is a Kind and a function.
    APPLY = {}

    kind = models.CharField(max_length=32, choices=Kind.choices)
    target_id = models.BigIntegerField(help_text="the pk of the row the change is about (its kind says which model)")
    target_repr = models.CharField(max_length=200, help_text="what the target was when the change was requested")
    reason = models.TextField()
    changes = models.JSONField(
        default=dict, blank=True, help_text='the fields it sets, {field: {"from": old, "to": new}}; empty: none'
    )
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    requested_at = models.DateTimeField(default=timezone.now)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)

    objects = ChangeRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-requested_at"]
        indexes = [models.Index(fields=["state", "-requested_at"], name="change_state")]
        permissions = [
            ("request_change", "Can request a destructive change"),
            ("approve_change", "Can approve or reject another's destructive change"),
        ]

    def __str__(self):
        return f"Change request #{self.pk}: {self.get_kind_display()} ({self.target_repr})"

    @classmethod
    def applies(cls, kind, model):
        """Register `apply(target, change)` as how an approved request of `kind` (about a `model`) is made."""

        def register(apply):
            cls.APPLY[kind] = (model, apply)
            return apply

        return register

    @property
    def target(self):
        model, _ = self.APPLY[self.kind]
        try:
            return model.objects.get(pk=self.target_id)
        except model.DoesNotExist:
            raise ValidationError(
                f"{self.target_repr} no longer exists: change request #{self.pk} cannot be made."
            ) from None

    @property
    def changes_text(self):
        """The fields it sets, as a DBA reads them: "keep weekly: 4 -> 0"."""
        return "; ".join(f"{f.replace('_', ' ')}: {c['from']} -> {c['to']}" for f, c in self.changes.items())

    @property
    def deciders(self):
        """Who may decide on it, for pages: "another DBA" or "another DBA or Sysadmin"."""
        return "another DBA" if self.kind in self.DBA_DECIDES else "another DBA or Sysadmin"

    def may_decide(self, user):
        """A DBA or Sysadmin (a DBA alone for DBA_DECIDES), whatever else they are."""
        if self.kind in self.DBA_DECIDES:
            return is_dba(user)
        return role_may(user, "backups.approve_change")

    @classmethod
    def open(cls, kind, target, user, reason, changes=None):
        """Ask for a change of `target`; one of each kind per target waits at a time. Journaled."""
        if not role_may(user, "backups.request_change"):
            raise PermissionDenied("Only a DBA or a Sysadmin asks for a destructive change.")
        reason = (reason or "").strip()
        if not reason:
            raise ValidationError("Give the reason for the change: the approver and auditors read it.")
        waiting = cls.objects.pending().filter(kind=kind, target_id=target.pk).first()
        if waiting is not None:
            raise ValidationError(
                f"Change request #{waiting.pk} ({waiting.get_kind_display().lower()} of {target}) is already "
                "waiting: have it approved or rejected first."
            )
        change = cls.objects.create(
            kind=kind,
            target_id=target.pk,
            target_repr=str(target)[:200],
            reason=reason,
            changes=changes or {},
            requested_by=user,
        )
        journal.record(
            "change_requested",
            actor=user.get_username(),
            obj=change,
            kind=kind,
            target=change.target_repr,
            changes=change.changes,
            reason=reason,
        )
        return change

    def renamed_to(self):
        """What the target is called now, when that is not what it was called when the change was
        asked for (a server or a location renamed since, at once): else "". The approver reads the
        old name, and a request asked for as "scratch" must not disable the server since named back
        to production."""
        try:
            now = str(self.target)[:200]
        except ValidationError:
            return ""  # gone: approval says so
        return now if now != self.target_repr else ""

    def target_address(self):
        """Where the target is (a server's HOST:PORT, a location's bucket or path), shown beside its
        name: names can be swapped (production renamed "scratch", the real scratch renamed away,
        and left so until the approval), an address cannot without moving the data. "" when the
        target is gone or has none."""
        try:
            target = self.target
        except ValidationError:
            return ""
        if hasattr(target, "address"):
            return target.address()
        server = getattr(target, "server", target)
        return getattr(server, "destination", None) or ""

    def awaits_decision_by(self, user):
        """Pending, and the user may decide on it: a DBA or Sysadmin who is not its author."""
        return self.state == self.State.PENDING and self.may_decide(user) and not same_person(user, self.requested_by)

    def approve(self, user):
        """Four eyes: apply the change, journaled. Never by its author, never by an Auditor."""
        self._check_decider(user)
        if now := self.renamed_to():
            raise ValidationError(
                f"{self.target_repr} is now {now}: change request #{self.pk} was asked for under the name it had "
                "then, which is what its approver reads. Reject it, and ask again."
            )
        try:
            self._apply(user)
        except ValidationError:
            self.refresh_from_db()  # rolled back: still pending
            raise

    def _apply(self, user):
        with transaction.atomic():
            if (
                not ChangeRequest.objects.pending()
                .filter(pk=self.pk)
                .update(state=self.State.APPROVED, decided_by=user, decided_at=timezone.now())
            ):
                raise ValidationError(f"Change request #{self.pk} was decided meanwhile.")
            self.refresh_from_db()
            # Refused by its function (the backup was held meanwhile, say): all rolled back.
            _, apply = self.APPLY[self.kind]
            apply(self.target, self)
            journal.record(
                "change_approved",
                actor=user.get_username(),
                obj=self,
                kind=self.kind,
                target=self.target_repr,
                changes=self.changes,
            )

    def reject(self, user):
        self._check_decider(user)
        if (
            not ChangeRequest.objects.pending()
            .filter(pk=self.pk)
            .update(state=self.State.REJECTED, decided_by=user, decided_at=timezone.now())
        ):
            raise ValidationError(f"Change request #{self.pk} was decided meanwhile.")
        self.refresh_from_db()
        journal.record("change_rejected", actor=user.get_username(), obj=self, kind=self.kind, target=self.target_repr)

    def _check_decider(self, user):
        if not self.may_decide(user):
            if self.kind in self.DBA_DECIDES:
                raise PermissionDenied("Only a DBA decides where restore tests restore: ask another DBA.")
            raise PermissionDenied("Only a DBA or a Sysadmin decides on a destructive change.")
        reason = why_same_person(user, self.requested_by)
        if reason:
            note = (
                reason if reason in (UNTOLD_APART, NO_ADDRESS) else "nor from another account with your e-mail address"
            )
            raise PermissionDenied(
                f"You cannot decide on your own change request ({note}): another DBA or Sysadmin must."
            )
        if self.state != self.State.PENDING:
            raise ValidationError(f"Change request #{self.pk} is {self.state}, not waiting for a decision.")


@ChangeRequest.applies(ChangeRequest.Kind.RELEASE_HOLD, BackupHold)
def release_hold(hold, change):
    hold.release(change)
