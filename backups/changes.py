"""What is a destructive change, and how each is made once another DBA or Sysadmin approves it.

Every way in (the admin, the server page, the run page) asks here, so that none of them can
shorten retention, turn a schedule down, delete a backup or a location without a second person:

- retention shortened: any of RETENTION_FIELDS lowered (lengthening applies at once);
- a schedule disabled, or changed so that over the next year it fires less often or its longest
  silence grows (backupportal.lib.cron.firings and longest_gap; a month's count would let "only in
  December" through); a change worse by neither applies at once; a server disabled (no job runs);
- a backup deleted by hand;
- a storage location removed, or retired (disabled);
- a legal hold released (backups.models.holds);
- where a server's restore tests restore chosen (its sandbox, or none: itself), or a server they
  restore into moved to another host or port: each test decrypts the newest production backup
  there, so only a DBA approves (ChangeRequest.DBA_DECIDES), and tests go only to the HOST:PORT
  approved (Server.sandbox).

Such a change opens a ChangeRequest and nothing changes until it is approved; each kind is made
by one small function below, registered with ChangeRequest.applies.
"""

from django.core.exceptions import ValidationError

from backupportal import journal
from backupportal.lib.cron import cron_problem, duration_words, firings, longest_gap
from backups import schedules
from backups.copies import delete_run_artifacts
from backups.models import BackupCopy, BackupRun, BackupSchedule, ChangeRequest, Server, StorageLocation
from backups.models.servers import destination_of

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
# A schedule is compared over a whole year (a leap day included): a season without backups shows.
YEAR_DAYS = 366


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
    destructive (disabled, or weakened over the next YEAR_DAYS days), else {}."""
    changes = {}
    if stored.enabled and not enabled:
        changes["enabled"] = {"from": True, "to": False}
    elif stored.enabled and enabled and cron != stored.cron and not cron_problem(cron):
        # A stored cron that never fires (saved before crons were checked) is weakened by nothing.
        changes = {} if cron_problem(stored.cron) else weakened(stored.cron, cron, now)
    if changes and cron != stored.cron:
        changes["cron"] = {"from": stored.cron, "to": cron}
    return changes


def weakened(old, new, now=None):
    """The measures over YEAR_DAYS in which cron `new` is worse than `old`, as {measure: {"from",
    "to"}}: fewer firings, or a longer longest gap. Either alone is worse: more firings bunched
    into one month still leave the other eleven without a backup."""
    changes = {}
    before, after = firings(old, YEAR_DAYS, now), firings(new, YEAR_DAYS, now)
    if after < before:
        changes[f"firings in {YEAR_DAYS} days"] = {"from": before, "to": after}
    before, after = longest_gap(old, YEAR_DAYS, now), longest_gap(new, YEAR_DAYS, now)
    if after > before:
        changes["longest gap"] = {"from": duration_words(before), "to": duration_words(after)}
    return changes


@ChangeRequest.applies(Kind.SCHEDULE_LESS_OFTEN, BackupSchedule)
def apply_schedule(schedule, change):
    # Only the schedule's own fields: the measures are what the approver was shown.
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


# --- Where restore tests restore -------------------------------------------------------------

# The sandbox of a server whose restore tests restore into itself (no server can be so named).
NO_SANDBOX = "none (this server)"


def sandbox_changed(stored, chosen):
    """The change of `stored`'s sandbox to `chosen` (a Server, or None: itself) as {field: {"from",
    "to"}}, or {} when its restore tests keep going where a DBA approved. A destination that moved
    behind the form's back (a sandbox deleted, a DSN edited in a shell) is asked for again too."""
    if stored.pk is None and chosen is None:
        return {}  # a new server's own destination is approved with it (Server.save)
    destination = (chosen or stored).destination
    if getattr(chosen, "pk", None) == stored.sandbox_server_id and destination == stored.sandbox_destination:
        return {}
    return {
        "sandbox": {"from": _sandbox_name(stored.sandbox_server), "to": _sandbox_name(chosen)},
        "sandbox_destination": {"from": stored.sandbox_destination or "none", "to": destination},
    }


def _sandbox_name(server):
    return server.name if server is not None else NO_SANDBOX


def destination_moved(stored, dsn):
    """{"dsn": {"from", "to"}} when `dsn` moves `stored`, a server restore tests restore into, to
    another host or port; else {} (a new server, or one no restore test reaches, moves at once)."""
    moved = stored.pk is not None and destination_of(dsn) not in (None, stored.destination)
    if not moved or not stored.restore_tests_from().exists():
        return {}
    return {"dsn": {"from": stored.dsn, "to": dsn}}


@ChangeRequest.applies(Kind.SET_SANDBOX, Server)
def apply_sandbox(server, change):
    name, approved = change.changes["sandbox"]["to"], change.changes["sandbox_destination"]["to"]
    chosen = None if name == NO_SANDBOX else Server.objects.filter(name=name).first()
    if name != NO_SANDBOX and chosen is None:
        raise ValidationError(f"Server {name} no longer exists: reject change request #{change.pk} and ask again.")
    # What the DBA approves is what runs: not a sandbox moved since it was asked for.
    now = (chosen or server).destination
    if now != approved:
        raise ValidationError(
            f"{chosen or server} now points at {now}, not {approved} as asked: reject change request "
            f"#{change.pk} and ask again."
        )
    server.sandbox_server, server.sandbox_destination = chosen, approved
    server.save(update_fields=["sandbox_server", "sandbox_destination"])
    fields = ["sandbox_server", "sandbox_destination"]
    journal.record("server_changed", actor=approved_actor(change), obj=server, fields=fields, change=change.pk)


@ChangeRequest.applies(Kind.MOVE_SANDBOX, Server)
def apply_move(server, change):
    dsn = change.changes["dsn"]
    if server.dsn != dsn["from"]:
        raise ValidationError(
            f"The DSN of {server} changed since change request #{change.pk} was asked for: reject it and ask again."
        )
    receiving = list(server.restore_tests_from().values_list("pk", flat=True))
    server.dsn = dsn["to"]
    server.save(update_fields=["dsn"])  # a password entered for the old host is forgotten (ServerConnection)
    Server.objects.filter(pk__in=receiving).update(sandbox_destination=server.destination)
    journal.record(
        "server_changed",
        actor=approved_actor(change),
        obj=server,
        fields=["dsn"],
        change=change.pk,
        credentials_forgotten=getattr(server, "password_forgotten", False),
    )
