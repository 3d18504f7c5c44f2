"""Clusters restored on the portal's host: sandboxes of approved PITR requests, throwaway
clusters of base-backup restore tests.

Both live under SANDBOX_ROOT, each in its own directory owned by the database OS user with
mode 0700 (the root is only traversable, not listable). A sandbox of a request is left
running for the DBA who asked for it; a restore test's cluster is stopped and removed
whatever happens, and one left by a killed worker is removed by the next test.
"""

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from backupportal import journal
from backupportal.lib.osuser import chown_to_db_user, free_port
from backups.binaries import pg_ctl, server_major
from restores import pitr
from restores.models import RestoreRun

THROWAWAY_PREFIX = "restoretest-"


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
    chown_to_db_user(scratch)
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
    shutil.rmtree(datadir.parent, ignore_errors=True)


# --- Sandboxes of requests: their state, stopping and removing them, expiry. ----------------


def request_sandboxes():
    """Restores of requests that left a cluster for a DBA (whether or not it still exists)."""
    from restores.models import RestoreRun

    return RestoreRun.objects.filter(
        kind=RestoreRun.Kind.PITR, status=RestoreRun.Status.SUCCEEDED, request__isnull=False
    ).exclude(into_datadir="")


def existing():
    """(restore, state) of every request sandbox still on disk, the oldest first."""
    runs = request_sandboxes().select_related("server").order_by("finished_at")
    return [(run, s) for run in runs if is_sandbox(run) and (s := state(run)) != "removed"]


def is_sandbox(run) -> bool:
    """Only a request's cluster directly under SANDBOX_ROOT is ours to remove, never a DBA's own
    --into-datadir."""
    datadir = Path(run.into_datadir) if run.into_datadir else None
    return (
        run.kind == RestoreRun.Kind.PITR
        and run.request_id is not None
        and datadir is not None
        and datadir.parent == Path(settings.SANDBOX_ROOT)
    )


def state(run) -> str:
    """ "running", "stopped" (its directory is still there) or "removed"."""
    datadir = Path(run.into_datadir)
    # The directory itself can be stat'ed (SANDBOX_ROOT is traversable); inside it is the
    # postgres OS user's, so pg_ctl (run as that user) answers whether the postmaster lives.
    if not datadir.exists():
        return "removed"
    return "running" if pg_ctl(datadir, "status", major=server_major(run.server)).returncode == 0 else "stopped"


def stop_and_remove(run, actor, reason):
    """Stop the sandbox's postmaster (fast: sessions are ended, nothing is kept) and remove its
    directory; journaled. Returns False when there was nothing left to remove."""
    if not is_sandbox(run):
        raise ValueError(f"restore #{run.pk} did not leave a sandbox under SANDBOX_ROOT: nothing of it is removed")
    datadir = Path(run.into_datadir)
    if not datadir.exists():
        return False
    was = state(run)
    if was == "running":
        stopped = pg_ctl(datadir, "stop", "-m", "fast", "-w", major=server_major(run.server))
        if stopped.returncode != 0 and state(run) == "running":
            raise OSError(f"pg_ctl could not stop the sandbox in {datadir}: {stopped.stderr.strip()}")
    shutil.rmtree(datadir)
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
    return True


def expires_at(run):
    return run.finished_at + timedelta(seconds=settings.SANDBOX_MAX_AGE) if run.finished_at else None


def expire(actor="job:sandboxes", now=None):
    """Stop and remove the sandboxes older than SANDBOX_MAX_AGE: a forgotten cluster would hold
    its disk, its port and a copy of production data for ever. Returns what was removed."""
    max_age = settings.SANDBOX_MAX_AGE
    cutoff = (now or timezone.now()) - timedelta(seconds=max_age)
    removed = []
    for run in request_sandboxes().filter(finished_at__lt=cutoff).select_related("server").order_by("finished_at"):
        if is_sandbox(run) and stop_and_remove(run, actor, f"older than SANDBOX_MAX_AGE ({max_age // 3600} h)"):
            removed.append(run)
    return removed
