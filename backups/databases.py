"""Which databases of a cluster the logical backups dump, kept in step with the cluster.

At registration, before every logical pass and once a day, the portal lists the cluster's
databases. One that the server's choice (protect_databases) covers and that is new gets a row,
and so its backups; until its first one succeeds the monitor alerts. One that was dropped is
marked so and keeps its backups under retention. One the portal's role cannot connect to is
a gap: shown and alerted, never skipped silently.
"""

import re
from dataclasses import dataclass, field

import psycopg
from django.utils import timezone

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups.models import BackupRun, Database
from backups.models.servers import ALL_DATABASES, parse_protect_databases
from backups.runner import RunRefused, claim, claim_scheduled, execute, finish_failed

# template0 and template1 are the cluster's own (initdb's), never dumped; a template a DBA made
# (IS_TEMPLATE) holds data like any database and is dumped as pg_dumpall would, restored as one
# (restores.targetdb drops such a copy). datallowconn = false is a database nobody may connect to.
LIST_SQL = (
    "SELECT datname, datallowconn FROM pg_catalog.pg_database"
    " WHERE datname NOT IN ('template0', 'template1') ORDER BY datname"
)


# The portal's own passing databases, never "all" of a cluster: restore tests' scratch databases
# and the two sides of a replace (restores.restoretest, restores.replace).
PORTAL_SCRATCH = re.compile(r"^restoretest_\d+_\d{14}$|_(restore|before)_\d{14}$")


def wanted(server, listed):
    """The names the server's choice covers, given {name: allows connections} of its cluster."""
    choice = parse_protect_databases(server.protect_databases)
    if choice == ALL_DATABASES:
        return [name for name, allows in listed.items() if allows and not PORTAL_SCRATCH.search(name)]
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
            known[name], made = Database.objects.get_or_create(
                server=server, name=name, defaults={"protected": name in names, "state": state}
            )
            if made and name in names:
                journal.record("database_found", actor=actor, obj=known[name], server=server.name, database=name)
    for db in known.values():
        db.protected = db.name in names
        _set_state(db, *_state_of(server, db, listed), actor=actor)
    return [db for db in known.values() if db.protected and db.state == Database.State.PRESENT]


def _state_of(server, db, listed):
    """(state, problem) of one database as the cluster shows it now."""
    if db.name not in listed:
        # Named by the DBAs but never there: a wrong name. Seen once, or backed up: dropped.
        if db.state == Database.State.UNREACHABLE and not db.runs.good().exists():
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
        # Never looked at: the DSN's, whose run says why the cluster did not answer.
        present = protected(server) or ([] if server.databases.exists() else [Database.of_dsn(server)])
    missing = gaps(server)
    if only is None:
        return present, missing
    chosen = [db for db in present + missing if db.name == only]
    dropped = server.databases.filter(name=only, state=Database.State.GONE).first()
    if not chosen and dropped is not None:
        raise ValueError(f"database {only} on {server} was dropped: its backups are kept, there is nothing to back up")
    if not chosen:
        names = ", ".join(db.name for db in present + missing) or "none"
        raise ValueError(
            f"{server} does not back up a database named {only!r} (it backs up: {names}): "
            "add it to the server's databases to back up"
        )
    return [db for db in chosen if db in present], [db for db in chosen if db in missing]


@dataclass
class Pass:
    """What a logical pass did: its runs, the databases refused (a lock held, waited too long),
    those whose run of this occurrence another worker took, and whether it was queued again."""

    runs: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    taken: list = field(default_factory=list)
    queued_again: bool = False


def logical_pass(server, *, trigger, actor, only=None, scheduled_for=None, waiting_since=None, after_each=None):
    """A logical run per database to back up, one after the other; a gap gets a failed run that
    says why, so it is never skipped silently. The first run dumps the cluster's globals, the
    others pair with that file (backups.logical). A scheduled pass that finds a database's lock
    taken is queued again whole (runner.claim_scheduled); the next try skips the databases done
    for that occurrence. `after_each(run)`: its copies, queued as soon as it is done."""
    present, missing = to_back_up(server, only)
    done, globals_run, crashed = Pass(), None, None
    for db in present + missing:
        try:
            run = _claim(server, db, trigger, actor, scheduled_for, waiting_since)
        except RunRefused as e:
            taken = e.run is not None and e.run.database_id == db.pk and scheduled_for is not None
            taken = taken and e.run.details.get("scheduled_for") == scheduled_for
            (done.taken if taken else done.refused).append(str(e))
            continue
        if run is None:
            done.queued_again = True
            break
        if db in missing:
            finish_failed(run, f"database {db.name} on {server} cannot be backed up: {db.problem}")
            run.refresh_from_db()
        else:
            run, globals_run, crashed = _take(run, globals_run, crashed)
        done.runs.append(run)
        if after_each is not None:
            after_each(run)
    if crashed is not None:
        raise crashed  # after the other databases: the bug is on its run too (runner.execute)
    return done


def _claim(server, db, trigger, actor, scheduled_for, waiting_since):
    if trigger == BackupRun.Trigger.SCHEDULED:
        return claim_scheduled(
            server,
            BackupRun.Kind.LOGICAL,
            actor=actor,
            scheduled_for=scheduled_for,
            waiting_since=waiting_since,
            database=db,
        )
    return claim(server, BackupRun.Kind.LOGICAL, trigger=trigger, actor=actor, database=db)


def _take(run, globals_run, crashed):
    """Run one database's backup, paired with the pass's globals file once one was dumped."""
    if globals_run is not None:
        run.details["globals_from"] = globals_run.pk
        run.save(update_fields=["details"])
    try:
        run = execute(run)
    except Exception as e:  # noqa: BLE001  failed on its run already; the others still go
        crashed = crashed or e
        run.refresh_from_db()
    if globals_run is None and run.is_good and "run" not in run.details.get("globals", {}):
        globals_run = run
    return run, globals_run, crashed
