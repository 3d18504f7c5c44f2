"""Clusters restored on the host that runs restores (the portal's, or the restore worker's with
RESTORE_CLUSTER): sandboxes of approved PITR requests, throwaway clusters of base-backup
restore tests.

Both live under SANDBOX_ROOT, each in its own directory owned by the database OS user with
mode 0700 (the root is only traversable, not listable). A sandbox of a request is left
running for the DBA who asked for it; a restore test's cluster is stopped and removed
whatever happens, and one left by a killed worker is removed by the next test. Only a process
on the sandbox's host may say what state it is in, stop or remove it (on_this_host).
"""

import logging
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from django_q.conf import Conf

from backupportal import journal
from backupportal.lib.osuser import free_port, remove_tree
from backupportal.models import JournalEntry
from backups.binaries import pg_ctl, server_major
from restores import pitr
from restores.models import RestoreRun

THROWAWAY_PREFIX = "restoretest-"

log = logging.getLogger(__name__)


def sandbox_root() -> Path:
    root = Path(settings.SANDBOX_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    # Traversable by the postgres OS user (it runs the clusters), listable by nobody else.
    os.chmod(root, 0o711)
    return root


def target_for(base_run=None, target_time=None) -> pitr.Target:
    """A request names a time, or a base backup: recovery then stops where that backup is consistent."""
    if target_time:
        return pitr.Target("time", target_time, timezone.localtime(target_time).isoformat(sep=" "))
    return pitr.Target("lsn", base_run.end_lsn, f"the end of base backup #{base_run.pk} (LSN {base_run.end_lsn})")


def check_target(server, target):
    """What can be refused when the request is made: no base backup, or a time before the oldest one."""
    pitr.choose_base(pitr.good_bases(server), target)


def restore_request(request, actor):
    """Run an approved sandbox request: PITR into a new cluster under SANDBOX_ROOT, left running."""
    datadir = sandbox_root() / f"request-{request.pk}-{timezone.localtime():%Y%m%d%H%M%S}"
    target = target_for(request.backup_run, request.target_time)
    try:
        plan = pitr.make_plan(request.server, target, str(datadir), free_port())
    except pitr.Refused as e:
        # Refused at run time (say, the WAL chain lost a segment since the request): the
        # request fails with the reason on its page, and nothing was written.
        run = RestoreRun.objects.create(
            kind=RestoreRun.Kind.PITR,
            status=RestoreRun.Status.FAILED,
            server=request.server,
            request=request,
            target=target.text,
            requested_by=actor,
            started_at=timezone.now(),
            finished_at=timezone.now(),
            error=f"refused: {e}",
        )
        journal.record(
            "pitr_refused", actor=actor, obj=run, server=request.server.name, outcome="refused", reason=str(e)
        )
        return run
    result = pitr.run_plan(plan, actor, request=request)
    return RestoreRun.objects.get(pk=result["id"])


def throwaway_datadir(test) -> Path:
    """A private directory for a restore test's cluster; the name carries our pid for clear_leftovers."""
    clear_leftovers()
    scratch = Path(tempfile.mkdtemp(prefix=f"{THROWAWAY_PREFIX}{os.getpid()}-{test.pk}-", dir=sandbox_root()))
    # Root's and traversable: only the cluster's own directory (made by the restore) is the
    # database OS user's, which could otherwise rename it and put a link in its place.
    os.chmod(scratch, 0o711)
    return scratch / "data"


def clear_leftovers():
    """Clusters of restore tests whose worker died (its pid is gone): stopped and removed."""
    for leftover in sandbox_root().glob(f"{THROWAWAY_PREFIX}*"):
        pid = leftover.name[len(THROWAWAY_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove_throwaway(leftover / "data")


def remove_throwaway(datadir: Path):
    """Stop the cluster (if it runs) and remove its directory."""
    if (datadir / "postmaster.pid").exists():
        pg_ctl(datadir, "stop", "-m", "immediate", "-w")
    remove_tree(datadir.parent, ignore_errors=True)


# --- Sandboxes of requests: their state, stopping and removing them, expiry. ----------------


def request_sandboxes():
    """Restores of requests that left a cluster for a DBA (whether or not it still exists)."""
    from restores.models import RestoreRun

    return RestoreRun.objects.filter(
        kind=RestoreRun.Kind.PITR, status=RestoreRun.Status.SUCCEEDED, request__isnull=False
    ).exclude(into_datadir="")


def existing():
    """(restore, state) of every request sandbox still on this host's disk, the oldest first."""
    runs = request_sandboxes().select_related("server").order_by("finished_at")
    return [(run, s) for run in runs if is_sandbox(run) and on_this_host(run) and (s := state(run)) != "removed"]


def is_sandbox(run) -> bool:
    """Only a request's cluster directly under SANDBOX_ROOT is ours to remove, never a DBA's own
    --into-datadir."""
    datadir = Path(run.into_datadir) if run.into_datadir else None
    return (
        run.kind == RestoreRun.Kind.PITR
        and run.succeeded  # a failed one removed what it wrote: it left none
        and run.request_id is not None
        and datadir is not None
        and datadir.parent == Path(settings.SANDBOX_ROOT)
    )


def on_this_host(run) -> bool:
    """Whether this process can look at the sandbox. With a restore worker (RESTORE_CLUSTER) the
    sandbox is made on its host, whose SANDBOX_ROOT another host cannot see: there a missing
    directory says nothing. Its host is the one the restore recorded; a restore from before
    hosts were recorded ran on the restore worker."""
    if not settings.RESTORE_CLUSTER:
        return True  # one host: the portal's
    if run.host:
        return run.host == socket.gethostname()
    return Conf.CLUSTER_NAME == settings.RESTORE_CLUSTER


def where(run) -> str:
    """The host a sandbox is on, for pages and errors (restores before hosts were recorded: none)."""
    return run.host or "the restore host"


# pg_ctl status exits 0 when the postmaster runs and 3 when none does; anything else (4: no
# accessible data directory, 1: an unreadable postmaster.pid) means pg_ctl could not tell.
PG_CTL_STATUS = {0: "running", 3: "stopped"}


def look(run) -> tuple[str, str]:
    """(state, what pg_ctl or the journal said). state is "running", "stopped" (its directory is
    still there), "removed", "unknown" (pg_ctl could not tell) or "elsewhere" (on another host)."""
    datadir = Path(run.into_datadir)
    if not on_this_host(run):
        # The journal is shared: a removal done on the sandbox's host is known here too.
        if journal_says_removed(run):
            return "removed", "the journal records its removal"
        return "elsewhere", f"on {where(run)}: its state is seen there only"
    # The directory itself can be stat'ed (SANDBOX_ROOT is traversable); inside it is the
    # postgres OS user's, so pg_ctl (run as that user) answers whether the postmaster lives.
    try:
        if not datadir.exists():
            return "removed", f"{datadir} does not exist"
        status = pg_ctl(datadir, "status", major=server_major(run.server))
    except OSError as e:  # SANDBOX_ROOT unreadable, no pg_ctl of its version
        return "unknown", str(e)
    said = (status.stderr.strip() or status.stdout.strip()).splitlines()
    return PG_CTL_STATUS.get(status.returncode, "unknown"), f"exit {status.returncode}: {' '.join(said)}"


def state(run) -> str:
    """Asked of the filesystem and pg_ctl, not recorded: a sandbox stopped by hand shows stopped."""
    return look(run)[0]


def journal_says_removed(run) -> bool:
    return JournalEntry.objects.filter(
        action="sandbox_removed", object_type=RestoreRun._meta.label, object_id=str(run.pk)
    ).exists()


def may_remove(run, user) -> bool:
    """Only the DBA who asked for the sandbox and the one who approved it remove it from its page:
    they know whether anyone still works in it. Expiry removes it regardless."""
    return user.pk in (run.request.requested_by_id, run.request.decided_by_id)


class NotRemoved(OSError):
    """The sandbox was left as it is; the message says why."""


def stop_and_remove(run, actor, reason):
    """Stop the sandbox's postmaster (fast: sessions are ended, nothing is kept) and remove its
    directory; journaled. Returns False when there was nothing left to remove."""
    if not is_sandbox(run):
        raise ValueError(f"restore #{run.pk} did not leave a sandbox under SANDBOX_ROOT: nothing of it is removed")
    if not on_this_host(run):
        raise NotRemoved(f"the sandbox of restore #{run.pk} is on {where(run)}, not here: remove it there")
    datadir = Path(run.into_datadir)
    was, said = look(run)
    if was == "removed":
        if not journal_says_removed(run):  # gone by hand, or with its container: the pages elsewhere learn it
            _journal_removed(run, actor, reason, datadir, was="missing")
        return False
    if was == "unknown":
        # Never rmtree what might be a live cluster: pg_ctl must say running or stopped first.
        raise NotRemoved(f"pg_ctl cannot tell whether the sandbox in {datadir} runs ({said}): nothing was removed")
    if was == "running":
        stopped = pg_ctl(datadir, "stop", "-m", "fast", "-w", major=server_major(run.server))
        if stopped.returncode != 0 and state(run) != "stopped":
            raise NotRemoved(f"pg_ctl could not stop the sandbox in {datadir}: {stopped.stderr.strip()}")
    try:
        remove_tree(datadir)
    except OSError as e:  # the copy's superuser adding files as it goes, say: expire() goes on to the next
        raise NotRemoved(f"the sandbox in {datadir} was stopped but could not be removed ({e}): try again") from None
    _journal_removed(run, actor, reason, datadir, was)
    return True


def _journal_removed(run, actor, reason, datadir, was):
    journal.record(
        "sandbox_removed",
        actor=actor,
        obj=run,
        server=run.server.name,
        request=run.request_id,
        datadir=str(datadir),
        port=run.port,
        was=was,
        reason=reason,
    )


def expires_at(run):
    return run.finished_at + timedelta(seconds=settings.SANDBOX_MAX_AGE) if run.finished_at else None


def expire(actor="job:sandboxes", now=None):
    """Stop and remove the sandboxes older than SANDBOX_MAX_AGE: a forgotten cluster would hold
    its disk, its port and a copy of production data for ever. Returns what was removed."""
    max_age = settings.SANDBOX_MAX_AGE
    cutoff = (now or timezone.now()) - timedelta(seconds=max_age)
    removed = []
    for run in request_sandboxes().filter(finished_at__lt=cutoff).select_related("server").order_by("finished_at"):
        if not (is_sandbox(run) and on_this_host(run)):
            continue
        try:
            if stop_and_remove(run, actor, f"older than SANDBOX_MAX_AGE ({max_age // 3600} h)"):
                removed.append(run)
        except NotRemoved as e:
            # One sandbox pg_ctl cannot judge must not keep the others running: tried again next hour.
            log.warning("sandbox of restore #%s not expired: %s", run.pk, e)
    return removed
