"""A shorter S3 Object Lock for a storage location: a destructive change, so it waits for a
second person (ChangeRequest, kind "shorten_lock"). A longer or equal lock applies at once.

Kept apart from models.holds (which owns ChangeRequest and its other kinds): this module only
registers how its kind is applied, on its target LockChange.
"""

from django.core.exceptions import ValidationError
from django.db import models

from backupportal import journal
from backups.models.holds import ChangeRequest
from backups.models.locations import StorageLocation


class LockChange(models.Model):
    """The lock a location is asked to have instead of its current one; applied on approval."""

    location = models.ForeignKey(StorageLocation, on_delete=models.PROTECT, related_name="lock_changes")
    lock_mode = models.CharField(max_length=10, choices=StorageLocation.LockMode.choices)
    lock_days = models.PositiveIntegerField()
    was = models.CharField(max_length=40, help_text="the lock when the change was asked for")

    def __str__(self):
        return f"lock of {self.location}: {self.was} -> {describe_lock(self.lock_mode, self.lock_days)}"

    @classmethod
    def request(cls, location, user, mode, days, reason):
        """Ask for `location`'s lock to become (mode, days): a ChangeRequest another DBA or
        Sysadmin approves. Only for a shorter lock; a longer one is saved directly."""
        proposed = StorageLocation(name=location.name, kind=location.kind, lock_mode=mode, lock_days=days)
        proposed.clean_lock()
        if not location.shortens_lock(mode, days):
            raise ValidationError(f"A {describe_lock(mode, days)} lock is not shorter: save it on the location itself.")
        change = cls.objects.create(
            location=location, lock_mode=mode, lock_days=days, was=describe_lock(location.lock_mode, location.lock_days)
        )
        return ChangeRequest.open(ChangeRequest.Kind.SHORTEN_LOCK, change, user, reason)

    def apply(self, request):
        """Called once its change request is approved: objects written from now on get the shorter
        lock; those already written keep theirs (S3 never shortens a compliance lock)."""
        location = self.location
        location.lock_mode, location.lock_days = self.lock_mode, self.lock_days
        location.save(update_fields=["lock_mode", "lock_days"])
        request.refresh_from_db(fields=["decided_by"])  # approve() set it in the database, not on this object
        journal.record(
            "location_changed",
            actor=request.decided_by.get_username(),
            obj=location,
            fields=["lock_mode", "lock_days"],
            lock=describe_lock(self.lock_mode, self.lock_days),
            change_request=request.pk,
        )


def describe_lock(mode, days):
    return "no" if mode == StorageLocation.LockMode.NONE else f"{mode} {days}-day"


@ChangeRequest.applies(ChangeRequest.Kind.SHORTEN_LOCK, LockChange)
def shorten_lock(change, request):
    change.apply(request)
