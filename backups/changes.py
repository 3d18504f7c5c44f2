"""What is a destructive change, and how each is made once another DBA or Sysadmin approves it.

Every way in (the admin, the server page, the run page) asks here, so that none of them can
shorten retention, turn a schedule down, delete a backup or a location without a second person:

- retention shortened: any of RETENTION_FIELDS lowered (lengthening applies at once);
- an objective loosened: any of OBJECTIVE_FIELDS raised (the RPO, the RTOs, the shrink threshold);
- a schedule disabled, or changed so that over the next year it fires less often or its longest
  silence grows (backupportal.lib.cron.firings and longest_gap; a month's count would let "only in
  December" through); a change worse by neither applies at once, nor one that only moves a firing
  across the year's edge (weakened); a server disabled (no job runs);
- a table taken off a database's critical tables (added ones apply at once);
- a server's WAL archiving turned off (push or pull to none): no PITR after it, and the RPO
  alert goes quiet as for a looser objective;
- a database it backs up left out (its databases to back up, or the DSN's database when that is
  the choice): the old choice and the new together are backed up until it is approved;
- a backup deleted by hand;
- a storage location removed, or retired (disabled);
- a legal hold released (backups.models.holds);
- where a server's restore tests restore chosen (its sandbox, or none: itself), or a server they
  restore into moved to another host or port: each test decrypts the newest production backup
  there, so only a DBA approves (ChangeRequest.DBA_DECIDES), and tests go only to the HOST:PORT
  approved (Server.sandbox). A move applies to the DSN at once (backups follow a failover; a
  backup reaching another cluster is refused by its own check); only the new HOST:PORT as the
  restore tests' destination waits, and until it is approved those tests fail saying so.

Such a change opens a ChangeRequest and nothing of it changes until it is approved; each kind is
made by one small function below, registered with ChangeRequest.applies.
"""

import psycopg
from django.core.exceptions import ValidationError

from backupportal import journal
from backupportal.lib.cron import cron_problem, duration_words, firings, longest_gap
from backups import schedules
from backups.copies import delete_run_artifacts
from backups.critical import take_off
from backups.databases import discover
from backups.models import BackupCopy, BackupRun, BackupSchedule, ChangeRequest, Database, Server, StorageLocation
from backups.models.servers import ALL_DATABASES, destination_of, parse_protect_databases

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
# Raising any of these lets more go by unalerted: an RPO or RTO breached before its alert, a
# critical table shrinking further before its restore test fails. It waits for approval.
OBJECTIVE_FIELDS = ["rpo_minutes", "rto_critical_minutes", "rto_full_minutes", "shrink_threshold_pct"]
# A schedule is compared over a whole year (a leap day included): a season without backups shows.
YEAR_DAYS = 366
# A schedule only shifted is not weakened by the window's edges: it loses a firing there ("the 5th"
# fires 13 times from 5 December, "the 6th" 12: FIRINGS_SLACK), and a yearly firing's gap is 366
# days across a 29 February (a gap is longer when it grows by more than GAP_SLACK_PCT percent).
FIRINGS_SLACK = 1
GAP_SLACK_PCT = 1


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
    return _worse(stored, values, RETENTION_FIELDS, lambda new, old: new < old)


def objectives_loosened(stored, values):
    """{field: {"from", "to"}} of the objectives and thresholds that `values` raises."""
    return _worse(stored, values, OBJECTIVE_FIELDS, lambda new, old: new > old)


def _worse(stored, values, fields, worse):
    get = values.get if isinstance(values, dict) else lambda f: getattr(values, f, None)
    changes = {}
    for field in fields:
        new, old = get(field), getattr(stored, field)
        if new is not None and worse(new, old):
            changes[field] = {"from": old, "to": new}
    return changes


def archiving_stopped(stored, values):
    """{"archiving": {"from", "to"}} when `values` turns the stored server's WAL archiving off."""
    new = values.get("archiving")
    if stored.pk and new == Server.Archiving.NONE and stored.archiving != Server.Archiving.NONE:
        return {"archiving": {"from": stored.archiving, "to": new}}
    return {}


@ChangeRequest.applies(Kind.SHORTEN_RETENTION, Server)
@ChangeRequest.applies(Kind.LOOSEN_OBJECTIVES, Server)
@ChangeRequest.applies(Kind.STOP_ARCHIVING, Server)
def apply_server_fields(server, change):
    for field, values in change.changes.items():
        setattr(server, field, values["to"])
    server.save(update_fields=list(change.changes))
    journal.record(
        "server_changed", actor=approved_actor(change), obj=server, fields=sorted(change.changes), change=change.pk
    )


@ChangeRequest.applies(Kind.FEWER_CRITICAL_TABLES, Database)
def apply_fewer_critical_tables(database, change):
    take_off(database, change.changes["critical_tables_taken_off"]["to"], approved_actor(change))


@ChangeRequest.applies(Kind.DISABLE_SERVER, Server)
def apply_disable_server(server, change):
    server.enabled = False
    server.save(update_fields=["enabled"])
    journal.record("server_changed", actor=approved_actor(change), obj=server, fields=["enabled"], change=change.pk)


# --- Which databases are backed up -----------------------------------------------------------


def backing_up_fewer(stored, protect_databases, dsn):
    """The change of `stored`'s databases to back up to `protect_databases` (with `dsn`, whose
    database "" means), when it leaves out a database backed up now, as {"protect_databases":
    {"from": what is backed up until it is approved (the old choice and the new together), "to":
    the new choice}, "left out": {"from": their names, "to": "no backups"}}; {} when it covers
    every one (it applies at once)."""
    left_out, names = _left_out(stored, protect_databases, dsn)
    if not left_out:
        return {}
    old = parse_protect_databases(stored.protect_databases)
    meanwhile = ALL_DATABASES if old == ALL_DATABASES else _as_choice([*(old or [stored.dbname]), *names])
    if meanwhile is None:
        raise ValidationError(
            f"This leaves out {', '.join(left_out)}, and what is backed up until another person approves (the "
            "databases before and after together) cannot be written as a list: a name holding a comma or "
            "reading 'all', or more than the field holds. Name the databases to back up explicitly first, alone."
        )
    return {
        "protect_databases": {"from": meanwhile, "to": protect_databases},
        "left out": {"from": ", ".join(left_out), "to": "no backups"},
    }


def _left_out(stored, protect_databases, dsn):
    """(the databases `stored` backs up now that the choice would not, the names it covers). Backed
    up now: the rows discovery marked protected, and the names its stored choice gives (a name
    chosen while the cluster could not be listed has no row yet)."""
    new = parse_protect_databases(protect_databases)
    if stored.pk is None or new == ALL_DATABASES:
        return [], []
    names = new or [Server(dsn=dsn).dbname]
    backed_up = set(
        stored.databases.filter(protected=True).exclude(state=Database.State.GONE).values_list("name", flat=True)
    )
    chosen = parse_protect_databases(stored.protect_databases)
    if chosen != ALL_DATABASES:
        backed_up |= set(chosen or [stored.dbname])
    return sorted(backed_up - set(names)), names


def _as_choice(names):
    """The value of protect_databases that names exactly `names` (once each), or None."""
    names = list(dict.fromkeys(names))
    text = ",".join(names)
    if len(text) > Server._meta.get_field("protect_databases").max_length:
        return None
    try:
        return text if parse_protect_databases(text) == names else None
    except ValidationError:
        return None


@ChangeRequest.applies(Kind.BACK_UP_FEWER, Server)
def apply_back_up_fewer(server, change):
    # What it leaves out is judged again: a database added, or the DSN moved, since the request
    # was asked for would otherwise stop being backed up without anyone approving that.
    to, asked = change.changes["protect_databases"]["to"], change.changes["left out"]["from"].split(", ")
    more = sorted(set(_left_out(server, to, server.dsn)[0]) - set(asked))
    if more:
        raise ValidationError(
            f"{server} would now also stop backing up {', '.join(more)}, which this request did not name (its "
            "databases or DSN changed since): reject it, and ask again."
        )
    server.protect_databases = to
    server.save(update_fields=["protect_databases"])
    journal.record(
        "server_changed",
        actor=approved_actor(change),
        obj=server,
        fields=["protect_databases"],
        change=change.pk,
        left_out=change.changes["left out"]["from"],
    )
    try:
        discover(server, actor=approved_actor(change))
    except psycopg.Error:
        pass  # the cluster does not answer now: the next logical pass looks again


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
    into one month still leave the other eleven without a backup. Neither counts what the
    window's edges make of a shifted schedule (FIRINGS_SLACK, GAP_SLACK_PCT): one firing fewer is
    judged by the longest gap alone ("twice a year" to "once" waits by it), and a gap is longer
    when it grows by more than GAP_SLACK_PCT (a day's from 1 day to 2 does)."""
    fired = firings(old, YEAR_DAYS, now), firings(new, YEAR_DAYS, now)
    gap = longest_gap(old, YEAR_DAYS, now), longest_gap(new, YEAR_DAYS, now)
    longer = gap[1] * 100 > gap[0] * (100 + GAP_SLACK_PCT)
    changes = {}
    if fired[1] < fired[0] - FIRINGS_SLACK or (longer and fired[1] < fired[0]):
        changes[f"firings in {YEAR_DAYS} days"] = {"from": fired[0], "to": fired[1]}
    if longer:
        changes["longest gap"] = {"from": duration_words(gap[0]), "to": duration_words(gap[1])}
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
    same = BackupRun.objects.good().filter(server=run.server_id, kind=run.kind, database=run.database_id)
    if same.order_by("-finished_at", "-pk").values_list("pk", flat=True).first() == run.pk:
        return (
            f"Backup #{run.pk} is the newest good {run.kind} backup of {run.server}"
            + (f" ({run.database.name})" if run.database_id else "")
            + ": nothing deletes the last good backup; take a newer one first."
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
    behind the form's back (a sandbox deleted, a DSN edited in a shell) is asked for again too;
    one whose move already waits for a DBA (destination_moved) is not asked for twice."""
    if stored.pk is None and chosen is None:
        return {}  # a new server's own destination is approved with it (Server.save)
    receiving = chosen or stored
    destination = receiving.destination
    if chosen is None and stored.sandbox_server_id is None and destination is None:
        return {}  # its own DSN cannot be read: nothing connects with it, nothing to approve
    if getattr(chosen, "pk", None) == stored.sandbox_server_id and (
        destination == stored.sandbox_destination or move_waiting(receiving, destination)
    ):
        return {}
    return {
        "sandbox": {"from": _sandbox_name(stored.sandbox_server), "to": _sandbox_name(chosen)},
        "sandbox_destination": {"from": stored.sandbox_destination or "none", "to": destination},
    }


def _sandbox_name(server):
    return server.name if server is not None else NO_SANDBOX


def destination_moved(stored, dsn):
    """{"sandbox_destination": {"from", "to"}} when `dsn` moves `stored`, a server restore tests
    restore into, to another HOST:PORT; else {} (a new server, one no restore test reaches, or one
    moved back where they were approved to go). The DSN itself applies at once: what waits for a
    DBA is the restore tests going there."""
    new = destination_of(dsn)
    if stored.pk is None or new in (None, stored.destination):
        return {}
    if not stored.restore_tests_from().exclude(sandbox_destination=new).exists():
        return {}
    return {"sandbox_destination": {"from": stored.destination or "none", "to": new}}


def move_waiting(server, destination):
    """A move of `server` to `destination` waits for a DBA: its approval makes it the destination."""
    pending = ChangeRequest.objects.pending().filter(kind=Kind.MOVE_SANDBOX, target_id=server.pk)
    return pending.filter(changes__sandbox_destination__to=destination).exists()


@ChangeRequest.applies(Kind.SET_SANDBOX, Server)
def apply_sandbox(server, change):
    name, approved = change.changes["sandbox"]["to"], change.changes["sandbox_destination"]["to"]
    chosen = None if name == NO_SANDBOX else Server.objects.filter(name=name).first()
    if name != NO_SANDBOX and chosen is None:
        raise ValidationError(f"Server {name} no longer exists: reject change request #{change.pk} and ask again.")
    if approved is None:  # asked for before the form refused a DSN that cannot be read
        raise ValidationError(f"The DSN of {chosen or server} cannot be read: reject change request #{change.pk}.")
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
    if "sandbox_destination" not in change.changes:
        # Asked for when a move held its DSN back: that DSN never applied.
        raise ValidationError(
            f"Change request #{change.pk} is from before a move's DSN applied at once: reject it and move {server} again."
        )
    approved = change.changes["sandbox_destination"]["to"]
    if server.destination != approved:
        raise ValidationError(
            f"{server} now points at {server.destination}, not {approved} as asked: reject change request "
            f"#{change.pk} and ask again."
        )
    receiving = list(server.restore_tests_from())
    Server.objects.filter(pk__in=[r.pk for r in receiving]).update(sandbox_destination=approved)
    for other in receiving:
        journal.record(
            "server_changed", actor=approved_actor(change), obj=other, fields=["sandbox_destination"], change=change.pk
        )
