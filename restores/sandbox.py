"""Clusters restored on the portal's host: sandboxes of approved PITR requests, throwaway
clusters of base-backup restore tests.

Both live under SANDBOX_ROOT, each in its own directory owned by the database OS user with
mode 0700 (the root is only traversable, not listable). A sandbox of a request is left
running for the DBA who asked for it; a restore test's cluster is stopped and removed
whatever happens, and one left by a killed worker is removed by the next test.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from backupportal import journal
from backupportal.lib.pgcluster import as_db_user, chown_to_db_user, free_port, pg_bin
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
        subprocess.run(
            as_db_user([str(pg_bin() / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(datadir)]),
            capture_output=True,
            cwd="/",
            timeout=120,
        )
    shutil.rmtree(datadir.parent, ignore_errors=True)
