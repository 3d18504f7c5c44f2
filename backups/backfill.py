"""Manifests for what was backed up before manifests existed: `manage.py writemanifests`.

A portal upgraded from a version without signed manifests holds runs and WAL that no manifest
names: a catalog rebuilt from the storage locations (rebuildcatalog) would not find them. This
writes, once, what each backup would have been given when it was taken: the run's manifest
beside its artifacts (copied to every tier at once), and WAL manifests for the segments ingested
before the first pass that wrote one. Running it again writes nothing.
"""

from backupportal import journal
from backupportal.lib.signing import SigningError
from backups import manifests
from backups.copies import copy_one, plan_copies
from backups.crypto import EncryptionError
from backups.models import BackupCopy, Server
from backups.pipeline import BackupFailed
from backups.storage import StorageError
from backups.walingest import secondary_locations, wal_location


def backfill(dry_run=False, actor="system"):
    """{"runs": [{"id", "server", "kind", "manifest"}], "wal": [{"server", "segments", "manifests"}],
    "failed": [{"what", "error"}]}: what was (or, dry_run, would be) written."""
    result = {"dry_run": dry_run, "runs": [], "wal": [], "failed": []}
    for run in manifests.runs_without_manifest():
        listed = {"id": run.pk, "server": run.server.name, "kind": run.kind, "manifest": ""}
        if missing := manifests.not_in_primary(run):
            result["failed"].append({"what": f"run #{run.pk}", "error": _not_in_primary(missing)})
            continue
        if not dry_run:
            try:
                listed["manifest"] = manifests.backfill_run(run)
            except BackupFailed as e:
                result["failed"].append({"what": f"run #{run.pk}", "error": str(e)})
                continue
            _copy_manifest(run, actor)
        result["runs"].append(listed)
    location, secondaries = wal_location(), secondary_locations()
    for server in Server.objects.order_by("name"):
        _backfill_wal(server, location, secondaries, result)
    if not dry_run and (result["runs"] or result["wal"] or result["failed"]):
        journal.record(
            "manifests_backfilled",
            actor=actor,
            outcome="failed" if result["failed"] else "ok",
            runs=[r["id"] for r in result["runs"]],
            wal={w["server"]: w["segments"] for w in result["wal"]},
            failed=result["failed"],
        )
    return result


def _not_in_primary(artifacts):
    return (
        f"its {', '.join(artifacts)} has no good copy in the primary location, and a manifest must list every "
        "artifact: run manage.py verify, and copy it back from another location"
    )


def _copy_manifest(run, actor):
    """The new manifest to every other tier now; a tier that fails is retried by the copy
    schedule. Only the manifest: the run's other copies keep their own retry times."""
    plan_copies(run)
    for copy in BackupCopy.objects.filter(run=run, artifact=manifests.ARTIFACT, status=BackupCopy.Status.PENDING):
        copy_one(copy, actor=actor)


def _backfill_wal(server, location, secondaries, result):
    try:
        count = manifests.wal_before_manifests(server, location).count()
        if count and not result["dry_run"]:
            keys = manifests.backfill_wal(server, location, secondaries)
        else:
            keys = [] if not count else ["(dry run)"] * -(-count // manifests.MAX_WAL_ENTRIES)
    except (StorageError, EncryptionError, SigningError, OSError) as e:
        result["failed"].append({"what": f"WAL of {server.name}", "error": str(e)})
        return
    if count:
        result["wal"].append({"server": server.name, "segments": count, "manifests": keys})
