"""Which databases of a cluster the logical backups dump, kept in step with the cluster.

At registration, before every logical pass and once a day, the portal lists the cluster's
databases. One that the server's choice (protect_databases) covers and that is new gets a row,
and so its backups; until its first one succeeds the monitor alerts. One that was dropped is
marked so and keeps its backups under retention. One the portal's role cannot connect to is
a gap: shown and alerted, never skipped silently.
"""

import psycopg
from django.utils import timezone

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups.models import BackupRun, Database
from backups.models.servers import ALL_DATABASES, parse_protect_databases
from backups.runner import RunRefused, claim, claim_scheduled, execute, finish_failed

# Templates are never dumped; datallowconn = false is a database nobody may connect to.
LIST_SQL = "SELECT datname, datallowconn FROM pg_database WHERE NOT datistemplate ORDER BY datname"


def wanted(server, listed):
    """The names the server's choice covers, given {name: allows connections} of its cluster."""
    choice = parse_protect_databases(server.protect_databases)
    if choice == ALL_DATABASES:
        return [name for name, allows in listed.items() if allows]
    return choice or [server.dbname]


def discover(server, actor="job:databases"):
    """Bring the server's database rows in step with its cluster; returns the protected ones
    that can be backed up now. psycopg.Error when the cluster cannot be listed."""
    with server.connect() as conn:
        listed = dict(conn.execute(LIST_SQL).fetchall())
    names = wanted(server, listed)
    known = {db.name: db for db in server.databases.all()}
    # Every database of the cluster gets a row, chosen or not: the coverage page shows them all.
    for name in [n for n in names if n not in listed] + list(listed):
        if name not in known:
            state = Database.State.PRESENT if name in listed else Database.State.UNREACHABLE
            known[name] = Database.objects.create(server=server, name=name, protected=name in names, state=state)
            if name in names:
                journal.record("database_found", actor=actor, obj=known[name], server=server.name, database=name)
    for db in known.values():
        db.protected = db.name in names
        _set_state(db, *_state_of(server, db, listed), actor=actor)
    return [db for db in known.values() if db.protected and db.state == Database.State.PRESENT]


def _state_of(server, db, listed):
    """(state, problem) of one database as the cluster shows it now."""
    if db.name not in listed:
        # Named by the DBAs but never there: a wrong name. Seen once, or backed up: dropped.
        if db.state == Database.State.UNREACHABLE and not db.runs.exists():
            return Database.State.UNREACHABLE, f"there is no database {db.name} on the cluster: check the name"
        return Database.State.GONE, ""
    if not listed[db.name]:
        return Database.State.UNREACHABLE, f"{db.name} does not allow connections (datallowconn is false)"
    if not db.protected:
        return Database.State.PRESENT, ""
    try:
        server.connect(dbname=db.name).close()
    except psycopg.Error as e:
        return Database.State.UNREACHABLE, explain(e, server)[:500]
    return Database.State.PRESENT, ""


def _set_state(db, state, problem, actor):
    before = (db.state, db.problem)
    db.state, db.problem = state, problem
    if state == Database.State.GONE:
        db.gone_at = db.gone_at or timezone.now()
    else:
        db.gone_at = None
    db.save(update_fields=["protected", "state", "problem", "gone_at"])
    if before != (state, problem) and db.protected:
        journal.record(
            "database_changed",
            actor=actor,
            obj=db,
            server=db.server.name,
            database=db.name,
            was=before[0],
            now=state,
            problem=problem,
            outcome="failed" if state == Database.State.UNREACHABLE else "info",
        )


def protected(server):
    """The server's protected databases that can be backed up, as last discovered."""
    return list(server.databases.filter(protected=True, state=Database.State.PRESENT))


def gaps(server):
    """The server's protected databases that cannot be backed up, as last discovered."""
    return list(server.databases.filter(protected=True, state=Database.State.UNREACHABLE))


def to_back_up(server, only=None):
    """(databases to dump, gaps): after a fresh look at the cluster when it answers, else as
    last seen (then the runs fail saying why). `only`: one database's name, which must be one
    the server backs up; ValueError otherwise."""
    try:
        present = discover(server)
    except psycopg.Error:
        present = protected(server) or [Database.of_dsn(server)]
    missing = gaps(server)
    if only is None:
        return present, missing
    chosen = [db for db in present + missing if db.name == only]
    if not chosen:
        names = ", ".join(db.name for db in present + missing) or "none"
        raise ValueError(
            f"{server} does not back up a database named {only!r} (it backs up: {names}): "
            "add it to the server's databases to back up"
        )
    return [db for db in chosen if db in present], [db for db in chosen if db in missing]


def logical_pass(server, *, trigger, actor, only=None, scheduled_for=None, waiting_since=None):
    """A logical run per database to back up, one after the other; a gap gets a failed run that
    says why, so it is never skipped silently. Returns (runs, queued again). A scheduled pass
    that finds a database's lock taken is queued again whole (runner.claim_scheduled) and
    returns what it ran so far; the next try skips the databases done for that occurrence."""
    present, missing = to_back_up(server, only)
    runs, taken = [], []
    for db in present + missing:
        try:
            if trigger == BackupRun.Trigger.SCHEDULED:
                run = claim_scheduled(
                    server,
                    BackupRun.Kind.LOGICAL,
                    actor=actor,
                    scheduled_for=scheduled_for,
                    waiting_since=waiting_since,
                    database=db,
                )
                if run is None:
                    return runs, True
            else:
                run = claim(server, BackupRun.Kind.LOGICAL, trigger=trigger, actor=actor, database=db)
        except RunRefused as e:
            if trigger != BackupRun.Trigger.SCHEDULED or e.run is None or e.run.database_id != db.pk:
                raise
            taken.append(e)  # this database's run of this occurrence was taken already
            continue
        if db in missing:
            finish_failed(run, f"database {db.name} on {server} cannot be backed up: {db.problem}")
            run.refresh_from_db()
        else:
            run = execute(run)
        runs.append(run)
    if taken and not runs:
        raise taken[-1]  # a second worker handed the same occurrence: it says who took it
    return runs, False
