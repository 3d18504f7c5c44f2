"""Key custody, as restores prove it: which key each kept artifact needs, which restore test
proved each key, and the monthly restore test of every key in use (backups.keyring keeps them)."""

from dataclasses import dataclass

from django.db.models import Count

from backups.models import BackupCopy, BackupRun, EncryptionKey
from restores.models import RestoreTest
from restores.restoretest import run_restore_test

TESTED_KINDS = [BackupRun.Kind.LOGICAL, BackupRun.Kind.BASE]


@dataclass
class KeyRow:
    """A row of the key custody page: nothing secret (the id, the kind, public recipients)."""

    key: EncryptionKey
    artifacts: dict  # artifact ("main", "globals", "manifest", "wal") -> copies that need the key
    proved_by: RestoreTest | None

    @property
    def needed(self):
        return sum(self.artifacts.values())


def custody():
    """Every key, newest first, with the copies that need it and the newest passed test that proved it."""
    rows = []
    for key in EncryptionKey.objects.all():
        counted = key.artifacts().values("artifact").annotate(n=Count("pk")).order_by("artifact")
        proved = (
            RestoreTest.objects.filter(encryption_key=key.pk, status=RestoreTest.Status.PASSED)
            .select_related("server", "backup_run")
            .order_by("-finished_at", "-pk")
            .first()
        )
        rows.append(KeyRow(key, {c["artifact"]: c["n"] for c in counted}, proved))
    return rows


def newest_backup_with(key):
    """The newest good logical or base backup whose copies are all made with `key`, or None."""
    made = BackupCopy.objects.filter(encryption_key=key, artifact="main", status=BackupCopy.Status.OK)
    other = BackupCopy.objects.exclude(encryption_key=key).filter(artifact="main", status=BackupCopy.Status.OK)
    runs = (
        BackupRun.objects.good()
        .filter(kind__in=TESTED_KINDS, pk__in=made.values("run"))
        .exclude(pk__in=other.values("run"))
    )
    return runs.select_related("server", "database").order_by("-finished_at", "-pk").first()


def keys_in_use():
    """Keys still in the keyring that kept copies need."""
    return [key for key in EncryptionKey.objects.in_keyring().order_by("created_at") if key.artifacts().exists()]


def monthly_key_tests(actor="job:keytest"):
    """Per key in use, the newest good backup encrypted with it, restore-tested (restoretest.py).
    Returns the tests; a key with no such backup (WAL only) has none."""
    tests = []
    for key in keys_in_use():
        run = newest_backup_with(key)
        if run is None:
            continue
        database = run.database if run.kind == BackupRun.Kind.LOGICAL else None
        tests.append(run_restore_test(run.server, monthly=True, actor=actor, kind=run.kind, database=database, run=run))
    return tests
