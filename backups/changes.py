"""What is a destructive change, and how each is made once another DBA or Sysadmin approves it.

Every way in (the admin, the server page, the run page) asks here, so that none of them can
shorten retention, turn a schedule down, delete a backup or a location without a second person:

- retention shortened: any of RETENTION_FIELDS lowered (lengthening applies at once);
- a schedule disabled, or changed so that it fires less often over the next 30 days (counted by
  backupportal.lib.cron.firings; more often applies at once); a server disabled (no job of it runs);
- a backup deleted by hand;
- a storage location removed, or retired (disabled);
- a legal hold released (backups.models.holds).

Such a change opens a ChangeRequest and nothing changes until it is approved; each kind is made
by one small function below, registered with ChangeRequest.applies.
"""

from django.core.exceptions import ValidationError

from backupportal import journal
from backupportal.lib.cron import cron_problem, firings
from backups import schedules
from backups.copies import delete_run_artifacts
from backups.models import BackupCopy, BackupRun, BackupSchedule, ChangeRequest, Server, StorageLocation

Kind = ChangeRequest.Kind

# Lowering any of these keeps fewer backups (0 turns a GFS tier off): it waits for approval.
RETENTION_FIELDS = [
    "logical_retention_days",
    "base_retention_days",
    "wal_retention_days",
    "incremental_retention_days",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "retention_floor",
]
# A schedule is compared by how often it fires over this many days.
FIRINGS_DAYS = 30


def request_problem(kind, target, reason):
    """Why a request of `kind` about `target` cannot be opened now (None: it can). Forms ask this
    before saving anything, so that a refused request never leaves half a change behind."""
    if not (reason or "").strip():
        return "This change waits for a second approval: give its reason (the approver and auditors read it)."
    waiting = ChangeRequest.objects.pending().filter(kind=kind, target_id=target.pk).first()
    if waiting is not None:
        return f"Change request #{waiting.pk} for {target} is already waiting: have it approved or rejected first."
    return None


def approved_actor(change):
    """Who made an approved change, as the journal names it: both people."""
    return f"{change.requested_by.get_username()} (approved by {change.decided_by.get_username()})"


# --- Retention -------------------------------------------------------------------------------


def retention_shortened(stored, values):
    """{field: {"from", "to"}} of the retention fields that `values` (a dict or a Server) lowers."""
    get = values.get if isinstance(values, dict) else lambda f: getattr(values, f, None)
    shorter = {}
    for field in RETENTION_FIELDS:
        new, old = get(field), getattr(stored, field)
        if new is not None and new < old:
            shorter[field] = {"from": old, "to": new}
    return shorter


@ChangeRequest.applies(Kind.SHORTEN_RETENTION, Server)
def apply_retention(server, change):
    for field, values in change.changes.items():
        setattr(server, field, values["to"])
    server.save(update_fields=list(change.changes))
    journal.record(
        "server_changed", actor=approved_actor(change), obj=server, fields=sorted(change.changes), change=change.pk
    )


@ChangeRequest.applies(Kind.DISABLE_SERVER, Server)
def apply_disable_server(server, change):
    server.enabled = False
    server.save(update_fields=["enabled"])
    journal.record("server_changed", actor=approved_actor(change), obj=server, fields=["enabled"], change=change.pk)


# --- Schedules -------------------------------------------------------------------------------


def schedule_turned_down(stored, cron, enabled, now=None):
    """The change of a schedule to (`cron`, `enabled`) as {field: {"from", "to"}} when it is
    destructive (disabled, or fewer firings over the next FIRINGS_DAYS days), else {}."""
    changes = {}
    if stored.enabled and not enabled:
        changes["enabled"] = {"from": True, "to": False}
    elif stored.enabled and enabled and cron != stored.cron and not cron_problem(cron):
        before, after = firings(stored.cron, FIRINGS_DAYS, now), firings(cron, FIRINGS_DAYS, now)
        if after < before:
            changes[f"firings in {FIRINGS_DAYS} days"] = {"from": before, "to": after}
    if changes and cron != stored.cron:
        changes["cron"] = {"from": stored.cron, "to": cron}
    return changes


@ChangeRequest.applies(Kind.SCHEDULE_LESS_OFTEN, BackupSchedule)
def apply_schedule(schedule, change):
    # Only the schedule's own fields: "firings in 30 days" is what the approver was shown.
    for field in ("cron", "enabled"):
        if field in change.changes:
            setattr(schedule, field, change.changes[field]["to"])
    schedules.change(schedule, actor=approved_actor(change))


# --- Backups deleted by hand -----------------------------------------------------------------


def delete_problem(run):
    """Why `run` cannot be deleted by hand (None: it can, once approved)."""
    if run.deleted_at is not None:
        return f"Backup #{run.pk} is already deleted."
    if run.holds.active().exists():
        return f"Backup #{run.pk} is under a legal hold: its release must be approved first."
    children = BackupRun.objects.filter(
        server=run.server_id, kind=BackupRun.Kind.INCREMENTAL, deleted_at=None, details__parent=run.pk
    )
    if children.exists():
        return f"Backup #{run.pk} is the parent of kept incrementals (#{children.first().pk}): delete those first."
    if run.pk in BackupRun.objects.exclude(pk=run.pk).filter(server=run.server_id).globals_in_use():
        return (
            f"Backup #{run.pk} holds the globals file that kept backups of the same day pair with: delete those first."
        )
    return None


@ChangeRequest.applies(Kind.DELETE_BACKUP, BackupRun)
def apply_delete_backup(run, change):
    problem = delete_problem(run)  # a hold placed since the request wins
    if problem:
        raise ValidationError(problem)
    delete_run_artifacts(run, approved_actor(change))


# --- Storage locations -----------------------------------------------------------------------


def remove_problem(location):
    """A location the catalog names (kept or deleted copies) cannot be removed: retire it instead."""
    named = BackupCopy.objects.filter(location=location).count()
    if named:
        return (
            f"Location {location} is named by {named} cop{'y' if named == 1 else 'ies'} in the catalog: "
            "retire it (untick enabled) instead of removing it."
        )
    return None


@ChangeRequest.applies(Kind.REMOVE_LOCATION, StorageLocation)
def apply_remove_location(location, change):
    problem = remove_problem(location)
    if problem:
        raise ValidationError(problem)
    journal.record("location_removed", actor=approved_actor(change), obj=location, change=change.pk)
    location.delete()


@ChangeRequest.applies(Kind.RETIRE_LOCATION, StorageLocation)
def apply_retire_location(location, change):
    location.enabled = False
    location.save(update_fields=["enabled"])
    journal.record("location_changed", actor=approved_actor(change), obj=location, fields=["enabled"], change=change.pk)
