"""The monitor's checks of storage and copies: a location short of free space, copies that did
not upload, copies found bad. watching.monitor runs them with the others."""

from django.db.models import Q
from django.utils import timezone

from backupportal.templatetags.portal import percent
from backups.copies import owner_of
from backups.models import BackupCopy, Server, StorageLocation
from backups.verify import bad_copies
from watching.alerts import raise_alert, resolve_alert
from watching.models import Alert


def check_storage():
    """Storage under 20% free, per location (backups.storage measures it).

    A location whose free space cannot be read keeps its alert as it is; it is this check's
    error, so that the monitor's output and journal show it.
    """
    figures = StorageLocation.check_storage()
    locations = {location.name: location for location in StorageLocation.objects.all()}
    for figure in figures:
        location = locations[figure["location"]]
        if figure["ok"]:
            resolve_alert(Alert.Condition.STORAGE_LOW, location=location)
        elif not figure["error"]:
            raise_alert(Alert.Condition.STORAGE_LOW, location=location, message=_storage_message(location, figure))
    unreadable = [f"{r['location']}: {r['error']}" for r in figures if r["error"]]
    if unreadable:
        raise OSError("; ".join(unreadable))


def _storage_message(location, figure):
    return (
        f"Location {location.name} has {percent(figure['ratio'])} free ({figure['free']} of {figure['total']} bytes): "
        f"under {StorageLocation.LOW_FREE:.0%}. Free space, raise its capacity, or let retention run."
    )


def check_copies():
    """Cloud upload failure per location, backup corruption per server, judged on the catalog.

    A copy that fails or is found bad is marked so on its row (backups.copies), which runs the
    check of its location or server at once. The alerts hold while any kept artifact is still
    affected and resolve once none is: also when the run was retired or the location disabled.
    """
    for location in StorageLocation.objects.all():
        check_uploads(location)
    for server in Server.objects.filter(enabled=True):  # a disabled server's alerts are resolved
        check_corruption(server)


def check_uploads(location):
    failing = failing_copies(location)
    if newest := _newest(failing):
        raise_alert(Alert.Condition.UPLOAD_FAILED, location=location, message=_failing_message(newest, failing))
    else:
        resolve_alert(Alert.Condition.UPLOAD_FAILED, location=location)


def check_corruption(server):
    bad = bad_copies(server)
    if newest := _newest(bad):
        raise_alert(Alert.Condition.CORRUPTION, server=server, message=_bad_message(newest, bad))
    else:
        resolve_alert(Alert.Condition.CORRUPTION, server=server)


def failing_copies(location):
    """Copies of kept artifacts into an enabled location whose last attempt failed.

    A failed copy being retried right now (copying, its error not yet cleared) still counts:
    resolving for the length of a retry would mail "resolved", then "opened" on its next failure.
    """
    if not location.enabled:
        return BackupCopy.objects.none()
    live = Q(run__isnull=False, run__deleted_at=None) | Q(wal_segment__isnull=False, wal_segment__deleted_at=None)
    failed = Q(status=BackupCopy.Status.FAILED) | (Q(status=BackupCopy.Status.COPYING) & ~Q(last_error=""))
    return BackupCopy.objects.filter(live, failed, location=location)


def _newest(copies):
    return copies.select_related("location", "run__server", "wal_segment__server").order_by("-pk").first()


def _failing_message(newest, copies):
    text = (
        f"Copy of {owner_of(newest)} ({newest.artifact}) to {newest.location.name} failed on attempt "
        f"{newest.attempts}: {newest.last_error}."
    )
    if newest.status == BackupCopy.Status.FAILED and newest.next_attempt_at:
        text += f" Next attempt at {timezone.localtime(newest.next_attempt_at):%Y-%m-%d %H:%M:%S}."
    count = copies.count()
    return text + (f" {count} copies to {newest.location.name} are waiting for a retry." if count > 1 else "")


def _bad_message(newest, copies):
    count = copies.count()
    more = f" ({count} bad copies in all)" if count > 1 else ""
    return f"Bad copy of {owner_of(newest)} in {newest.location.name}: {newest.last_error}{more}"
