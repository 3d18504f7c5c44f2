"""Integrity verification: re-read every copy on every tier (S3 by streaming GET) and compare sha256.

A copy that is missing or hashes differently is marked bad and raises "corruption" for its
server; a location that cannot be reached is reported as unchecked, never as corrupt. A copy
under S3 Object Lock is read by its version, and its lock (mode, retain-until) read back from S3.
The weekly check reads the portal's own kept backups too (selfbackup.verify_copy): their copies
are listed on their PortalBackup row, not in the catalog's copies.
"""

import time

from django.db.models import Q
from django.utils import timezone

from backupportal import conditions, journal
from backups import selfbackup
from backups.copies import mark_bad, mark_faults, owner_of, record
from backups.models import BackupCopy, Server
from backups.storage import MissingArtifact, StorageError, store_for
from backups.streams import CHUNK, CopyCorrupt, open_copy

CHECKED = [BackupCopy.Status.OK, BackupCopy.Status.BAD]


def verify_copy(copy, actor="job:verify", progress=None):
    """Re-read one copy. Returns (verdict, error): "ok", "bad", or "unreachable" (not checked)."""
    try:
        with open_copy(copy) as reader:
            while chunk := reader.read(CHUNK):
                if progress:
                    progress.read(len(chunk))
    except (MissingArtifact, CopyCorrupt) as e:
        if (replaced := _replaced_since(copy)) is not None:
            return verify_copy(replaced, actor, progress)  # the object the catalog names now
        if isinstance(e, CopyCorrupt):
            mark_faults([e], actor)
        else:
            mark_bad(copy, str(e), actor=actor)
        return "bad", str(e)
    except (OSError, StorageError) as e:
        return "unreachable", str(e)
    BackupCopy.objects.filter(pk=copy.pk).update(status=BackupCopy.Status.OK, verified_at=timezone.now(), last_error="")
    if copy.status == BackupCopy.Status.BAD:
        record("copy_good_again", copy, actor)
    return "ok", ""


def _replaced_since(copy):
    """The copy as the catalog has it now when reencrypt gave it a new object (and removed the
    one read) since the verify listed it, hours ago on a weekly run; else None."""
    now = BackupCopy.objects.filter(pk=copy.pk).exclude(key=copy.key)
    return now.select_related("location", "run__server", "wal_segment__server").first()


def read_lock(copy):
    """The S3 Object Lock of a copy's version, read back with head_object: {"mode", "retain_until"
    (ISO)}, or None for a copy that has no version. "problem" says when S3 holds it for less than
    the catalog says (a governance lock lifted by someone with the bypass right)."""
    if not copy.version_id:
        return None
    try:
        lock = store_for(copy.location).lock_of(copy.key, copy.version_id)
    except (OSError, StorageError) as e:
        return {"mode": "", "retain_until": None, "problem": f"cannot read its lock: {e}"}
    until = lock["retain_until"]
    problem = ""
    if copy.retain_until and (until is None or until < copy.retain_until):
        problem = f"S3 holds it {'until ' + until.isoformat() if until else 'unlocked'}, the catalog says until {copy.retain_until.isoformat()}"
    return {"mode": lock["mode"], "retain_until": until.isoformat() if until else None, "problem": problem}


def _verify(copies, actor, list_all, progress=None, portal=()):
    """progress (a Verification, or None) is told the totals, each chunk read and each verdict.
    portal: [(row, copy)] of the portal's own backups (selfbackup.kept_copies()) read as well."""
    started = time.monotonic()
    if progress:
        progress.begin(copies, portal)
    counts = {"ok": 0, "bad": 0, "unreachable": 0}
    listed, servers, locks = [], set(), {"locked": 0, "lock_problems": 0}
    for copy in copies.select_related("location", "run__server", "wal_segment__server").iterator(chunk_size=500):
        verdict, error = verify_copy(copy, actor, progress)
        counts[verdict] += 1
        if progress:
            progress.checked(verdict)
        servers.add(owner_of(copy).server_id)
        lock = read_lock(copy) if verdict != "unreachable" else None
        locks["locked"] += bool(lock and lock["retain_until"])
        locks["lock_problems"] += bool(lock and lock["problem"])
        if list_all or verdict != "ok" or (lock and lock["problem"]):
            listed.append(
                {
                    "run": copy.run_id,
                    "wal_segment": copy.wal_segment.name if copy.wal_segment_id else None,
                    "location": copy.location.name,
                    "artifact": copy.artifact,
                    "key": copy.key,
                    "status": verdict,
                    "error": error,
                    "lock": lock,
                }
            )
    for row, copy in portal:
        found = selfbackup.verify_copy(row, copy, actor, progress)
        if found is None:
            continue  # removed by the daily selfbackup since it was listed
        verdict, error = found
        counts[verdict] += 1
        if progress:
            progress.checked(verdict)
        if list_all or verdict != "ok":
            listed.append(
                {"run": None, "wal_segment": None, "location": copy["location"], "artifact": f"portal backup #{row.pk}"}
                | {"key": row.key, "status": verdict, "error": error, "lock": None}
            )
    for server in Server.objects.filter(pk__in=servers):
        conditions.changed("corruption", server=server)  # the monitor reads the copies' rows
    return {
        "checked": sum(counts.values()),
        **counts,
        **locks,
        "duration_s": round(time.monotonic() - started, 3),
        "copies": listed,
    }


def bad_copies(server):
    """Bad copies of what is still kept (retention has not deleted it) for one server."""
    live = Q(run__server=server, run__deleted_at=None) | Q(wal_segment__server=server, wal_segment__deleted_at=None)
    return BackupCopy.objects.filter(live, status=BackupCopy.Status.BAD)


def verify_run(run, actor="job:verify", progress=None):
    """Every copy of one run, in every location."""
    result = {"run": run.pk, **_verify(run.copies.filter(status__in=CHECKED), actor, True, progress)}
    _journal("verify", result, actor, obj=run)
    return result


def verify_all(actor="job:verify", progress=None):
    """Every copy of every kept run and WAL segment, in every location, and of the portal's own
    kept backups (selfbackup): the weekly check."""
    live = Q(run__isnull=False, run__deleted_at=None) | Q(wal_segment__isnull=False, wal_segment__deleted_at=None)
    copies = BackupCopy.objects.filter(live, status__in=CHECKED).order_by("pk")
    result = {"run": None, **_verify(copies, actor, False, progress, selfbackup.kept_copies())}
    _journal("verify_all", result, actor)
    return result


def _journal(action, result, actor, obj=None):
    counts = {k: result[k] for k in ("checked", "bad", "unreachable")}
    if result["locked"] or result["lock_problems"]:  # only where a location locks its objects
        counts |= {k: result[k] for k in ("locked", "lock_problems")}
    outcome = "ok" if result["checked"] == result["ok"] and not result["lock_problems"] else "failed"
    journal.record(action, actor=actor, obj=obj, outcome=outcome, **counts)


def execute(verification):
    """Read every copy now (on a worker, or in the foreground) and return verify's result; the
    Verification row follows it (its page polls the row)."""
    verification.start()
    actor = verification.requested_by or "job:verify"
    try:
        if verification.run_id:
            result = verify_run(verification.run, actor, progress=verification)
        else:
            result = verify_all(actor, progress=verification)
    except Exception as e:
        verification.finish_failed(f"the verification stopped: {e}")
        raise
    verification.finish(result)
    return result | {"verification": verification.pk}
