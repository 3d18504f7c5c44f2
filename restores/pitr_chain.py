"""A PITR from a chain of block-level incrementals (PostgreSQL 17+): the full base backup the
plan chose, then the newest incremental that ended before the target with every ancestor
between. Each link is decrypted (gpg, zstd) into `tar -x` in a private scratch directory beside
the new data directory, `pg_combinebackup` (the backup's major) rebuilds one data directory
from them, and WAL is replayed from the newest link's start only. The scratch goes whatever
happens; a killed worker's is removed by the orphan sweep (it is in the run's `left`).

A chain with a broken link (a parent gone, failed or deleted, a link or its manifest with no
readable copy) is refused by name at planning: the restore then recovers from the full and
WAL (the plan's check_chain says whether that reaches the target). WAL-chain checks of 15 and
16 are no links: they hold no data. Split from restores/pitr.py.
"""

import os
import secrets
import subprocess
from pathlib import Path

from backupportal import journal
from backupportal.lib.childenv import child_env
from backupportal.lib.osuser import as_db_user_tied, chown_to_db_user, remove_tree
from backups import timelines, walnames
from backups.binaries import backup_major, cluster_tool
from backups.copies import decrypt_here, healthy_copies
from backups.crypto import die_with_parent
from backups.models import BackupRun
from backups.storage import store_for
from backups.streams import readable
from restores.pitr_extract import TarSink, empty, place_manifest
from restores.pitr_plan import RestoreFailed, encryption_of


class BrokenLink(Exception):
    """A link of the chain cannot be used: the message names it."""


def choose_links(plan):
    """plan.links: the incrementals on top of plan.base to combine, oldest first ([] for none)."""
    plan.links = []
    newest = newest_incremental_before(plan)
    if newest is None:
        return
    try:
        plan.links = links_down_to(newest, plan.base, plan.lineage)
    except BrokenLink as e:
        note = (
            f"incremental chain ending with #{newest.pk} refused: {e}; "
            f"recovering from full base backup #{plan.base.pk} and WAL instead"
        )
        plan.notes.append(note)
        plan.report(note)
        journal.record("pitr_chain_refused", actor="job:restore", obj=newest, server=plan.server.name, reason=str(e))


def newest_incremental_before(plan):
    """The newest good block incremental taken after plan.base that is consistent before the target."""
    if plan.target.kind == "name":
        return None  # a restore point's base is found in the WAL, base backup by base backup
    runs = plan.server.runs.good().filter(
        kind=BackupRun.Kind.INCREMENTAL, details__method="block", finished_at__gte=plan.base.finished_at
    )
    before = [r for r in runs.exclude(start_wal="").exclude(end_lsn="") if ends_before(r, plan.target)]
    return max(before, key=lambda r: (r.stop_time, r.pk), default=None)


def ends_before(run, target):
    if target.kind == "time":
        return run.stop_time <= target.value
    if target.kind == "lsn":
        return walnames.lsn_to_int(run.end_lsn) <= walnames.lsn_to_int(target.value)
    return True


def links_down_to(newest, full, lineage=None):
    """newest and its ancestors down to (not including) `full`, oldest first; BrokenLink otherwise,
    as for a link taken on a timeline production has left (`lineage`: production's, as the full
    base backups are chosen by): after a failover to a standby that lagged, its blocks hold
    changes production never had."""
    links, run, seen = [], newest, set()
    while run.kind == BackupRun.Kind.INCREMENTAL:
        if run.pk in seen:
            raise BrokenLink(f"incremental #{run.pk} is its own ancestor in the catalog")
        seen.add(run.pk)
        if lineage is not None and not timelines.on_lineage(lineage, run):
            raise BrokenLink(f"incremental #{run.pk} was taken on timeline {run.timeline}, which production left")
        check_link(run)
        links.append(run)
        run = parent_of(run)
    if run.pk != full.pk:
        raise BrokenLink(f"it builds on base backup #{run.pk}, not on #{full.pk}")
    return links[::-1]


def parent_of(run):
    parent_id = run.parent_run_id
    if not parent_id:
        raise BrokenLink(f"incremental #{run.pk} names no parent")
    parent = BackupRun.objects.filter(pk=parent_id).first()
    if parent is None:
        raise BrokenLink(f"incremental #{run.pk}'s parent #{parent_id} is gone from the catalog")
    if parent.deleted_at is not None:
        raise BrokenLink(f"incremental #{run.pk}'s parent #{parent.pk} was deleted by retention")
    if parent.status != BackupRun.Status.SUCCEEDED:
        raise BrokenLink(f"incremental #{run.pk}'s parent #{parent.pk} is {parent.status}")
    if parent.kind == BackupRun.Kind.INCREMENTAL and parent.method != "block":
        raise BrokenLink(f"incremental #{run.pk}'s parent #{parent.pk} is a WAL-chain check, not a backup")
    return parent


def check_link(run):
    for artifact, what in (("main", "its backup"), ("manifest", "its backup_manifest")):
        if not has_readable_copy(run, artifact):
            raise BrokenLink(f"incremental #{run.pk}: {what} has no healthy copy in any enabled location")


def has_readable_copy(run, artifact):
    # A file is looked at (a stat); object storage is only checked while fetching.
    return any(c.location.kind == "s3" or store_for(c.location).exists(c.key) for c in healthy_copies(run, artifact))


def chain_of(plan):
    return [plan.base, *plan.links]


def combine(plan):
    """The chain rebuilt into plan.datadir (beside the WAL staging directory): FetchFailed when a
    link reads intact from no copy, RestoreFailed when pg_combinebackup refuses."""
    scratch = plan.chain
    scratch.mkdir(mode=0o700)  # never one already there
    try:
        # Root's, traversed by the database OS user (pg_combinebackup reads the links, each its
        # own directory): that user cannot swap a link's directory for a symbolic link while
        # the portal writes into it.
        os.chmod(scratch, 0o711)
        parts = [extract_link(plan, run, scratch) for run in chain_of(plan)]
        # Straight into the data directory (empty, the database OS user's): it is often a mount
        # of its own (/srv/pgdata), which nothing in the scratch beside it could be renamed into.
        run_combinebackup(plan, parts, plan.datadir, link=same_file_system(scratch, plan.datadir))
    except BaseException:
        empty(plan.datadir)  # the full alone is extracted into it next (extract_chain_or_base)
        raise
    finally:
        remove_tree(scratch, ignore_errors=True)
    plan.extracted = None  # pg_combinebackup wrote the files: pg_verifybackup checks them all
    ids = ", ".join(f"#{r.pk}" for r in chain_of(plan))
    plan.notes.append(f"combined the chain {ids} with pg_combinebackup; WAL replayed from #{plan.links[-1].pk}")


def scratch_for(datadir: Path) -> Path:
    """The name of a chain's scratch directory beside `datadir` (the same file system, unless
    `datadir` is a mount of its own: pg_combinebackup then copies), not made yet."""
    return datadir.parent / f".{datadir.name}.chain-{secrets.token_hex(6)}"


def extract_link(plan, run, scratch):
    part = scratch / f"run-{run.pk}"
    part.mkdir(mode=0o700)
    chown_to_db_user(part)
    what = f"{'incremental' if run.kind == BackupRun.Kind.INCREMENTAL else 'base backup'} #{run.pk}"
    copies = readable(run.copies.filter(artifact="main").select_related("location"))
    # Through the page cache: pg_combinebackup reads every file of it back at once.
    sink = TarSink(part, run.base_compression, direct=False)
    plan.notes += decrypt_here(copies, sink, encryption_of(plan), what)
    place_manifest(plan, run, part)
    if not (part / "backup_manifest").exists():
        raise RestoreFailed(f"{what} holds no backup_manifest: pg_combinebackup cannot use it")
    return part


def same_file_system(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def run_combinebackup(plan, parts, output, link=True):
    major = backup_major(plan.base)
    tool = cluster_tool(major, "pg_combinebackup", f"combining the chain of #{plan.base.pk}")
    # 18+: files hard-linked from the unpacked links (`link`: on the output's file system) instead
    # of copied: no second copy of the cluster on disk; the scratch's removal then only drops
    # their names. Across file systems a hard link fails: copied then.
    link = ["--link"] if link and (major or 0) >= 18 else []
    proc = subprocess.run(
        as_db_user_tied([str(tool), *link, *map(str, parts), "-o", str(output)]),
        capture_output=True,
        text=True,
        cwd=parts[0].parent,
        env=child_env(),
        timeout=3600,
        preexec_fn=die_with_parent,  # with as_db_user_tied: never left running on its own
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RestoreFailed(f"pg_combinebackup refused the chain: {lines[0] if lines else 'it failed'}")
    if problem := combine_problem(proc.stderr):
        raise RestoreFailed(problem)


def combine_problem(stderr):
    """What pg_combinebackup only warns of but leaves the combined cluster unreadable ("" when
    nothing): checksums enabled (pg_checksums --enable, offline) between the full and an
    incremental leave the full's pages without them, each failing its check when read."""
    mixed = [line for line in stderr.splitlines() if "only some backups have checksums enabled" in line]
    if not mixed:
        return ""
    return (
        f"pg_combinebackup: {mixed[0].split(':', 1)[-1].strip()}: the combined cluster's pages from the older"
        " backups would fail their checksums; take a new full base backup"
    )
