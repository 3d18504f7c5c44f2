"""The strategy's 6-hourly incremental (08:00, 14:00, 20:00).

On PostgreSQL 17 and newer it is a block-level incremental backup: `pg_basebackup
--incremental=MANIFEST` against the newest backup of the chain (a full base backup or an
earlier incremental), whose whole backup_manifest every such backup keeps, encrypted, beside
its artifact. It needs `summarize_wal = on` on the server and the WAL summaries since the
parent (kept `wal_summary_keep_time`). Stored like a base backup (zstd, gpg, every tier);
`pg_combinebackup FULL INCR... -o DIR` rebuilds a data directory from the chain.

On 15 and 16 there is nothing of the kind: the run switches WAL and proves the archive chain
(backups.base.wal_chain), and says so ("method": "wal-chain").
"""

import shutil

import psycopg
from django.utils import timezone

from backupportal.lib.pgerrors import explain
from backupportal.lib.scratch import scratch_dir
from backups import base
from backups.copies import decrypt_here, healthy_copies, restorable
from backups.crypto import Encryption, EncryptionError
from backups.models import BackupRun
from backups.pipeline import BackupFailed
from backups.streams import FetchFailed, FileSink


def take(run):
    """A run of kind incremental: block-level on 17+, the WAL-chain proof before."""
    block = run.server.takes_block_incrementals
    run.details["method"] = "block" if block else "wal-chain"
    run.save(update_fields=["details"])  # a failed run says which it was too
    (take_block if block else base.wal_chain)(run)


# How far back a parent is looked for: a day of six-hourly links on each of a week's fulls.
PARENTS_LOOKED_AT = 40


def parent_of(server):
    """The newest good backup of the server's chain that a restore could use: a full base backup
    or a block incremental, restorable (copies.restorable) down to its full. One whose copy the
    verify found bad (or whose ancestor's) made an incremental that said "succeeded" and could
    never be restored; None when there is none to build on."""
    chain = server.runs.good().filter(kind=BackupRun.Kind.BASE) | server.runs.good().filter(
        kind=BackupRun.Kind.INCREMENTAL, details__method="block"
    )
    candidates = list(chain.order_by("-finished_at", "-pk")[:PARENTS_LOOKED_AT])
    usable, by_pk = restorable(candidates), {run.pk: run for run in candidates}
    return next((run for run in candidates if sound(run, by_pk, usable)), None)


def sound(run, by_pk, usable):
    """`run` and each of its parents down to its full base backup are restorable (`usable`); an
    ancestor older than the runs looked at is read from the catalog (a long chain)."""
    seen = set()
    while run is not None and run.pk in usable and run.pk not in seen:
        if run.kind == BackupRun.Kind.BASE:
            return True
        seen.add(run.pk)
        parent = run.parent_run_id
        if parent not in by_pk:
            older = BackupRun.objects.good().filter(pk=parent).first()
            by_pk[parent] = older
            usable |= restorable([older]) if older is not None else set()
        run = by_pk[parent]
    return False


def key_for(run):
    stamp = timezone.localtime(run.created_at).strftime("%Y%m%dT%H%M%S%z")
    return f"{run.server.name}/incremental/{stamp}-{run.pk}.tar.zst.gpg"


def take_block(run):
    server = run.server
    base.require_archiving(server, "incremental backup")
    require_summaries(server)
    parent = parent_of(server)
    if parent is None:
        raise BackupFailed(
            f"{server} has no base backup for an incremental to build on (none, or none whose copies are good"
            f" down to its full): take one with manage.py backup {server.name} --kind base"
        )
    run.details["parent"] = parent.pk
    scratch = scratch_dir("manifest")  # the parent's decrypted manifest, removed after the run
    try:
        manifest = fetch_manifest(parent, scratch)
        try:
            base.take_tar(run, "incremental backup", key_for(run), [f"--incremental={manifest}"])
        except BackupFailed as e:
            raise BackupFailed(summaries_gone(e, server, parent)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def require_summaries(server):
    try:
        with server.connect() as conn:
            on = conn.execute("SHOW summarize_wal").fetchone()[0] == "on"
    except psycopg.Error as e:
        raise BackupFailed(f"cannot read summarize_wal: {explain(e, server)}") from None
    if not on:
        raise BackupFailed(
            f"summarize_wal is off on {server}: an incremental backup needs it; set summarize_wal = on in "
            f"postgresql.conf, reload, then take a full base backup (manage.py backup {server.name} --kind base)"
        )


def fetch_manifest(parent, scratch):
    """The parent's whole backup_manifest, decrypted into `scratch` (0600)."""
    path = scratch / "backup_manifest"
    copies = healthy_copies(parent, "manifest")
    if not copies:
        raise BackupFailed(
            f"backup #{parent.pk} kept no backup_manifest (taken before manifests were kept), so nothing can be "
            f"built on it: take a full base backup (manage.py backup {parent.server.name} --kind base)"
        )
    try:
        decrypt_here(copies, FileSink(path), Encryption(), f"the manifest of backup #{parent.pk}", actor="job:backup")
    except (FetchFailed, EncryptionError) as e:
        raise BackupFailed(
            f"{e}: take a full base backup (manage.py backup {parent.server.name} --kind base)"
        ) from None
    return path


def summaries_gone(error, server, parent):
    """pg_basebackup's refusal when the WAL summaries since the parent are missing, or when the
    parent is on a timeline the server left (a failover), said as what to do."""
    if "manifest requires WAL from final timeline" in str(error):
        return (
            f"backup #{parent.pk} was taken on a timeline {server} has left (a failover or a promotion since):"
            f" an incremental cannot build on it; take a full base backup (manage.py backup {server.name} --kind base)"
        )
    if "WAL summaries are required" not in str(error):
        return str(error)
    return (
        f"the WAL summaries since backup #{parent.pk} are gone (wal_summary_keep_time) or were never made "
        f"(summarize_wal was off then): take a full base backup (manage.py backup {server.name} --kind base)"
    )
