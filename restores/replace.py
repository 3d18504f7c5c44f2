"""Replacing a production database from a backup, the safe way round.

The strategy drops production first, so a failed restore leaves nothing. Here: restore into a
new database, validate it, take a safety backup of production, and only then swap the names
in one transaction. If any step fails, production is exactly as it was; the previous
database is kept under another name for the DBA to drop when satisfied.
"""

import re

import psycopg
from django.utils import timezone
from psycopg import sql

from backupportal import journal
from backups.models import BackupRun
from backups.pipeline import BackupFailed
from backups.runner import RunRefused, beating, claim, execute
from backups.storage import StorageError
from restores import targetdb
from restores.logical import RestoreFailed, finish, restore_into, unexpected
from restores.models import Interrupted, RestoreRequest, RestoreRun
from restores.targetdb import database_exists, dropped
from restores.validation import run_checks


class NotApproved(Exception):
    """No approved request lets this replacement run: nothing was touched; the message says why."""


def approved_request(run, request_id, actor="job:restore"):
    """The approved request to replace production from `run`, started (it runs once); NotApproved else."""
    if not request_id:
        raise NotApproved("replacing production needs an approved request: --request ID (request it in the portal)")
    request = RestoreRequest.objects.filter(pk=request_id).first()
    if request is None:
        raise NotApproved(f"there is no restore request #{request_id}")
    if request.destination != RestoreRequest.Destination.REPLACE or request.backup_run_id != run.pk:
        raise NotApproved(f"request #{request_id} does not approve replacing production from run #{run.pk}")
    if moved := request.destination_moved():  # approved for another place than the DSN reaches now
        raise NotApproved(f"{moved}: nothing was restored; ask for the restore again and have another DBA approve it")
    if not request.start(actor):
        raise NotApproved(
            request.expired_because or f"request #{request_id} is {request.status}: only an approved request runs, once"
        )
    run.server = request.restores_into()  # held there: a DSN moved from now on fails to connect
    return request


def replace_production(run, request, actor):
    server = run.server
    prod = run.database_name  # the database this run is of, on the server it came from
    new, old = working_names(prod, timezone.localtime().strftime("%Y%m%d%H%M%S"))
    restore = RestoreRun.begin(
        RestoreRun.Kind.REPLACE,
        actor,
        server=server,
        backup_run=run,
        request=request,
        into_server=server,
        into_database=prod,
    )
    journal.record(
        "restore_started", actor=actor, obj=restore, server=server.name, run=run.pk, replace=prod, request=request.pk
    )
    notes = []
    try:
        with beating(restore):
            _refuse_slots(server, prod)  # before the hours of a restore, and again at the swap
            if database_exists(server, old):  # production's name once swapped: taken, the swap would fail
                raise RestoreFailed(f"a database {old} exists already on {server}: rename or drop it, and ask again")
            # What restores.orphans settles if this process dies: the copy before the swap, production after.
            restore.leaves(database=new, kept_as=old, at=server.destination)
            notes += restore_into(run, server, new, restore, advice=lambda sub, slot: _resume(sub, slot, prod, old))
            try:
                _validate(run, server, new)
                safety = _safety_backup(run, actor, restore)
                notes.append(f"safety backup of {prod}: run #{safety.pk}")
                _swap(server, prod, new, old, restore)
            except BaseException as e:
                left = dropped(server, new)
                if left and isinstance(e, RestoreFailed):
                    more = RestoreFailed(f"{e}; {left}")
                    more.production_changed = getattr(e, "production_changed", False)
                    raise more from None
                raise
    except (RestoreFailed, StorageError, BackupFailed) as e:  # BackupFailed: the tools' refusals, as run_logical
        restore.notes = "; ".join(notes)
        _close_request(request, failed=True)
        unchanged = "" if getattr(e, "production_changed", False) else f"; production {prod} is unchanged"
        return finish(restore, actor, error=f"{e}{unchanged}")
    except Exception as e:  # noqa: BLE001 - never a run left "running"; where it stopped is not known here
        restore.notes = "; ".join(notes)
        _close_request(request, failed=True)
        return finish(restore, actor, error=f"{unexpected(e)}: check production {prod} and its kept copies")
    notes.append(f"{prod} now holds run #{run.pk}; the previous database is kept as {old}")
    restore.notes = "; ".join(notes)
    _close_request(request, failed=False)
    return finish(restore, actor)


def working_names(prod, stamp):
    """The restored copy's name and the one production is kept under. Production's name may be
    anything ("Sales-Ä"); these keep of it only its lower-case ASCII letters, digits and _, so a
    DBA can type them, and stay within 63 bytes. Quoted as identifiers wherever used."""
    plain = re.sub(r"[^a-z0-9_]", "", prod.lower())[:40] or "db"
    return f"{plain}_restore_{stamp}", f"{plain}_before_{stamp}"


def _resume(sub, slot, prod, old):
    """The warning for a subscription production gets back from the backup: detached from its
    slot (restores.targetdb.detach_all), so production no longer replicates."""
    return (
        f"PRODUCTION {prod} DOES NOT REPLICATE: its subscription {sub} came back from the backup disabled and"
        f" detached from slot {slot}, which was not touched on the publisher. To resume, in {prod}:"
        f" ALTER SUBSCRIPTION {sub} SET (slot_name = '{slot}'); ALTER SUBSCRIPTION {sub} ENABLE."
        f" The previous database {old} was detached from that slot at the swap: it can be dropped without"
        " touching the publisher"
    )


def _validate(run, server, dbname):
    failures = [c for c in run_checks(run, server, dbname) if not c["ok"]]
    if failures:
        raise RestoreFailed(
            "validation of the restored copy failed: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failures)
        )


def _safety_backup(restoring, actor, restore):
    """A backup of the database about to be replaced, taken first: the way back."""
    server = restoring.server
    try:
        run = claim(
            server,
            BackupRun.Kind.LOGICAL,
            database=restoring.database,
            trigger=BackupRun.Trigger.MANUAL,
            actor=f"{actor} (safety, restore #{restore.pk})",
        )
    except RunRefused as e:
        raise RestoreFailed(f"cannot take the safety backup: {e}") from None
    run = execute(run)
    if run.status != BackupRun.Status.SUCCEEDED:
        raise RestoreFailed(f"the safety backup of production failed (run #{run.pk}): {run.error}")
    return run


def _swap(server, prod, new, old, restore):
    """Rename production away and the restored copy in, in one transaction. Should the renames
    fail (a prepared transaction holds production, a session cannot be ended), production gets
    back its connections and its subscriptions' slots: it is then as it was."""
    _refuse_slots(server, prod)
    detached = _detach_before_swap(server, prod)
    try:  # should this process die from here, restores.orphans opens production and reattaches them
        restore.leaves(**restore.left, closing=True, detached=detached)
    except Interrupted:
        _reattach(server, prod, detached, RestoreFailed(""))
        raise
    try:
        with targetdb.writable(server) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(prod)))
            for db in (prod, new):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    [db],
                )
            with conn.transaction():
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(prod), sql.Identifier(old))
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new), sql.Identifier(prod))
                )
    except psycopg.Error as e:
        # The session that failed may have done more than it heard back: the catalog says.
        if _renamed(server, old, new):
            return  # the renames committed: production is the restored copy, as asked
        failure = RestoreFailed(f"swapping the databases failed: {str(e).splitlines()[0]}")
        _reopen(server, prod, failure)
        _reattach(server, prod, detached, failure)
        raise failure from None


def _renamed(server, old, new):
    """Did the swap's renames commit: production kept as `old`, and the restored copy `new` gone
    (renamed to production's name)? A database already called `old` alone proves nothing. False
    when it cannot be told."""
    try:
        with targetdb.writable(server) as conn:
            names = {row[0] for row in conn.execute(
                "SELECT datname FROM pg_catalog.pg_database WHERE datname IN (%s, %s)", [old, new]
            )}  # fmt: skip
            return names == {old}
    except psycopg.Error:
        return False


def _reopen(server, prod, failure):
    """Production takes connections again after a swap that did not happen (on a new session: the
    one that closed it may be the one that failed; whether it was closed is not known then, and
    opening it again is harmless). When it cannot, `failure` says so."""
    try:
        with targetdb.writable(server) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(prod)))
    except psycopg.Error as e:
        quoted = sql.Identifier(prod).as_string(None)
        _production_changed(
            failure,
            f"PRODUCTION {prod} MAY TAKE NO CONNECTIONS: it is closed for the swap, and could not be opened again"
            f" ({str(e).splitlines()[0]}): run ALTER DATABASE {quoted} ALLOW_CONNECTIONS true",
        )


def _refuse_slots(server, prod):
    """A logical replication slot belongs to its database, not to its name: renamed away, production
    would keep its slots in the kept copy, closed to connections, its subscribers cut off and its
    WAL held on the cluster until the disk fills. Refused while production has one."""
    try:
        with targetdb.writable(server) as conn:
            slots = [
                name
                for (name,) in conn.execute(
                    "SELECT slot_name FROM pg_catalog.pg_replication_slots WHERE database = %s ORDER BY 1", [prod]
                )
            ]
    except psycopg.Error as e:
        raise RestoreFailed(
            f"the replication slots of {server} could not be listed: {str(e).splitlines()[0]}"
        ) from None
    if slots:
        raise RestoreFailed(
            f"production {prod} has logical replication slots ({', '.join(slots)}): they belong to the database, "
            "and would stay with the copy kept under another name, cutting off their subscribers and holding WAL. "
            "Move the subscribers and drop the slots first, then ask for the restore again"
        )


def _detach_before_swap(server, prod):
    """Production's subscriptions let go of their slots before it is renamed away: the kept
    database, closed to connections from then on, could be neither detached later nor dropped
    without dropping production's slot on the publisher. Returns (name, slot, enabled) of each
    detached, for _reattach; production stays as it was if this fails."""
    detached = []
    try:
        with server.connect(prod) as conn:
            for subscription in [row for row in targetdb.in_database(conn) if row[1] is not None]:
                targetdb.detach(conn, subscription[0])
                detached.append(subscription)
    except psycopg.Error as e:
        failure = RestoreFailed(
            f"the subscriptions of {prod} could not be detached from their slots before the swap ({str(e).splitlines()[0]}):"
            " the portal's role must own them or be a superuser"
        )
        _reattach(server, prod, detached, failure)
        raise failure from None
    return detached


def _reattach(server, prod, detached, failure):
    """Give production's subscriptions back their slots (and enable those that were) after a
    swap that did not happen. When that fails too, `failure` says so, and what to run."""
    if not detached:
        return
    try:
        with server.connect(prod) as conn:
            for name, slot, enabled in detached:
                subscription = sql.Identifier(name)
                conn.execute(
                    sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = {})").format(subscription, sql.Literal(slot))
                )
                if enabled:
                    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(subscription))
    except psycopg.Error as e:
        resume = " ".join(
            f"ALTER SUBSCRIPTION {sql.Identifier(name).as_string(None)} SET (slot_name = '{slot}');"
            + (f" ALTER SUBSCRIPTION {sql.Identifier(name).as_string(None)} ENABLE;" if enabled else "")
            for name, slot, enabled in detached
        )
        _production_changed(
            failure,
            f"PRODUCTION {prod} DOES NOT REPLICATE: its subscriptions were detached from their slots for the swap"
            f" and could not be given them back ({str(e).splitlines()[0]}): in {prod}, {resume}",
        )


def _production_changed(failure, said):
    """`failure` goes on to say what was left changed in production; the run then never adds that
    production is unchanged (replace_production)."""
    failure.args = (f"{failure}; {said}",)
    failure.production_changed = True


def _close_request(request, failed):
    request.status = RestoreRequest.Status.FAILED if failed else RestoreRequest.Status.SUCCEEDED
    request.save(update_fields=["status"])
