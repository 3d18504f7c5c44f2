"""Retention: which backups and WAL have outlived their server's policy, and their deletion on every tier.

Logical backups (per database) and base backups (per cluster) are kept by GFS (backups/gfs.py):
every one younger than the server's days (the strategy's 30), the newest of each of its newest
N weeks, months and years (off by default), and its newest `retention_floor` (3) whatever their
age. Never deleted either: a backup under a legal hold (BackupHold) or that a restore or restore
test is reading right now (it goes on the next pass), what a kept one needs (the ancestors of an
incremental, the run whose globals file a logical run pairs with), the base backup from which
the WAL window starts, and a backup with a copy still under S3 Object Lock ("locked until DATE":
its deletion is planned for the first pass after the lock expires, so retention never asks S3 for
a delete that would be refused). plan() says, for each backup, which rule keeps it.

Block-level incrementals (17+) are kept their server's `incremental_retention_days` (the
strategy's 7), and retention keeps whole chains: an incremental never outlives its ancestors
(a full or an incremental a kept one was taken against stays, whatever its age), and a chain
goes only when its newest link has expired.

WAL is kept `wal_retention_days` (7), but never a segment that a kept base backup needs to
become consistent, nor one on the way from the base backup that reaches the start of the
window to now: any moment of the window stays recoverable. History files are tiny and kept.
After a failover that base is one on the timeline history a PITR to latest follows (backups.
timelines), never one the old primary took on the branch it left.
"""

import logging
from collections import Counter
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from backupportal import journal
from backups import gfs, keyring, manifests, timelines, walnames, walspool
from backups.copies import delete_run_artifacts, restorable, retire
from backups.models import WAL_LOCATION, BackupCopy, BackupHold, BackupRun, Server, StorageLocation, WalSegment
from backups.storage import StorageError, store_for

log = logging.getLogger(__name__)

DAYS_FIELD = {
    BackupRun.Kind.LOGICAL: "logical_retention_days",
    BackupRun.Kind.BASE: "base_retention_days",
    BackupRun.Kind.INCREMENTAL: "incremental_retention_days",
}
KINDS = list(DAYS_FIELD)


class PlanRun:
    """A good run as the rules read it: a few columns, not a model instance, because a server page
    plans every good backup of the server (thousands on a catalog nobody pruned). The properties
    the rules use are BackupRun's own."""

    Kind = BackupRun.Kind
    COLUMNS = ["pk", "kind", "database_id", "database__name", "finished_at", "details", "start_wal"]
    COLUMNS += ["timeline", "start_lsn", "end_lsn"]  # whether a base is on production's timeline history
    method = BackupRun.method
    parent_run_id = BackupRun.parent_run_id
    stop_time = BackupRun.stop_time

    def __init__(self, pk, kind, database_id, database_name, finished_at, details, start_wal, *wal):
        self.pk, self.kind, self.database_id, self.database_name = pk, kind, database_id, database_name
        self.finished_at, self.details, self.start_wal = finished_at, details, start_wal
        self.timeline, self.start_lsn, self.end_lsn = wal


def _days(server, kind):
    return getattr(server, DAYS_FIELD[kind])


def plan(server, now=None, lineage=False):
    """{run: rule} for every good backup of the server (WAL-chain checks aside, which have no
    artifact): why it is kept ("daily 2026-12-01", "weekly 2026-W48", "floor", "legal hold",
    "chain of #N", ...), or None when retention deletes it on its next pass. `lineage`: what
    current_lineage() says, when the caller has it already.

    A handful of queries per server, whatever the number of backups."""
    now = now or timezone.now()
    good = server.runs.good().exclude(finished_at=None).values_list(*PlanRun.COLUMNS)
    runs = [r for r in (PlanRun(*row) for row in good) if r.kind != BackupRun.Kind.INCREMENTAL or r.method == "block"]
    # The floor and the tiers count only backups that can still be restored: three whose every
    # copy the verify found corrupt (or missing, or deleted) must not push out the last one that
    # restores. Those keep their days only.
    lost = _without_a_healthy_copy(runs)
    kept = {}
    for kind, series in _series(runs):
        usable = [r for r in series if r.pk not in lost]
        if kind == BackupRun.Kind.INCREMENTAL:
            # Incrementals keep their days and their newest (and chains, below), as before: the
            # floor and the long-term tiers are the fulls', which a long-term restore starts from.
            floor, tiers = 1, ()
        else:
            # At least one, whatever the row says: the newest good backup is never deleted.
            floor, tiers = max(1, server.retention_floor), (server.keep_weekly, server.keep_monthly, server.keep_yearly)
        kept.update(gfs.keep(usable, now, _days(server, kind), *tiers, floor=floor))
        # Short of restorable ones, the newest of the others still fill the floor: a copy marked
        # missing while its mount was away is ok again once the verify finds it back.
        lost_floor = max(0, floor - len(usable))
        kept.update(gfs.keep([r for r in series if r.pk in lost], now, _days(server, kind), floor=lost_floor))
    by_pk = {r.pk: r for r in runs}
    held = set(BackupHold.objects.active().filter(run__server=server).values_list("run_id", flat=True))
    reading = set(server.runs.filter(_being_read()).values_list("pk", flat=True))
    for pk in held | reading:
        if pk in by_pk:
            kept[by_pk[pk]] = "legal hold" if pk in held else "being restored"
    # A copy under S3 Object Lock cannot be deleted before its retain-until: retention never asks.
    for pk, until in _locked_until(server, now).items():
        if pk in by_pk:
            kept.setdefault(by_pk[pk], f"locked until {timezone.localtime(until).date().isoformat()}")
    _keep_chains(kept, by_pk)
    _keep_globals(kept, by_pk)
    bases = [r for r in runs if r.kind == BackupRun.Kind.BASE]
    lineage = current_lineage(server, bases) if lineage is False else lineage
    anchor = window_anchor(bases, now - timedelta(days=server.wal_retention_days), lost, lineage)
    if anchor is not None:
        kept.setdefault(anchor, "start of the WAL window")
    return {r: kept.get(r) for r in sorted(runs, key=lambda r: r.finished_at, reverse=True)}


def _without_a_healthy_copy(runs):
    """Pks of `runs` (the plan's) that have copies but cannot be restored from them (copies.restorable:
    corrupt, missing or deleted; a base backup's separate manifest lost). They keep their days, fill
    the floor only when too few others can, and never start the WAL window (plan). A copy in a
    location disabled for a while still counts: it is there when it returns, and neither its
    monthly backups nor the WAL from it are deleted meanwhile. The plan's runs, not model
    instances read again: the server page plans every backup of the server."""
    copied = BackupCopy.objects.filter(run__in=[run.pk for run in runs], artifact="main")
    with_copies = set(copied.values_list("run_id", flat=True))
    return with_copies - restorable([run for run in runs if run.pk in with_copies], enabled_only=False)


def _locked_until(server, now):
    """{run pk: the latest retain-until of its copies} for the runs whose copies are still locked."""
    locked = BackupCopy.objects.filter(run__server=server, retain_until__gt=now).exclude(
        status=BackupCopy.Status.DELETED
    )
    return dict(locked.order_by().values("run").annotate(until=Max("retain_until")).values_list("run", "until"))


def _series(runs):
    """The series GFS is applied to, with their kind: each database's logical backups (a dropped
    one's too), the cluster's base backups, its block incrementals."""
    series = {}
    for run in runs:
        key = (run.kind, run.database_id if run.kind == BackupRun.Kind.LOGICAL else None)
        series.setdefault(key, []).append(run)
    return [(kind, series_runs) for (kind, _), series_runs in series.items()]


def _keep_chains(kept, by_pk):
    """An incremental never outlives its ancestors: a kept one keeps its parent, that one its
    own, up to the full (whatever their age)."""
    for run in [r for r in kept if r.kind == BackupRun.Kind.INCREMENTAL]:
        child, seen = run, set()
        while child.parent_run_id in by_pk and child.pk not in seen:
            seen.add(child.pk)
            child = by_pk[child.parent_run_id]
            kept.setdefault(child, f"chain of #{run.pk}")


def _keep_globals(kept, by_pk):
    """A run whose globals file a kept run pairs with stays, whole, until that one goes."""
    for run in list(kept):
        owner = by_pk.get(run.details.get("globals", {}).get("run"))
        if owner is not None and owner is not run and owner not in kept:
            kept[owner] = f"globals of #{run.pk}"


def chain_needs(server, now):
    """Pks of the ancestors (fulls and incrementals) of every block incremental that is kept."""
    return {r.pk for r, rule in plan(server, now).items() if rule and rule.startswith("chain of")}


def expired_runs(server, kind, now=None):
    """Good runs of this server and kind that retention deletes (plan() keeps them by no rule)."""
    gone = [r.pk for r, rule in plan(server, now).items() if rule is None and r.kind == kind]
    return server.runs.filter(pk__in=gone).order_by("finished_at")


def _being_read():
    """Runs a restore or restore test is reading now, or a restore request waits to read (pending
    or approved, not yet run: a probe saw an approved request's backup deleted before the worker
    ran it, the request failing on it). See restores.models."""
    return (
        Q(restores__status__in=["queued", "running"])
        | Q(restore_tests__status="running")
        | Q(requests__status__in=["pending", "approved", "running"])
    )


def describe(server, now=None):
    """plan() as rows for the dry run and the server page: each backup with the rule that keeps
    it, or the day it goes (today: on the next pass)."""
    now = now or timezone.now()
    return rows(server, plan(server, now).items(), now)


def rows(server, planned, now):
    """The rows of `planned`, (run, rule) pairs of plan(): a page makes them for the backups it
    shows alone (the server page's card at 2,000 backups a server: p50 110 to 99 ms)."""
    dsn_database = server.dbname  # a logical run from before databases dumped the DSN's
    today = timezone.localtime(now).date().isoformat()
    return [
        {
            "id": run.pk,
            "server": server.name,
            "kind": run.kind,
            "database": (run.database_name if run.database_id else dsn_database)
            if run.kind == BackupRun.Kind.LOGICAL
            else "",
            "finished_at": timezone.localtime(run.finished_at).isoformat(),  # as every page shows times
            "kept_by": rule,
            "goes": None if rule else today,
            "daily_until": gfs.goes_on(run, _days(server, run.kind)).isoformat()
            if rule and rule.startswith("daily")
            else None,
        }
        for run, rule in planned
    ]


def card(server, now=None, newest=10, going=20):
    """The server page's retention card, the same size whatever the number of backups: how many
    each rule keeps, the backups the next pass deletes (at most `going`) and the newest `newest`.
    The server's retention page lists every backup, a page at a time."""
    now = now or timezone.now()
    planned = list(plan(server, now).items())
    gone = [(run, rule) for run, rule in planned if not rule]
    counts = Counter(rule_name(rule) for _, rule in planned)
    return {
        "total": len(planned),
        "counts": sorted(counts.items(), key=lambda item: -item[1]),
        "going": rows(server, gone[:going], now),
        "going_more": max(0, len(gone) - going),
        "newest": rows(server, planned[:newest], now),
    }


def rule_name(rule):
    """A rule without its period or run: "daily 2026-12-01" -> "daily", "chain of #12" -> "chain of"."""
    if not rule:
        return "goes on the next pass"
    head, _, tail = rule.rpartition(" ")
    return head if head and (tail[:1].isdigit() or tail.startswith("#")) else rule


def apply(now=None, dry_run=False, actor="job:retention"):
    """Delete what has expired. Returns [{"id", "server", "kind", "finished_at"}] of what was (or would be) deleted."""
    deleted = []
    for server in Server.objects.all():
        for run, rule in reversed(plan(server, now).items()):
            if rule is not None:
                continue
            if not dry_run:
                if (expired := _retired_unless_kept(run.pk, actor)) is None:
                    continue  # held, or taken by a restore, since the plan
                delete_run_artifacts(expired, actor)
            deleted.append(
                {"id": run.pk, "server": server.name, "kind": run.kind, "finished_at": run.finished_at.isoformat()}
            )
    return deleted


def _retired_unless_kept(pk, actor):
    """Retire run `pk` unless a legal hold or a restore took it since the plan (None then). Asked
    with its row locked, as BackupHold.place locks it: a hold comes before (and is seen here) or
    after (and finds the backup deleted), never in between."""
    with transaction.atomic():
        run = BackupRun.objects.select_for_update().get(pk=pk)
        if run.holds.active().exists() or BackupRun.objects.filter(_being_read(), pk=pk).exists():
            return None
        retire(run, actor)
    return run


def apply_wal(now=None, dry_run=False, actor="job:retention"):
    """WAL retention of every server that has archived WAL: {server: what was (or would be) deleted}."""
    now = now or timezone.now()
    servers = Server.objects.filter(pk__in=WalSegment.objects.values("server").distinct())
    return {server.name: wal_retention(server, now, dry_run, actor) for server in servers}


def apply_wal_and_base_retention(now=None, dry_run=False, actor="job:retention"):
    """Backups first (so the WAL only they needed goes with them), then WAL, then the retired keys
    that nothing kept needs any more (backups.keyring)."""
    now = now or timezone.now()
    result = {"dry_run": dry_run, "deleted": apply(now, dry_run, actor), "wal": apply_wal(now, dry_run, actor)}
    result["keys_dropped"] = keyring.drop_unneeded(dry_run, actor)
    result["leftovers"] = {} if dry_run else remove_leftovers(actor)
    return result


def remove_leftovers(actor="job:retention"):
    """What killed writers left in each location (a NAS's stale partial files, S3's unfinished
    multipart uploads): removed, journaled per location. {location: how many}; a location that
    cannot be reached now is tried again at the next pass."""
    removed = {}
    for location in StorageLocation.objects.filter(enabled=True):
        try:
            count = store_for(location).remove_leftovers()
        except (OSError, StorageError) as e:
            log.warning("location %s: leftovers of killed copies not removed this pass: %s", location.name, e)
            continue
        if count:
            removed[location.name] = count
            journal.record("leftovers_removed", actor=actor, obj=location, count=count)
    return removed


def current_lineage(server, bases):
    """The walchain.Lineage a PITR to latest follows (backups.timelines), or None when every base
    backup counts: the archive holds one timeline (nothing to choose, and no server to ask when a
    page plans), or the history file of production's timeline is not catalogued yet (the wal_gap
    alert names it)."""
    size = server.wal_segment_size
    one = all((b.timeline or 1) == 1 for b in bases) and not server.wal_segments.filter(timeline__gt=1).exists()
    if not size or not bases or one:
        return None
    try:
        return timelines.production_lineage(server, sorted(bases, key=consistent_here), size)[0]
    except walnames.WalError:
        return None


def on_lineage(bases, lineage):
    """The bases a PITR along `lineage` can start from; all of them without one, or when none is
    on it (the oldest then anchors: the most WAL is kept)."""
    if lineage is None:
        return bases
    return [b for b in bases if timelines.on_lineage(lineage, b)] or bases


def consistent_here(base):
    """When a base backup became consistent, on the portal's clock: what the WAL window's start
    (the portal's now, less the days) is compared with. Its stop_time is the server's clock: a
    server behind the portal made a base taken inside the window look older than its start, and
    the WAL from the base before it, which PITR to the window's first moments needs, was deleted.
    Runs from before the portal's reading was recorded: their finish, a little after it."""
    stamp = base.details.get("stop_time_portal")
    return datetime.fromisoformat(stamp) if stamp else base.finished_at


def window_anchor(bases, window_start, lost=(), lineage=None):
    """The newest base backup consistent before the window starts: PITR to that moment starts
    there. Not one in `lost` (pks of bases without a restorable copy) while any other will do: the
    WAL only a lost one needed is not kept. After a failover, one on the timeline history a PITR
    follows (`lineage`): a base the old primary took on the branch it left is never a PITR's start,
    and anchoring on it deleted the WAL from the base before the switch that PITR starts from."""
    bases = on_lineage([b for b in bases if b.pk not in lost] or bases, lineage)
    before = [b for b in bases if b.start_wal and consistent_here(b) <= window_start]
    return max(before, key=consistent_here) if before else None


def doomed_segments(server, kept_bases, now, kept_links=(), lost=(), lineage=None):
    """Segments older than the window that no kept base backup needs, nor a kept block
    incremental (`kept_links`: the WAL from its start to its end makes it consistent). The WAL
    kept from the window's start begins at a base a PITR can start from: not one in `lost` (pks
    of bases without a restorable copy), while any other is kept, and one on `lineage`. Each
    kept base keeps its own WAL, whatever its timeline: it restores to its end from it alone."""
    size = server.wal_segment_size
    window_start = now - timedelta(days=server.wal_retention_days)
    with_wal = [b for b in kept_bases if b.start_wal and size]
    usable = on_lineage([b for b in with_wal if b.pk not in lost] or with_wal, lineage)
    anchor = window_anchor(usable, window_start) or min(usable, key=consistent_here, default=None)
    keep_from = walnames.segno_of(anchor.start_wal, size) if anchor else None
    needing = with_wal + [link for link in kept_links if link.start_wal and link.end_wal and size]
    ranges = [(walnames.segno_of(b.start_wal, size), walnames.segno_of(b.end_wal, size)) for b in needing]
    doomed = []
    old = WalSegment.objects.filter(server=server, deleted_at=None, archived_at__lt=window_start).order_by("name")
    # A segment with a copy under S3 Object Lock goes once the lock expires (a later pass).
    old = old.exclude(copies__retain_until__gt=now)
    for segment in old.only("id", "name", "segno"):
        if segment.name.endswith(".history"):
            continue
        segno = (
            segment.segno if segment.segno is not None else (walnames.segno_of(segment.name, size) if size else None)
        )
        if segno is None:
            continue  # the segment size is unknown yet: nothing can be proven unneeded
        if keep_from is not None and segno >= keep_from:
            continue
        if any(start <= segno <= end for start, end in ranges):
            continue
        doomed.append(segment)
    return doomed, anchor


def replay_waits(server):
    """Why the server's WAL must all stay this pass, or "": a PITR of it queued or running reads
    segments as recovery asks for them (restores.pitr_prefetch), from its base to its target, and
    a request not yet run will; the window moving past them deleted that WAL under a running
    restore (a probe's finding). The next pass after them deletes it."""
    if server.restore_runs.filter(kind="pitr", status__in=["queued", "running"]).exists():
        return "a point-in-time restore of it is running"
    waiting = server.restore_requests.filter(status__in=["pending", "approved", "running"])
    if waiting.filter(Q(target_time__isnull=False) | Q(backup_run__kind=BackupRun.Kind.BASE)).exists():
        return "a point-in-time restore request of it waits to run"
    return ""


def wal_retention(server, now, dry_run, actor):
    if waits := replay_waits(server):
        return {"deleted": 0, "first_deleted": None, "last_deleted": None, "kept_from": None, "waits": waits}
    lineage = current_lineage(server, list(server.runs.restorable_bases()))
    kept_pks = {r.pk for r, rule in plan(server, now, lineage).items() if rule is not None}
    good = server.runs.good().filter(pk__in=kept_pks)
    kept = list(good.filter(kind=BackupRun.Kind.BASE))
    links = list(good.filter(kind=BackupRun.Kind.INCREMENTAL))
    segments, anchor = doomed_segments(server, kept, now, links, _without_a_healthy_copy(kept), lineage)
    result = {
        "deleted": len(segments),
        "first_deleted": segments[0].name if segments else None,
        "last_deleted": segments[-1].name if segments else None,
        "kept_from": anchor.start_wal if anchor else None,
    }
    if dry_run or not segments:
        return result
    gone = [s.pk for s in segments if delete_copies(s.copies.exclude(status=BackupCopy.Status.DELETED))]
    WalSegment.objects.filter(pk__in=gone).update(deleted_at=now)
    walspool.forget_ingested(server, [segment.name for segment in segments])
    pruned = prune_wal_manifests(server)
    journal.record(
        "wal_deleted",
        actor=actor,
        obj=server,
        count=len(gone),
        first=result["first_deleted"],
        last=result["last_deleted"],
        kept_from=result["kept_from"],
        manifests_deleted=len(pruned),
        reason=f"older than {server.wal_retention_days} days and needed by no kept base backup",
    )
    return result


def prune_wal_manifests(server):
    """The signed manifests of WAL passes whose segments are all gone (backups.manifests), from
    the WAL location and every secondary tier."""
    wal = StorageLocation.objects.filter(name=WAL_LOCATION, enabled=True).first()
    if wal is None:
        return []
    others = StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.PRIMARY)
    try:
        return manifests.prune_wal(server, [wal, *others])
    except (StorageError, OSError):
        return []  # the WAL location cannot be listed now: next time


def delete_copies(copies):
    """Delete each copy's file or object on its tier. False when a tier failed: retried next time.

    WAL is journaled by batch (wal_deleted), not one entry per segment and tier.
    """
    all_gone = True
    for copy in copies.select_related("location"):
        try:
            store_for(copy.location).remove_copy(copy.key, copy.version_id)
        except (OSError, StorageError) as e:
            BackupCopy.objects.filter(pk=copy.pk).update(last_error=f"retention could not delete it: {e}"[:2000])
            all_gone = False
            continue
        BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.DELETED)
    return all_gone
