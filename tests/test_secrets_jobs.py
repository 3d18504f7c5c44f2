"""Secrets over whole jobs: /metrics, and every process a logical restore or a PITR job starts.

The jobs run as manage.py under `strace -f -v -e trace=execve`, which records the argv and the
environment of every program started. The portal process itself holds the S3 keys in its
environment (boto3 reads them there) and so is skipped; below it, no argv ever holds a secret,
no environment holds the passphrase or the S3 secret key, and the DSN password is only in
PGPASSWORD of the libpq client tools that connect with it (pg_dump, pg_restore, psql ...).
"""

import json
import os
import re
import stat
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from backups.models import BackupRun, WalSegment
from restores.models import RestoreRun
from tests import tracing
from tests.helpers import DSN_PASSWORD, S3_SECRET, enable_push, rows, switch_wal, wait_archived

pytest_plugins = ["tests.walfixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

PASSPHRASE = "Pass-Phrase-Tr4ce-77d0"
METRICS_TOKEN = "metrics-token-for-tests"
LIBPQ_CLIENTS = {"pg_dump", "pg_dumpall", "pg_restore", "psql", "pg_basebackup", "pg_receivewal"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def secret_passphrase(passphrase_file):
    passphrase_file.write_text(PASSPHRASE + "\n")
    return passphrase_file


def secrets():
    return {"passphrase": PASSPHRASE, "DSN password": DSN_PASSWORD, "S3 secret key": S3_SECRET}


def assert_no_secret(text, where):
    for name, secret in secrets().items():
        assert secret not in text, f"the {name} is in {where}"


# --- /metrics ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("secret_server")
def test_metrics_never_carry_a_secret(client, settings, sample_cluster, secret_passphrase, tiers):
    settings.METRICS_TOKEN = METRICS_TOKEN
    call_command("backup", "maldives", stdout=StringIO())
    tiers.server.stop()  # failed copies and an open upload alert, with their error texts
    sample_cluster.stop()  # and a failed backup, whose error names the server
    try:
        call_command("backup", "maldives", stdout=StringIO(), stderr=StringIO())
    except SystemExit:
        pass
    finally:
        sample_cluster.start()
        tiers.server.start()
    assert BackupRun.objects.filter(status="failed").exists()

    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    for accept in ["text/plain", "application/openmetrics-text; version=1.0.0"]:
        response = client.get(reverse("metrics"), headers=auth | {"Accept": accept})
        body = response.content.decode()
        assert response.status_code == 200 and "backupportal_backup_age_seconds" in body
        assert 'server="maldives"' in body and 'location="s3"' in body
        assert_no_secret(body, f"/metrics ({accept})")


# --- strace over whole jobs --------------------------------------------------------------------


def traced(settings, trace, *args, env=None):
    """manage.py ARGS --json under strace, with the S3 location's settings (tests.tracing.traced)."""
    s3 = dict(NAS_ROOT=settings.NAS_ROOT, S3_BUCKET=settings.S3_BUCKET, S3_ENDPOINT_URL=settings.S3_ENDPOINT_URL)
    return tracing.traced(settings, trace, *args, env={**s3, "S3_PREFIX": settings.S3_PREFIX, **(env or {})})


def assert_no_secret_passed_on(found):
    """Below the portal process: no secret in any argv; only libpq clients get the DSN password, as PGPASSWORD."""
    assert "AWS_SECRET_ACCESS_KEY" in found[0][3]  # the trace does show environments
    for pid, program, argv, envp in found[1:]:
        name = os.path.basename(program)
        if argv.startswith('"file", "-b", '):
            # Not ours: croniter's import calls platform.architecture(), which runs `file -b python`
            # with the interpreter's own environment (a child of the same user, gone at once).
            continue
        assert_no_secret(argv, f"the argv of {name} (pid {pid})")
        leaked = [v for v in envp.split('", "') if PASSPHRASE in v or S3_SECRET in v]
        assert not leaked, f"a secret is in the environment of {name} ({argv[:200]}): {leaked}"
        assert "AWS_" not in envp, f"S3 credentials are passed on to {name}"
        if DSN_PASSWORD in envp:
            # pg_dumpall finds pg_dump with `sh -c "…/pg_dump" -V`: its own children inherit its environment.
            version_probe = argv.endswith(' -V"') or argv.endswith('"-V"')
            assert name in LIBPQ_CLIENTS or version_probe, (
                f"the DSN password is in the environment of {name} ({argv[:300]})"
            )
            assert envp.count(DSN_PASSWORD) == envp.count(f'"PGPASSWORD={DSN_PASSWORD}"') == 1


def programs(found):
    return {os.path.basename(program) for _, program, _, _ in found}


def private(path):
    mode = path.stat().st_mode
    return mode & 0o077 == 0 and (stat.S_ISDIR(mode) or mode & 0o777 == 0o600)


@pytest.mark.usefixtures("secret_server")
def test_a_whole_logical_backup_and_restore_pass_no_secret_on(
    settings, sample_cluster, secret_passphrase, tiers, tmp_path
):
    backup, output, found = traced(settings, tmp_path / "backup.trace", "backup", "maldives")
    assert backup["status"] == "succeeded", output
    assert {"pg_dump", "pg_dumpall", "gpg"} <= programs(found)
    assert_no_secret_passed_on(found)
    assert_no_secret(output, "the backup's output")

    restore, output, found = traced(
        settings, tmp_path / "restore.trace", "restore", str(backup["id"]), "--into-database", "traced_copy"
    )
    assert restore["status"] == "succeeded", output
    assert {"pg_restore", "gpg"} <= programs(found)
    assert_no_secret_passed_on(found)
    assert_no_secret(output, "the restore's output")
    assert_no_secret(json.dumps(RestoreRun.objects.get(pk=restore["id"]).notes), "the restore's notes")
    with sample_cluster.connect("traced_copy") as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 200

    # Artifacts are the service user's alone, in every file location; so is their every directory.
    run = BackupRun.objects.get(pk=backup["id"])
    for root in (tiers.primary, tiers.nas):
        for key in run.details["keys"]:
            path = root / key
            assert private(path), f"{path} is mode {path.stat().st_mode & 0o777:o}"
            for parent in path.relative_to(root).parents:
                if parent != Path("."):
                    assert private(root / parent), f"{root / parent} is not private"


@pytest.mark.usefixtures("secret_server")
def test_a_whole_pitr_job_passes_no_secret_on(
    settings, sample_cluster, secret_passphrase, tiers, wal_spool, restored, tmp_path
):
    from backupportal.lib.osuser import free_port

    lines = enable_push(sample_cluster)
    assert_no_secret("\n".join(lines), "the archive_command lines")  # the archiver's argv, run by postgres
    # The server compresses (BASE_BACKUP in the portal's own connection: gpg is the only program),
    # then the client's way, pg_basebackup into zstd: neither hands a secret on.
    base, output, found = traced(settings, tmp_path / "base.trace", "backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", output
    assert "gpg" in programs(found) and not {"pg_basebackup", "zstd"} & programs(found)
    assert_no_secret_passed_on(found)
    assert_no_secret(output, "the base backup's output")
    env = {"BASE_COMPRESSION": "client"}
    base, output, found = traced(settings, tmp_path / "client.trace", "backup", "maldives", "--kind", "base", env=env)
    assert base["status"] == "succeeded", output
    assert {"pg_basebackup", "zstd", "gpg"} <= programs(found)
    assert_no_secret_passed_on(found)
    assert_no_secret(output, "the base backup's output")

    sample_cluster.execute("CREATE TABLE probe(x text); INSERT INTO probe VALUES ('after the base')", dbname=DB)
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    # The spool: written by the archive_command (postgres), read by the worker; nobody else.
    spooled = [p for p in wal_spool.rglob("*") if re.fullmatch(r"[0-9A-F]{24}", p.name)]
    assert spooled and all(p.stat().st_mode & 0o007 == 0 for p in spooled)

    datadir, port = restored(), free_port()
    restore, output, found = traced(
        settings,
        tmp_path / "pitr.trace",
        "restore",
        "--server",
        "maldives",
        "--target",
        "latest",
        "--into-datadir",
        str(datadir),
        "--port",
        str(port),
    )
    assert restore["status"] == "succeeded", output
    assert rows(port, "SELECT x FROM probe") == [("after the base",)]
    assert {"pg_ctl", "postgres", "zstd", "gpg"} <= programs(found)
    assert_no_secret_passed_on(found)
    assert_no_secret(output, "the restore's output")

    # The restored server runs on (as postgres, another OS user): its environment holds nothing of ours.
    postmaster = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    environ = Path(f"/proc/{postmaster}/environ").read_bytes().decode(errors="replace")
    assert_no_secret(environ, "the restored server's environment")
    assert "AWS_" not in environ
    for log in (datadir / "log").rglob("*"):
        if log.is_file():
            assert_no_secret(log.read_text(errors="replace"), f"the restored server's log {log.name}")
    # WAL in the archive, like every artifact, is the service user's alone.
    for segment in WalSegment.objects.filter(deleted_at=None):
        path = Path(settings.WAL_ROOT) / segment.key
        assert private(path), f"{path} is mode {path.stat().st_mode & 0o777:o}"


DB = "reliabilitymaldives"
