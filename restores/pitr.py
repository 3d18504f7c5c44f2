"""Point-in-time recovery into a new cluster: a base backup, the archived WAL, a target.

    restore --server NAME (--target-time T | --target latest | --target-lsn LSN | --target-name RP)
            --into-datadir DIR --port PORT

Everything that can be refused is refused from the catalog before anything is written (the
data directory's place, production's timeline: pitr_checks). Then: the base backup is streamed
through gpg (and zstd) into `tar -x` while the WAL prefetcher (pitr_prefetch) fetches the first
segments of production's timeline from their first healthy copy, checks their sha256, decrypts
them and reads them for CREATE TABLESPACE (refused) before they appear in the WAL staging
directory (pitr_staging: the portal's, outside DIR);
pg_verifybackup checks the files (and the backup's
WAL) against the manifest; recovery is set up the PostgreSQL 12+ way (recovery.signal,
postgresql.auto.conf: restore_command, recovery_target_*, recovery_target_action = promote)
with archive_mode = off, so the new timeline never reaches the production archive; the cluster
starts as the database OS user and recovers while the prefetcher stays a bounded window ahead
of replay (restore_command is restores/restore_wal.py), promotes, and is left running. Any
failure stops the prefetcher and removes what the restore wrote.

A time target needs a commit after it in the archive: pitr_reach finds one, or has the source
make one (or refuses); a restore point is searched for in the WAL (pitr_points), which decides
the base backup. The run succeeds only when the recovered cluster shows it reached the
target (pitr_verdict); the cluster's start and recovery are in pitr_recovery, the base backup's
extraction and its check against the manifest in pitr_extract.
"""

import logging
import os
import re
import shutil
import socket
import stat
from datetime import datetime, timedelta
from operator import attrgetter

from django.utils import timezone

from backupportal import journal
from backupportal.lib.osuser import db_user_ids, remove_tree
from backups import keyring, walchain, walnames
from backups.copies import decrypt_here, healthy_copies, restorable
from backups.crypto import Encryption, EncryptionError
from backups.models import BackupCopy, WalSegment
from backups.runner import beating
from backups.storage import store_for
from backups.streams import FetchFailed, FileSink, readable
from restores import orphans, pitr_chain, pitr_checks, pitr_points, pitr_reach, pitr_staging
from restores.models import Interrupted, RestoreRun
from restores.pitr_checks import check_datadir
from restores.pitr_extract import Extraction, empty, extract_base, give_back, verify_base
from restores.pitr_plan import Plan, Refused, RestoreFailed, Target, encryption_of
from restores.pitr_prefetch import Prefetch, install
from restores.pitr_reach import partial_for
from restores.pitr_recovery import heartbeat, pg_ctl, start_and_wait, write_recovery_settings

log = logging.getLogger(__name__)

__all__ = ["Plan", "Refused", "RestoreFailed", "Target", "check_datadir"]  # used through this module too

LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


# ----------------------------------------------------------------------------- the command


def plan_for(server, actor, into_datadir=None, port=None, **targets):
    """The plan of a PITR asked for with the command's options (target_time, target, target_lsn,
    target_name); a refusal is journaled and raised (Refused) before anything is written."""
    try:
        return make_plan(server, parse_target(**targets), into_datadir, port)
    except Refused as e:
        given = [t for t in targets.values() if t]
        journal.record(
            "pitr_refused",
            actor=actor,
            obj=server,
            outcome="refused",
            reason=str(e),
            target=given[0] if given else "",
            into_datadir=into_datadir or "",
        )
        raise


def run_plan(plan, actor, request=None, restore_test=None):
    """Restore as planned, leaving the new cluster running; the result dict (failed: exit_code 1)."""
    orphans.remove_leftovers()  # the clusters of dead restores on this host: their ports and disk back
    run = RestoreRun.begin(
        RestoreRun.Kind.PITR,
        actor,
        server=plan.server,
        backup_run=plan.base,
        into_datadir=str(plan.datadir),
        port=plan.port,
        target=plan.target.text,
        request=request,
        restore_test=restore_test,
    )
    journal.record(
        "pitr_started", actor=actor, obj=run, server=plan.server.name, base_run=plan.base.pk, target=run.target
    )
    try:
        with beating(run):
            execute(plan, run)
    except (RestoreFailed, Refused, FetchFailed, OSError, Interrupted) as e:
        if isinstance(e, OSError):  # one line for the DBA; where it came from, for LOG_LEVEL=DEBUG
            log.debug("PITR run #%s failed", run.pk, exc_info=e)
        discard(plan)
        return finish(run, plan, actor, error=str(e))
    except Exception as e:  # a bug must still fail the run visibly and leave nothing behind
        discard(plan)
        finish(run, plan, actor, error=f"internal error: {type(e).__name__}: {e}")
        raise
    return finish(run, plan, actor)


def finish(run, plan, actor, error=""):
    run.recovered_to = plan.recovered.get("recovered_to", "")
    run.backup_run = plan.base
    run.notes = "\n".join(plan.notes)[:5000]
    run.finish(error or None, fields=("backup_run", "notes", "recovered_to"))
    if run.succeeded or error:  # else failed meanwhile by restores.orphans, which journaled it
        journal.record(
            "pitr_succeeded" if run.succeeded else "pitr_failed",
            actor=actor,
            obj=run,
            server=plan.server.name,
            outcome="ok" if run.succeeded else "failed",
            recovered_to=run.recovered_to,
            error=error,
        )
    result = {
        "id": run.pk,
        "status": run.status,
        "duration_s": run.duration_s,
        "server": plan.server.name,
        "base_backup": plan.base.pk,
        "chain": [r.pk for r in pitr_chain.chain_of(plan)],
        "target": run.target,
        "recovered_to": run.recovered_to,
        "into_datadir": run.into_datadir,
        "port": run.port,
        "wal_segments": len(plan.staged),
        "notes": run.notes,
        "error": run.error,
    }
    result.update(plan.recovered)
    if error:
        result["exit_code"] = 1
    return result


# ----------------------------------------------------------------------------- refusals


def parse_target(target_time, target, target_lsn, target_name) -> Target:
    given = [t for t in (target_time, target, target_lsn, target_name) if t]
    if len(given) != 1:
        raise Refused("give exactly one target: --target-time, --target latest, --target-lsn or --target-name")
    if target:
        return Target("latest", None, "latest")
    if target_lsn:
        if not LSN.match(target_lsn):
            raise Refused(f"{target_lsn!r} is not an LSN: write it as 0/3000028")
        return Target("lsn", target_lsn.upper(), f"lsn {target_lsn.upper()}")
    if target_name:
        if len(target_name.encode()) > 63:  # PostgreSQL's MAXFNAMELEN - 1, in bytes
            raise Refused("a restore point name has at most 63 bytes (fewer characters beyond ASCII)")
        return Target("name", target_name, f"restore point {target_name}")
    return Target("time", parse_time(target_time), target_time)


def parse_time(text):
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise Refused(f"cannot read the target time {text!r}: write it as YYYY-MM-DD HH:MM:SS+05:00") from None
    if moment.tzinfo is None:
        raise Refused(f"the target time {text!r} has no timezone: write it with its offset, e.g. {text.strip()}+05:00")
    if abs(moment.utcoffset()) >= timedelta(hours=16):  # Python reads up to 24 h; PostgreSQL up to 15:59
        raise Refused(f"the target time {text!r} has an offset from UTC of 16 hours or more: no time zone has one")
    now = timezone.now()
    if moment > now:
        raise Refused(f"the target time {text} is in the future (now is {timezone.localtime(now):%Y-%m-%d %H:%M:%S%z})")
    return moment


def make_plan(server, target, into_datadir, port, fallback=True) -> Plan:
    """The plan, or Refused. `fallback`: when the base backup the target needs has no healthy
    copy left, use an older one (a restore test, which proves one backup, passes False)."""
    datadir = check_datadir(into_datadir)
    port = check_port(port)
    try:
        Encryption()
    except EncryptionError as e:
        raise Refused(str(e)) from None
    warnings = pitr_checks.ingest_first(server, latest=target.kind == "latest")  # the newest archived WAL first
    bases = good_bases(server)
    size = bases[-1].details.get("wal_segment_size") or server.wal_segment_size
    lineage, bases, notes = pitr_checks.production_lineage(server, bases, size)  # never another's timeline
    base = choose_base(bases, target)
    healthy = restorable(bases)
    # Bases already known unreadable are never planned on (pitr_points.find_restore_point walks plan.bases).
    readable = [b for b in bases if b.pk in healthy] if fallback else bases
    plan = Plan(
        server, target, datadir, port, base, readable, size, walnames.segno_of(base.end_wal, size), fallback=fallback
    )
    plan.timeline, plan.lineage, plan.notes, plan.warnings = lineage.timeline, lineage, notes, warnings
    plan.last = needed_through(plan)
    if target.kind == "time":
        pitr_reach.cover(plan)  # through the first archived commit after it, or the source will make one
    if base.pk not in healthy and fallback:
        fall_back(plan, f"base backup #{base.pk} has no healthy copy in any enabled location", error=Refused)
    pitr_chain.choose_links(plan)
    plan.last = max(plan.last, plan.segno(plan.newest.end_wal))
    check_chain(plan)
    try:  # a key missing from the keyring, named before anything is written
        keyring.require_keys(healthy_copies(plan.base), f"base backup #{plan.base.pk}")
    except EncryptionError as e:
        raise Refused(str(e)) from None
    return plan


def good_bases(server):
    """The good base backups, oldest first; refused when there is none."""
    bases = sorted(server.runs.restorable_bases(), key=attrgetter("stop_time"))
    if not bases:
        raise Refused(f"{server} has no base backup to recover from: take one with backup {server.name} --kind base")
    return bases


def fall_back(plan, fault, run=None, error=RestoreFailed):
    """Replace an unreadable base backup by the next older one whose WAL chain to the target is
    complete: it replays more WAL to reach the same target. `error` when there is none."""
    unreadable = plan.base
    plan.bases = [b for b in plan.bases if b.stop_time < unreadable.stop_time]
    tried = []
    for older in reversed(plan.bases):
        plan.base = older
        try:
            check_chain(plan)
        except Refused as e:
            tried.append(f"#{older.pk}: {e}")
            continue
        note = f"base backup #{unreadable.pk} unreadable on every location; using #{older.pk}"
        plan.notes.append(note)
        plan.report(note)
        journal.record(
            "pitr_base_fallback",
            actor=getattr(run, "requested_by", "") or "job:restore",
            obj=run,
            server=plan.server.name,
            unreadable=unreadable.pk,
            using=older.pk,
            reason=str(fault),
        )
        return older
    plan.base = unreadable
    why = "; ".join(tried) if tried else "there is no older base backup"
    raise error(f"{fault}; no base backup with a complete WAL chain to the target is readable ({why})")


def check_port(port) -> int:
    if port is None:
        raise Refused("give --port: a free TCP port for the new cluster")
    if not 1024 <= int(port) <= 65535:  # below 1024 the portal (root) could bind it, postgres never
        raise Refused(f"port {port} is not a port the new cluster can listen on: choose one in 1024-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As postgres binds: connections of a cluster that stopped on this port linger in
        # TIME_WAIT for a minute and do not keep it from starting; a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            raise Refused(f"port {port} is in use: choose a free port") from None
    return int(port)


def choose_base(bases, target):
    """The newest base backup that is consistent before the target."""
    if target.kind == "time":
        before = [b for b in bases if b.stop_time <= target.value]
        if not before:
            oldest = bases[0]
            raise Refused(
                f"{target.text} is before the oldest moment the kept backups reach: "
                f"{timezone.localtime(oldest.stop_time):%Y-%m-%d %H:%M:%S%z} (base backup #{oldest.pk})"
            )
        return before[-1]
    if target.kind == "lsn":
        before = [b for b in bases if walnames.lsn_to_int(b.end_lsn) <= walnames.lsn_to_int(target.value)]
        if not before:
            raise Refused(
                f"LSN {target.value} is before the end of the oldest kept base backup "
                f"(#{bases[0].pk}, consistent from {bases[0].end_lsn})"
            )
        return before[-1]
    return bases[-1]


def needed_through(plan):
    """The last segment number the catalog says the target surely needs."""
    server, last = plan.server, walchain.last_segno(plan.server, plan.lineage)
    floor = plan.last  # the base backup's end segment: needed to be consistent at all
    if last is None or last < floor:
        return floor  # check_chain names the missing segment
    if plan.target.kind == "time":
        after = (
            WalSegment.objects.filter(
                server=server, deleted_at=None, segno__gte=floor, archived_at__gt=plan.target.value
            )
            .order_by("segno")
            .values_list("segno", flat=True)
            .first()
        )
        return max(floor, after if after is not None else last)
    if plan.target.kind == "lsn":
        wanted = walnames.segno_of_lsn(plan.target.value, plan.segment_size)
        if wanted > last and not partial_for(plan, wanted):
            name = walnames.segment_name(plan.lineage.timeline_of(last), last, plan.segment_size)
            raise Refused(f"LSN {plan.target.value} is beyond the archived WAL, which ends with segment {name}")
        # Recovery stops at the first record at or after the LSN: at a segment's end (a switch's
        # LSN, or a record crossing into the next), that record is in the next segment.
        return max(floor, min(wanted + 1, last))
    if plan.target.kind == "name":  # where the chain from the base ends: a later gap need not matter
        missing = walchain.missing_segments(server, floor, last, plan.lineage)
        return max(floor, plan.segno(missing[0]) - 1) if missing else last
    return max(floor, last)


def check_chain(plan):
    """No gap, and a readable copy of every segment, from the base backup (or the chain's newest
    link) to the target."""
    first = plan.segno(plan.newest.start_wal)
    try:
        segments = walchain.chain_segments(plan.server, first, plan.last, plan.lineage)
    except walnames.WalError as e:
        window = timezone.now() - timedelta(days=plan.server.wal_retention_days)
        if plan.target.kind == "time" and plan.target.value < window:
            raise Refused(
                f"{plan.target.text} is outside the kept window: WAL is kept {plan.server.wal_retention_days} days "
                f"and only what base backups need beyond that ({e})"
            ) from None
        raise Refused(f"{e}: the WAL chain from backup #{plan.newest.pk} to the target has a gap") from None
    copies = BackupCopy.objects.filter(
        wal_segment__in=segments, status=BackupCopy.Status.OK, location__enabled=True
    ).select_related("location")
    readable = set()
    for copy in copies:
        # A file is looked at (a stat); object storage is only checked while fetching.
        if copy.location.kind == "s3" or store_for(copy.location).exists(copy.key):
            readable.add(copy.wal_segment_id)
    for segment in segments:
        if segment.pk not in readable:
            raise Refused(f"WAL segment {segment.name} is missing from every location: the chain has a gap there")


# ----------------------------------------------------------------------------- the restore


def execute(plan, run):
    if plan.switch:  # before anything is written: the source may still refuse
        pitr_reach.archive_past_target(plan, run)
        check_chain(plan)
    plan.staging = pitr_staging.staging_for(run.pk)
    prepare_datadir(plan)
    # Removed by restores.orphans if this process dies: this directory only (its inode), not
    # one a DBA made again at that path; the WAL staging directory; an incremental chain's scratch.
    inode = plan.datadir.stat().st_ino
    plan.chain = pitr_chain.scratch_for(plan.datadir) if plan.links else None
    made = {"chain": str(plan.chain)} if plan.chain else {}
    run.leaves(
        datadir=str(plan.datadir),
        created=plan.created_dir,
        inode=inode,
        staging=str(plan.staging),
        **made,
        **plan.owner,
    )
    pitr_staging.make(plan.staging)
    # The base is extracted (gpg, zstd, tar) while the first WAL is fetched; the cluster starts
    # as soon as the base is in place and verified, and the rest of the WAL is fetched ahead of
    # replay (pitr_prefetch). A restore point's name decides the base only once its WAL is
    # read: that kind stages all of it first and extracts afterwards.
    early = Extraction(plan) if plan.target.kind != "name" and not plan.links else None
    try:
        try:
            if plan.target.kind == "name":
                pitr_points.find_restore_point(plan, run)
            prefetch_wal(plan)
            heartbeat(run)  # a catalog that fails it (SQLite locked) must stop the extraction too
        except BaseException:
            if early is not None:
                early.stop()  # before discard() removes what it writes
            raise
        extract_chain_or_base(plan, run, early)
        heartbeat(run)
        plan.prefetch.wait_for(plan.segno(plan.newest.end_wal))  # pg_verifybackup reads the base's own WAL
        verify_base(plan)
        write_recovery_settings(plan)
        start_and_wait(plan, run, watch=plan.prefetch.check)
    except BaseException:
        stop_prefetch(plan)  # no thread left behind, whatever stopped the restore
        raise
    stop_prefetch(plan)
    pitr_staging.remove(plan.staging)
    # What the restore read: the base (and the incrementals combined with it) and the WAL fetched.
    run.bytes_done = sum(backup.size or 0 for backup in (plan.base, *plan.links)) + plan.wal_read
    RestoreRun.objects.filter(pk=run.pk).update(bytes_done=run.bytes_done)


def prefetch_wal(plan):
    """History files and pg_receivewal's partial segment now (small), the plan's segments from
    the base backup on ahead of replay, and restore_wal.py with the list of what it may be asked."""
    stop_prefetch(plan)  # the one of a base backup found unreadable
    prefetch = Prefetch(plan, plan.segno(plan.newest.start_wal), plan.last)
    if plan.target.kind in ("latest", "lsn") or (plan.target.kind == "time" and plan.use_partial):
        stage_partial(plan)
    history = stage_history_files(plan)
    install(plan.staging, [*plan.staged.values(), *history])
    plan.prefetch = prefetch.start()


def stop_prefetch(plan):
    if plan.prefetch is not None:
        prefetch, plan.prefetch = plan.prefetch, None
        prefetch.finish()


def prepare_datadir(plan):
    if not plan.datadir.exists():
        plan.datadir.mkdir(mode=0o700)
        plan.created_dir = True
    else:  # given back as it was if the restore fails (remove): a DBA's empty directory, say /srv/pg
        was = plan.datadir.lstat()
        plan.owner = {"mode": stat.S_IMODE(was.st_mode), "uid": was.st_uid, "gid": was.st_gid}
    os.chmod(plan.datadir, 0o700)
    if (ids := db_user_ids()) is not None:  # the directory only: it is empty (check_datadir)
        os.chown(plan.datadir, *ids, follow_symlinks=False)


def discard(plan):
    """Remove everything this restore wrote (and stop its cluster if it got that far)."""
    try:
        stop_prefetch(plan)  # before its directory goes
    finally:
        remove(plan)


def remove(plan):
    pitr_staging.remove(plan.staging)
    if not plan.datadir.exists():
        return
    if (plan.datadir / "postmaster.pid").exists():
        pg_ctl(plan, "stop", "-m", "immediate", "-w")
    if plan.created_dir:
        remove_tree(plan.datadir, ignore_errors=True)
    else:
        empty(plan.datadir)
        give_back(plan.datadir, plan.owner)


def stage_history_files(plan):
    """Timeline history files: recovery reads them to follow production's timeline (those of its
    lineage only: recovery never sees another timeline to follow). Their names."""
    names = []
    wanted = pitr_checks.history_names(plan.lineage)
    for segment in WalSegment.objects.filter(server=plan.server, deleted_at=None, name__in=wanted):
        names.append(segment.name)
        path = plan.staging / segment.name
        if not path.exists():
            decrypt_here(
                readable(segment.copies.select_related("location")),
                FileSink(path),
                encryption_of(plan),
                f"history file {segment.name}",
                segment.sha256,
            )
            pitr_staging.readable(path)  # recovery's restore_wal.py reads it
    return names


def stage_partial(plan):
    """Pull: the segment pg_receivewal is still writing carries the newest WAL (RPO in seconds)."""
    last = max(plan.staged) if plan.staged else plan.last
    partial = partial_for(plan, last + 1)
    if partial is None:
        return False
    shutil.copyfile(partial, plan.unchecked / partial.name[:24])  # the prefetcher checks it, then stages it
    plan.staged[last + 1] = partial.name[:24]
    plan.notes.append(f"used {partial.name}, the segment pg_receivewal is still receiving")
    return True


def extract_chain_or_base(plan, run, early):
    """The chain combined (pitr_chain); when a link reads intact from no copy, or
    pg_combinebackup refuses the chain (checksums enabled between its links, say), the full base
    backup alone, with the WAL from its start, if that reaches the target."""
    if plan.links:
        try:
            return pitr_chain.combine(plan)
        except (FetchFailed, RestoreFailed) as e:  # the bad copies are marked already
            note = f"incremental chain refused: {e}; recovering from full base backup #{plan.base.pk} and WAL instead"
            plan.notes.append(note)
            plan.report(note)
            plan.links = []
            check_chain(plan)
            prefetch_wal(plan)
    return extract_readable_base(plan, run, early)


def extract_readable_base(plan, run, early=None):
    """The planned base backup, or, when no copy of it reads intact, an older one (fall_back)."""
    while True:
        try:
            return extract_base(plan, early)
        except FetchFailed as e:  # the bad copies are marked already
            if not plan.fallback:
                raise
            fall_back(plan, e, run)
        early = None
        RestoreRun.objects.filter(pk=run.pk).update(backup_run=plan.base)
        if plan.target.kind == "name":
            stop_prefetch(plan)  # the search removes what it reads: nothing else may be reading
            pitr_points.find_restore_point(plan, run)  # over the older bases only
        prefetch_wal(plan)
