"""Copies of artifacts in every storage location (primary, NAS, S3), each with its own state and sha256.

Every artifact of a run (the dump, its globals; a base backup's files) and every WAL segment
is a BackupCopy row per location. The primary copy is written by the backup itself; the
others are made here, by the worker or in the foreground, and retried with exponential
backoff. A copy never fails or blocks the backup it copies: its failure is on the copy row,
from which the monitor (watching) opens the "upload_failed" alert of its location.

Reading goes through open_first_healthy() and decrypt_here(), on top of backups.streams: the
first healthy copy in the order primary → NAS → S3, hashed while it streams; a copy found
missing or corrupt is marked bad here (mark_bad, the one definition), on the caller's thread.
Retention goes through delete_run_artifacts(): every copy in every location, S3 included.
"""

import time
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from backupportal import conditions, journal
from backups import streams, walkeys
from backups.models import BackupCopy, BackupRun, StorageLocation, WalSegment
from backups.storage import ObjectLocked, StorageError, store_for
from backups.streams import CHUNK, CopyCorrupt, in_read_order

# Retries: 1, 2, 4 ... minutes after each failed attempt, never more than an hour apart.
RETRY_BASE = timedelta(minutes=1)
RETRY_MAX = timedelta(hours=1)
# A copy being made is leased to its worker; the lease is renewed while bytes flow, so a
# copy whose worker died is taken up again once the lease runs out.
LEASE = timedelta(minutes=10)
RENEW_EVERY = 30  # seconds


# --- Whose copies: a backup run, or a WAL segment. -----------------------------------------


def owner_of(copy):
    return copy.run if copy.run_id else copy.wal_segment


def owner_filter(owner):
    return {"wal_segment": owner} if isinstance(owner, WalSegment) else {"run": owner}


def owner_is_live(owner):
    if isinstance(owner, WalSegment):
        return owner.deleted_at is None
    return owner.is_good


def secondary_locations():
    return StorageLocation.objects.filter(enabled=True).exclude(kind=StorageLocation.Kind.PRIMARY)


def restorable(runs, enabled_only=True):
    """The pks of `runs` that can be restored from copies believed good in enabled locations: their
    main artifact, and for a base backup whose tar holds no manifest (compressed by the server) its
    manifest too. One definition for PITR (which base to start from) and for retention (which
    backups fill the floor and may start the WAL window): where they differed, retention kept three
    that PITR refuses and deleted the one it would use. `enabled_only=False`: a copy in a location
    disabled for a while counts too (retention's floor and tiers: it is there when it returns)."""
    runs = list(runs)  # model instances, or anything with .pk and .details (retention.PlanRun)
    healthy = BackupCopy.objects.filter(status=BackupCopy.Status.OK)
    if enabled_only:
        healthy = healthy.filter(location__enabled=True)
    usable = set(healthy.filter(run__in=[r.pk for r in runs], artifact="main").values_list("run_id", flat=True))
    apart = [r.pk for r in runs if (r.details or {}).get("manifest_in_tar", True) is False]
    if apart:
        manifests = set(healthy.filter(run__in=apart, artifact="manifest").values_list("run_id", flat=True))
        usable -= set(apart) - manifests
    return usable


def healthy_copies(owner, artifact="main"):
    qs = BackupCopy.objects.filter(artifact=artifact, status=BackupCopy.Status.OK, location__enabled=True)
    return in_read_order(qs.filter(**owner_filter(owner)).select_related("location"))


# --- Reading: the first healthy copy (backups.streams), its faults marked here. ------------


def open_first_healthy(owner, artifact="main", exclude=(), actor="job:restore"):
    """Open the first healthy copy of `owner`'s artifact (primary → NAS → S3) as a VerifiedReader.

    A copy that is missing is marked bad and skipped; one that cannot be reached (S3 down)
    is skipped. The reader's `.note` tells the restore which copy it read and why.
    A mismatch found at EOF cannot fall back mid-stream: the caller marks the copy bad
    (mark_faults) and starts again, and this function then skips it.
    """
    excluded = {c.pk for c in exclude}
    try:
        reader, faults = streams.open_first(c for c in healthy_copies(owner, artifact) if c.pk not in excluded)
    except streams.NoReadableCopy as e:
        mark_faults(e.faults, actor)
        raise StorageError(f"no healthy copy of {owner} ({artifact}) in any location: {e}") from None
    mark_faults(faults, actor)
    if reader.note:
        record("copy_fallback", reader.copy, actor, note=reader.note)
    return reader


def decrypt_here(copies, sink, encryption, what, plain_sha256=None, actor="job:restore"):
    """streams.decrypt_first_healthy() on this thread, the bad copies it met marked. Returns the notes."""
    return settled(lambda: streams.decrypt_first_healthy(copies, sink, encryption, what, plain_sha256), actor)


def settled(fetched, actor="job:restore"):
    """The notes of `fetched()` (a decrypt_first_healthy, or a finished one's result), its faults
    marked. PITR reads this way, and leaves the "corruption" alert to the monitor."""
    try:
        notes, faults = fetched()
    except streams.FetchFailed as e:
        mark_faults(e.faults, actor, alert=False)
        raise
    mark_faults(faults, actor, alert=False)
    return notes


def mark_faults(faults, actor="job:restore", alert=True):
    """Mark bad, once each, the copies a read found missing or corrupt (streams hands them back
    instead of writing the catalog from gpg's thread or a fetch pool). Without `alert`, the
    monitor raises "corruption" from the catalog on its next minute."""
    for fault in faults:
        if not fault.marked:
            fault.marked = True
            (mark_bad if alert else record_bad)(fault.copy, str(fault), actor=actor)


def record(action, copy, actor, outcome="ok", **details):
    """Journal what happened to one copy, naming its server and location."""
    journal.record(
        action,
        actor=actor,
        obj=copy,
        server=owner_of(copy).server.name,
        outcome=outcome,
        location=copy.location.name,
        key=copy.key,
        **details,
    )


def record_bad(copy, why, actor="job:verify"):
    """A copy that is missing or corrupt: bad in the catalog and journaled. Returns its owner;
    None when the catalog no longer names the object that was read: reencrypt replaced it (and
    removed the old one) since the verify or restore read its row, and the new one was not read."""
    marked = BackupCopy.objects.filter(pk=copy.pk, key=copy.key).update(
        status=BackupCopy.Status.BAD, last_error=why[:2000]
    )
    if not marked:
        return None
    copy.status, copy.last_error = BackupCopy.Status.BAD, why[:2000]
    record("copy_bad", copy, actor, outcome="failed", error=why)
    return owner_of(copy)


def mark_bad(copy, why, actor="job:verify"):
    """record_bad(); the monitor alerts "corruption"."""
    owner = record_bad(copy, why, actor)
    if owner is not None:
        conditions.changed("corruption", server=owner.server)


# --- Copying: plan a row per artifact and location, then make it, retrying with backoff. ----


def plan_copies(owner):
    """One copy row per artifact of `owner` and enabled secondary location (idempotent)."""
    if not owner_is_live(owner):
        return
    sources = {}
    for copy in in_read_order(
        BackupCopy.objects.filter(status=BackupCopy.Status.OK, **owner_filter(owner)).select_related("location")
    ):
        sources.setdefault(copy.artifact, copy)
    for location in secondary_locations():
        for artifact, source in sources.items():
            BackupCopy.objects.get_or_create(
                location=location,
                artifact=artifact,
                **owner_filter(owner),
                defaults={"key": source.key, "size": source.size, "encryption_key_id": source.encryption_key_id},
            )


def backoff(attempts):
    return min(RETRY_BASE * 2 ** max(attempts - 1, 0), RETRY_MAX)


def _claimable(now):
    todo = Q(status__in=[BackupCopy.Status.PENDING, BackupCopy.Status.FAILED])
    return todo | Q(status=BackupCopy.Status.COPYING, next_attempt_at__lte=now)


def _claim(copy, now):
    """Take the copy for this worker; False if another worker has it (or it is done)."""
    claimed = (
        BackupCopy.objects.filter(_claimable(now), pk=copy.pk, attempts=copy.attempts)
        .filter(**{"run__deleted_at": None} if copy.run_id else {"wal_segment__deleted_at": None})
        .update(status=BackupCopy.Status.COPYING, attempts=copy.attempts + 1, next_attempt_at=now + LEASE)
    )
    if claimed:
        copy.status, copy.attempts = BackupCopy.Status.COPYING, copy.attempts + 1
    return bool(claimed)


def copy_one(copy, actor="job:copy", now=None, journal_it=True):
    """Stream the first healthy copy into this copy's location, verifying both ends. Returns the copy.

    WAL segments are copies too; their ingest journals them by batch (journal_it=False).
    Failures are always journaled.
    """
    now = now or timezone.now()
    if not _claim(copy, now):
        copy.refresh_from_db()
        return copy
    owner = owner_of(copy)
    store = store_for(copy.location)
    try:
        if copy.key_id and isinstance(owner, WalSegment):
            # The segment's data key beside it first: a tier that was down while the ingest put the
            # key out got segments nothing there could decrypt (a probe's finding).
            walkeys.publish(owner.server.name, copy.key_id, copy.location)
        if store.exists(copy.key):
            # Left by an attempt that wrote the file but died before recording it: not an artifact yet.
            store.delete(copy.key)
        with (
            open_first_healthy(owner, copy.artifact, exclude=[copy], actor=actor) as src,
            store.writer(copy.key) as out,
        ):
            renewed = time.monotonic()
            while chunk := src.read(CHUNK):
                out.write(chunk)
                if time.monotonic() - renewed > RENEW_EVERY:
                    _renew_lease(copy)
                    renewed = time.monotonic()
            size, sha256 = out.commit()
    except (OSError, StorageError) as e:
        if isinstance(e, CopyCorrupt):  # the source was read to its end and is corrupt
            mark_faults([e], actor)
        return _copy_failed(copy, owner, e, actor)
    # An S3 location with Object Lock: the version made and the retain-until S3 holds it under.
    lock = {"version_id": getattr(out, "version_id", ""), "retain_until": getattr(out, "retain_until", None)}
    return _copy_made(copy, owner, store, size, sha256, src.copy, actor, journal_it, lock)


def _renew_lease(copy):
    BackupCopy.objects.filter(pk=copy.pk, status=BackupCopy.Status.COPYING).update(
        next_attempt_at=timezone.now() + LEASE
    )


def _copy_made(copy, owner, store, size, sha256, source, actor, journal_it=True, lock=None):
    lock = lock or {}
    owner.refresh_from_db(fields=["deleted_at"])
    made = BackupCopy.objects.filter(pk=copy.pk, status=BackupCopy.Status.COPYING).update(
        status=BackupCopy.Status.OK,
        size=size,
        sha256=sha256,
        copied_at=timezone.now(),
        next_attempt_at=None,
        last_error="",
        **lock,
    )
    if not made or owner.deleted_at is not None:
        # Retention removed the artifact while it was being copied: take the new copy away too.
        if lock.get("retain_until"):
            # Locked: it cannot go yet. Catalogued with its lock, the retry schedule deletes it then.
            BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.OK, size=size, sha256=sha256, **lock)
            copy.refresh_from_db()
            delete_copy(copy, actor)
            return copy
        store.delete(copy.key, lock.get("version_id", ""))
        BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.DELETED)
        copy.refresh_from_db()
        return copy
    copy.refresh_from_db()
    if journal_it:
        record("copy_made", copy, actor, source=source.location.name, size=size, sha256=sha256, attempt=copy.attempts)
    conditions.changed("upload_failed", location=copy.location)  # may be the last failure resolved
    return copy


def _copy_failed(copy, owner, error, actor):
    retry_at = timezone.now() + backoff(copy.attempts)
    BackupCopy.objects.filter(pk=copy.pk, status=BackupCopy.Status.COPYING).update(
        status=BackupCopy.Status.FAILED, last_error=str(error)[:2000], next_attempt_at=retry_at
    )
    copy.refresh_from_db()
    record("copy_failed", copy, actor, outcome="failed", attempt=copy.attempts, retry_at=retry_at, error=str(error))
    conditions.changed("upload_failed", location=copy.location)
    return copy


def copy_pending(owner, actor="job:copy"):
    """Make every copy of `owner` that is not made yet, now. Returns the copies tried."""
    todo = BackupCopy.objects.filter(_claimable(timezone.now()), location__enabled=True, **owner_filter(owner))
    todo = todo.select_related("location")
    return [copy_one(c, actor=actor) for c in todo]


def copy_run_foreground(run):
    """What `backup` does after the primary: make each copy now and report it."""
    if not run.is_good:
        return []
    plan_copies(run)
    return copy_pending(run, actor=run.requested_by or "job:copy")


def enqueue_copies(owner):
    """After a backup (or a WAL ingest) on a worker: plan its copies and queue them."""
    from django_q.tasks import async_task

    if not owner_is_live(owner):
        return
    plan_copies(owner)
    kind = "wal" if isinstance(owner, WalSegment) else "run"
    async_task("backups.tasks.make_copies", kind, owner.pk, task_name=f"copies of {kind} #{owner.pk}")


def plan_missing_copies(limit=100):
    """Artifacts a newly enabled location does not have yet: plan their copies (a few per call)."""
    planned = 0
    for location in secondary_locations():
        runs = BackupRun.objects.good().exclude(copies__location=location).filter(copies__status="ok")
        segments = WalSegment.objects.filter(deleted_at=None).exclude(copies__location=location)
        for owner in [*runs.distinct()[:limit], *segments.filter(copies__status="ok").distinct()[:limit]]:
            plan_copies(owner)
            planned += 1
    return planned


def retry_due_copies(now=None, limit=200):
    """The minute schedule: copies and deletions whose next attempt is due. Returns a summary."""
    now = now or timezone.now()
    plan_missing_copies()
    live = Q(run__deleted_at=None, run__isnull=False) | Q(wal_segment__deleted_at=None, wal_segment__isnull=False)
    due = Q(next_attempt_at=None) | Q(next_attempt_at__lte=now)
    copies = (
        BackupCopy.objects.filter(_claimable(now), live, due, location__enabled=True)
        .select_related("location")
        .order_by("next_attempt_at")[:limit]
    )
    made = [copy_one(c, now=now) for c in copies]
    deleted = retry_deletions(now, limit)
    return {
        "copied": sum(c.status == BackupCopy.Status.OK for c in made),
        "failed": sum(c.status == BackupCopy.Status.FAILED for c in made),
        "deleted": deleted,
    }


# --- Retention: every copy in every location. ----------------------------------------------


def delete_copy(copy, actor):
    """Remove one copy from its location; on failure keep the row for a later retry. True when gone.

    A copy under Object Lock is deleted by its version, and only once its lock has expired: until
    then it stays catalogued (not deleted, and said why), and the retry schedule comes back for it
    on its retain-until date. S3 refusing a lock the catalog did not know of is said the same way.
    """
    if copy.locked_at(timezone.now()):
        return _delete_waits(copy, actor, copy.retain_until)
    if copy.attempts or copy.status in (BackupCopy.Status.OK, BackupCopy.Status.BAD):
        try:
            store_for(copy.location).remove_copy(copy.key, copy.version_id)
            if copy.old_key:  # the object a re-encryption replaced, not removed yet (backups.reencrypt)
                store_for(copy.location).delete(copy.old_key)
        except ObjectLocked as e:
            BackupCopy.objects.filter(pk=copy.pk).update(retain_until=e.retain_until)
            return _delete_waits(copy, actor, e.retain_until, str(e))
        except (OSError, StorageError) as e:
            retry_at = timezone.now() + backoff(copy.attempts or 1)
            BackupCopy.objects.filter(pk=copy.pk).update(
                last_error=f"delete failed: {e}"[:2000], next_attempt_at=retry_at
            )
            record("copy_delete_failed", copy, actor, outcome="failed", error=str(e))
            return False
    BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.DELETED, next_attempt_at=None)
    copy.status = BackupCopy.Status.DELETED
    record("copy_deleted", copy, actor)
    return True


def _delete_waits(copy, actor, until, why=""):
    why = why or (
        f"{copy.location.name} copy {copy.key} is locked by S3 Object Lock until {until:%Y-%m-%d %H:%M} UTC: "
        "it is deleted after then, not before"
    )
    BackupCopy.objects.filter(pk=copy.pk).update(last_error=why[:2000], next_attempt_at=until)
    copy.retain_until, copy.last_error, copy.next_attempt_at = until, why[:2000], until
    record("copy_delete_waits", copy, actor, outcome="failed", error=why, retain_until=until)
    return False


def delete_artifacts(owner, actor):
    """Retire `owner` (a run or a WAL segment) and delete every copy of it from every location.

    The owner is marked deleted first, so nothing restores from it or copies it again; a copy
    whose location is unreachable stays catalogued and is deleted by the retry schedule.
    """
    retire(owner, actor)
    copies = BackupCopy.objects.filter(**owner_filter(owner)).exclude(status=BackupCopy.Status.DELETED)
    results = {c.location.name + ":" + c.artifact: delete_copy(c, actor) for c in copies.select_related("location")}
    return {
        "deleted": sorted(k for k, ok in results.items() if ok),
        "failed": sorted(k for k, ok in results.items() if not ok),
    }


def retire(owner, actor):
    """Mark `owner` deleted (journaled), once: nothing restores from it or copies it from now on."""
    if owner.deleted_at is not None:
        return
    owner.deleted_at = timezone.now()
    owner.save(update_fields=["deleted_at"])
    if isinstance(owner, WalSegment):
        journal.record("wal_deleted", actor=actor, obj=owner, server=owner.server.name)
    else:
        age = (owner.deleted_at - (owner.finished_at or owner.created_at)).days
        journal.record("backup_deleted", actor=actor, obj=owner, kind=owner.kind, age_days=age)


def delete_run_artifacts(run, actor):
    """Retention's entry point for a backup run: see delete_artifacts()."""
    return delete_artifacts(run, actor)


def retry_deletions(now, limit=200):
    """Copies of retired runs and segments that a location refused to delete before."""
    retired = Q(run__deleted_at__isnull=False) | Q(wal_segment__deleted_at__isnull=False)
    due = Q(next_attempt_at=None) | Q(next_attempt_at__lte=now)
    todo = (
        BackupCopy.objects.filter(retired, due)
        .exclude(status=BackupCopy.Status.DELETED)
        .select_related("location")[:limit]
    )
    return sum(delete_copy(c, "job:retention") for c in todo)
