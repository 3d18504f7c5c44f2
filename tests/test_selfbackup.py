"""The portal's own database, protected like any server: selfbackup to every tier, and a portal
brought back from it on a new host (restoreportal) whose journal verifies up to the entries lost
with the old host, once a person acknowledges them."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from backupportal import journal
from backupportal.models import JournalEntry
from backups import selfbackup
from backups.models import BackupRun, PortalBackup
from tests.helpers import portal_env, run_command
from tests.stock import GPG, stock
from watching import monitor
from watching.models import Alert

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
# The catalog a restored portal must give back; the selfbackup's own row is written after the
# backup (it never holds itself), and django-q2's rows are the worker's, not the catalog.
CATALOG = ["auth.user", "auth.group", "backups", "restores", "watching"]


@pytest.fixture
def anchors_on(settings):
    settings.JOURNAL_ANCHORS = True


def catalog_json(env=None):
    """dumpdata of the catalog, in this process or (env) in a portal on another host."""
    args = ["dumpdata", *CATALOG, "--exclude", "backups.PortalBackup", "--indent", "0"]
    if env is None:
        out = StringIO()
        call_command(*args, stdout=out)
        text = out.getvalue()
    else:
        text = portal(env, *args).stdout
    return sorted(json.loads(text), key=lambda o: (o["model"], str(o["pk"])))


def portal(env, *args, check=True):
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def new_host(settings, tiers, passphrase_file):
    """A second host: its own VAR_DIR and an empty database of the same engine; the old host's
    keys copied in by hand, as the README says (they are never in the selfbackup): the signing
    key's directory is the old host's own."""
    var = Path(tempfile.mkdtemp(prefix="bp-newhost-"))
    keys = var / "keys"
    keys.mkdir(mode=0o700)
    shutil.copy(settings.JOURNAL_KEY_FILE, keys / "journal.key")
    shutil.copy(passphrase_file, keys / "passphrase")
    if connection.vendor == "sqlite":
        url, dropped = f"sqlite:///{var / 'portal.sqlite3'}", None
    else:
        name = f"{connection.settings_dict['NAME']}_newhost"[:63]
        with connection.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        db = connection.settings_dict
        url, dropped = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}", name
    env = portal_env(
        settings,
        VAR_DIR=var,
        DATABASE_URL=url,
        DJANGO_SETTINGS_MODULE="backupportal.settings",
        JOURNAL_KEY_FILE=keys / "journal.key",
        JOURNAL_HEAD_FILE=var / "journal.head",
        BACKUP_PASSPHRASE_FILE=keys / "passphrase",
        SIGNING_KEY_DIR=settings.SIGNING_KEY_DIR,
        SECRETS_KEY_FILE=var / "secrets.key",
        WAL_SPOOL=var / "walspool",
        NAS_ROOT=settings.NAS_ROOT,
        S3_BUCKET=settings.S3_BUCKET,
        S3_ENDPOINT_URL=settings.S3_ENDPOINT_URL,
        S3_PREFIX=settings.S3_PREFIX,
        SECURE_SSL_REDIRECT="false",
    )
    yield env, var
    shutil.rmtree(var, ignore_errors=True)
    if dropped:
        with connection.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{dropped}" WITH (FORCE)')


def fetch_from_s3(tiers, key, into):
    """What a DBA does on the new host: the file, its .sha256 and .json, from the bucket with plain boto3."""
    for name in (key, key + ".sha256", key + ".json"):
        tiers.s3.download_file(tiers.bucket, f"backupportal/{name}", str(into / Path(name).name))
    return into / Path(key).name


def test_a_restored_selfbackup_gives_the_same_catalog_and_a_journal_intact_up_to_the_lost_entries(
    settings, tiers, passphrase_file, server, alice, anchors_on, new_host, tmp_path
):
    env, var = new_host
    call_command("backup", "maldives", stdout=StringIO())
    result = run_command("selfbackup")
    assert result["_exit"] == 0 and result["status"] == "succeeded", result
    assert {c["location"]: c["status"] for c in result["copies"]} == {"primary": "ok", "nas": "ok", "s3": "ok"}
    assert len({c["sha256"] for c in result["copies"]}) == 1
    before = catalog_json()
    # Entries after the backup, anchored in every location: the old host then burns.
    for n in range(3):
        journal.record("admin_changed", actor="alice", outcome="info", note=f"after the selfbackup {n}")
    anchored = journal.write_anchors()
    assert anchored["entry"] > result["journal_entry"]

    backup = fetch_from_s3(tiers, result["key"], var)
    stock(f"cd {var} && sha256sum -c --quiet {backup.name}.sha256", tmp_path, passphrase_file)
    restored = json.loads(portal(env, "restoreportal", str(backup), "--json").stdout.splitlines()[-1])
    assert restored["restored_up_to"] == result["journal_entry"] and restored["sha256_checked"] is True
    assert restored["signature_verified"] is True
    assert catalog_json(env) == before

    # The journal verifies up to the backup's end, and names what the anchors hold beyond it.
    refused = portal(env, "verifyjournal", check=False)
    n = result["journal_entry"]
    assert refused.returncode == 1
    assert f"intact up to #{n}; entries after #{n} were lost with the host" in refused.stderr
    said = refused.stderr.strip().splitlines()[-1]  # boto3 logs its credentials' source above it
    assert said.startswith("journal NOT intact: intact up to") and f"entries up to #{anchored['entry']}" in said
    portal(env, "verifyjournal", "--acknowledge-loss", "--reason", "host burnt; restored from the 03:15 selfbackup")
    verdict = json.loads(portal(env, "verifyjournal", "--json").stdout.splitlines()[-1])
    assert verdict["ok"] is True and verdict["exit_code"] == 0
    # The restored portal goes on: its new anchors are checked with the rest.
    portal(env, "shell", "-c", "from backupportal import journal; journal.write_anchors()")
    assert portal(env, "verifyjournal").returncode == 0


def test_the_selfbackup_holds_no_key_and_opens_with_stock_gpg(settings, tiers, passphrase_file, server, tmp_path):
    result = run_command("selfbackup")
    plain = tmp_path / "plain"
    primary = Path(tiers.primary) / result["key"]
    stock(f"{GPG} --decrypt {primary} > {plain}", tmp_path, passphrase_file)
    data = plain.read_bytes()
    if connection.vendor == "sqlite":
        assert data.startswith(b"SQLite format 3\x00")
    else:
        assert data.startswith(b"PGDMP")
        data = subprocess.run(
            ["/usr/lib/postgresql/15/bin/pg_restore", "-f", "-", str(plain)], capture_output=True, check=True
        ).stdout
        assert b"backupportal_journalentry" in data
    for secret in (Path(settings.JOURNAL_KEY_FILE).read_text().strip(), passphrase_file.read_text().strip()):
        assert secret.encode() not in data
    assert server.name.encode() in data  # the catalog is in it


def test_without_a_passphrase_the_selfbackup_fails_in_one_line_and_stores_nothing(settings, tiers, server):
    settings.BACKUP_PASSPHRASE_FILE = ""
    result = run_command("selfbackup")
    assert result["_exit"] == 1 and result["status"] == "failed"
    assert result["_stderr"].strip().count("\n") == 0 and "BACKUP_PASSPHRASE_FILE" in result["_stderr"]
    assert not (Path(tiers.primary) / "portal").exists() and not (Path(tiers.nas) / "portal").exists()
    assert PortalBackup.objects.get().status == "failed"


def test_a_location_down_fails_its_copy_not_the_selfbackup(settings, tiers, passphrase_file, server):
    tiers.server.stop()
    result = run_command("selfbackup")
    assert result["_exit"] == 0 and result["status"] == "succeeded"
    by_location = {c["location"]: c for c in result["copies"]}
    assert by_location["nas"]["status"] == "ok" and by_location["s3"]["status"] == "failed"
    assert by_location["s3"]["error"]


def test_the_monitor_alerts_when_the_newest_selfbackup_is_older_than_26_hours(
    client, alice, settings, tiers, passphrase_file
):
    assert run_command("selfbackup")["status"] == "succeeded"
    monitor.check_portal_backup()
    assert not Alert.objects.filter(condition="portal_backup_stale").exists()
    with time_machine.travel(timezone.now() + timedelta(hours=27), tick=False):
        monitor.check_portal_backup()
        alert = Alert.objects.get(condition="portal_backup_stale", state="open")
        assert "no backup from the last 26 hours" in alert.message
        client.force_login(alice)
        page = client.get(reverse("dashboard")).content.decode()
        assert 'id="portal-backup"' in page and '<span class="dot red"></span>Last backed up' in page
        assert run_command("selfbackup")["status"] == "succeeded"
        monitor.check_portal_backup()
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_the_weekly_verify_reads_the_portals_own_backups_and_alerts_on_a_bad_copy(
    settings, tiers, passphrase_file, server
):
    """A corrupt NAS file and a deleted S3 object are found by verify, marked on the row,
    journalled and alerted; retention of selfbackups never counts an unreadable one as kept."""
    settings.SELFBACKUP_KEEP = 2
    with time_machine.travel(timezone.now(), tick=False):  # both within the same second
        older = PortalBackup.objects.get(pk=run_command("selfbackup")["id"])
        row = PortalBackup.objects.get(pk=run_command("selfbackup")["id"])
    assert older.key < row.key and row.key.endswith("_2.sqlite3.gpg" if older.engine == "sqlite" else "_2.dump.gpg")
    assert run_command("verify")["_exit"] == 0  # every copy of both reads back
    nas_file = Path(tiers.nas) / row.key
    original = nas_file.read_bytes()
    nas_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    tiers.s3.delete_object(Bucket=tiers.bucket, Key=f"backupportal/{row.key}")

    result = run_command("verify")
    assert result["_exit"] == 1 and result["bad"] == 2 and result["unreachable"] == 0
    listed = {c["location"]: c for c in result["copies"]}
    assert set(listed) == {"nas", "s3"} and listed["nas"]["artifact"] == f"portal backup #{row.pk}"
    assert "hashes to" in listed["nas"]["error"] and "missing" in listed["s3"]["error"].lower()
    row.refresh_from_db()
    assert {c["location"]: c["status"] for c in row.copies} == {"primary": "ok", "nas": "bad", "s3": "bad"}
    bad = JournalEntry.objects.filter(action="selfbackup_copy_bad", object_id=str(row.pk))
    assert bad.count() == 2 and all(e.outcome == "failed" for e in bad)

    monitor.check_portal_backup_copies()
    alert = Alert.objects.get(condition="corruption", subject="portal", state="open")
    assert "2 copies of the portal's own backups read back bad" in alert.message
    assert PortalBackup.objects.newest_good() == row  # its primary copy still reads

    # Every copy of the newest bad: it is not the newest good one, and it does not count towards
    # the kept ones, so the older, readable one stays.
    primary_file = Path(tiers.primary) / row.key
    primary_file.write_bytes(b"not the backup")
    assert run_command("verify")["bad"] == 3
    assert PortalBackup.objects.newest_good() == older
    settings.SELFBACKUP_KEEP = 1
    assert selfbackup.remove_old("test") == []
    older.refresh_from_db()
    assert older.deleted_at is None and (Path(tiers.primary) / older.key).exists()

    # Put right (the files copied back by hand): good again, journalled, the alert resolves.
    for path in (nas_file, primary_file):
        path.write_bytes(original)
    tiers.s3.put_object(Bucket=tiers.bucket, Key=f"backupportal/{row.key}", Body=original)
    assert run_command("verify")["_exit"] == 0
    assert JournalEntry.objects.filter(action="selfbackup_copy_good_again", object_id=str(row.pk)).count() == 3
    monitor.check_portal_backup_copies()
    alert.refresh_from_db()
    assert alert.state == "resolved"

    # Removed by the daily selfbackup after the weekly verify listed it: not read, not condemned.
    listed = selfbackup.kept_copies()
    older.deleted_at = timezone.now()
    older.save(update_fields=["deleted_at"])
    (Path(tiers.primary) / older.key).unlink()
    assert [selfbackup.verify_copy(r, c) for r, c in listed if r.pk == older.pk] == [None, None, None]


def test_acknowledging_a_loss_on_a_journal_never_restored_is_refused(tiers, passphrase_file):
    journal.record("admin_changed", actor="alice", outcome="info")
    result = run_command("verifyjournal", "--acknowledge-loss", "--reason", "why not")
    assert result["_exit"] == 1 and "nothing to acknowledge" in result["_stderr"]
    assert BackupRun.objects.count() == 0


def test_the_daily_schedule_runs_the_selfbackup(settings, tiers, passphrase_file):
    from django_q.models import Schedule

    from backups.tasks import selfbackup

    assert Schedule.objects.get(name="selfbackup").func == "backups.tasks.selfbackup"
    assert selfbackup() == "succeeded"
    assert PortalBackup.objects.get().requested_by == "job:selfbackup"
    assert os.listdir(Path(tiers.nas) / "portal")


def test_restoreportal_never_restores_over_a_database_in_use(tiers, passphrase_file, server):
    result = run_command("selfbackup")
    again = run_command("restoreportal", str(Path(tiers.primary) / result["key"]))
    assert again["_exit"] == 1 and "already holds tables" in again["_stderr"]
    assert "\n" not in again["_stderr"].strip()


def test_restoreportal_refuses_a_file_that_does_not_match_its_sha256(tiers, passphrase_file, tmp_path):
    result = run_command("selfbackup")
    copy = tmp_path / Path(result["key"]).name
    data = bytearray((Path(tiers.primary) / result["key"]).read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    shutil.copy(Path(tiers.primary) / (result["key"] + ".sha256"), tmp_path)
    refused = run_command("restoreportal", str(copy))
    assert refused["_exit"] == 1 and "the file is damaged or incomplete" in refused["_stderr"]


def test_restoreportal_refuses_a_journal_key_that_does_not_open_the_journal(
    settings, tiers, passphrase_file, server, new_host
):
    env, var = new_host
    Path(env["JOURNAL_KEY_FILE"]).write_text("0" * 64)
    journal.record("admin_changed", actor="alice", outcome="info")
    result = run_command("selfbackup")
    # Told by the .json beside the file, before anything is restored.
    refused = portal(env, "restoreportal", str(Path(tiers.primary) / result["key"]), check=False)
    assert refused.returncode == 1
    assert "not signed with the key in JOURNAL_KEY_FILE" in refused.stderr.strip().splitlines()[-1]
    assert (
        "Tables:[]"
        in portal(
            env,
            "shell",
            "-c",
            "from django.db import connection; print('Tables:' + str(connection.introspection.table_names()))",
        ).stdout
    )
    # Without the signed .json nothing is restored at all.
    alone = var / Path(result["key"]).name
    shutil.copy(Path(tiers.primary) / result["key"], alone)
    refused = portal(env, "restoreportal", str(alone), check=False)
    assert refused.returncode == 1 and "fetch it from the same location" in refused.stderr


def test_restoreportal_refuses_in_one_line_a_target_file_that_is_not_an_sqlite_database(
    tiers, passphrase_file, new_host
):
    if connection.vendor != "sqlite":
        pytest.skip("the target is an SQLite file")
    env, var = new_host
    taken = run_command("selfbackup")
    junk = b"not a database, whatever it is\n" * 200
    (var / "portal.sqlite3").write_bytes(junk)
    refused = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), check=False)
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr, refused.stderr[-2000:]
    said = refused.stderr.strip().splitlines()
    assert len(said) == 1 and "is not an SQLite database" in said[0], refused.stderr
    assert (var / "portal.sqlite3").read_bytes() == junk  # never overwritten: it may be something else's


CRASH_MID_TRANSACTION = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("CREATE TABLE t (x)")
db.execute("INSERT INTO t SELECT randomblob(500) FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3000) SELECT n FROM c)")
db.execute("PRAGMA cache_size = 2")  # the update spills into the file: its journal is hot
db.execute("BEGIN")
db.execute("UPDATE t SET x = randomblob(500)")
os._exit(0)
"""


def test_restoreportal_refuses_while_the_old_databases_hot_journal_lies_beside_the_target(
    tiers, passphrase_file, new_host
):
    if connection.vendor != "sqlite":
        pytest.skip("the target is an SQLite file")
    env, var = new_host
    taken = run_command("selfbackup")
    # The old portal died mid-transaction; its database was moved away, as the refusal says, and
    # its hot journal stayed: SQLite would roll it back into whatever file takes that name.
    target = var / "portal.sqlite3"
    subprocess.run([sys.executable, "-c", CRASH_MID_TRANSACTION, str(target)], check=True)
    target.rename(var / "portal.sqlite3.broken")
    hot = var / "portal.sqlite3-journal"
    assert hot.stat().st_size > 0
    refused = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), check=False)
    said = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(said) == 1, refused.stdout + refused.stderr[-2000:]
    assert "portal.sqlite3-journal" in said[0] and "move it away" in said[0]
    assert not target.exists() and hot.stat().st_size > 0
    # Moved away with its database, the restore goes ahead and the database is whole.
    hot.rename(var / "portal.sqlite3.broken-journal")
    portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]))
    assert "ok" in portal(env, "dbshell", "--", "PRAGMA integrity_check;").stdout


def test_restoreportal_with_the_wrong_passphrase_says_so_in_one_line_and_restores_nothing(
    tiers, passphrase_file, new_host
):
    env, var = new_host
    taken = run_command("selfbackup")
    Path(env["BACKUP_PASSPHRASE_FILE"]).write_text("not the passphrase that encrypted it\n")
    refused = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), check=False)
    said = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(said) == 1, refused.stderr
    assert "opens with none of the 1 key(s) tried" in said[0] and "wrong passphrase or key" in said[0]
    shown = "from django.db import connection; print('Tables:' + str(connection.introspection.table_names()))"
    assert "Tables:[]" in portal(env, "shell", "-c", shown).stdout


def test_after_a_restore_on_the_same_host_verifyjournal_names_the_entries_only_the_old_head_file_knew(
    settings, tiers, passphrase_file, anchors_on, new_host
):
    env, var = new_host
    journal.record("admin_changed", actor="alice", outcome="info")
    taken = run_command("selfbackup")  # the anchors name the selfbackup's own entry, past its end
    anchored = json.loads(Path(settings.JOURNAL_HEAD_FILE).read_text())["entry"]
    for n in range(3):  # written before the next hourly anchor: only the head file names them
        newest = journal.record("admin_changed", actor="alice", outcome="info", note=f"unanchored {n}")
    # The database is lost; VAR_DIR and its head file survive, and the portal is restored there.
    shutil.copy(settings.JOURNAL_HEAD_FILE, env["JOURNAL_HEAD_FILE"])
    portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]))
    refused = portal(env, "verifyjournal", check=False)
    said = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and newest.pk > anchored
    assert f"intact up to #{taken['journal_entry']}" in said and f"name entries up to #{newest.pk}," in said, said
    assert "the old host's head file" in said
    portal(env, "verifyjournal", "--acknowledge-loss", "--reason", "restored on the same host")
    assert portal(env, "verifyjournal").returncode == 0


def test_restoreportal_refuses_before_restoring_when_the_journal_head_file_cannot_be_written(
    tiers, passphrase_file, new_host
):
    env, var = new_host
    taken = run_command("selfbackup")
    (var / "not-a-directory").write_text("")
    env["JOURNAL_HEAD_FILE"] = str(var / "not-a-directory" / "journal.head")
    refused = portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]), check=False)
    said = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(said) == 1, refused.stderr[-2000:]
    assert "JOURNAL_HEAD_FILE" in said[0] and "run restoreportal again" in said[0]
    shown = "from django.db import connection; print('Tables:' + str(connection.introspection.table_names()))"
    assert "Tables:[]" in portal(env, "shell", "-c", shown).stdout  # nothing restored: it can be run again
    env["JOURNAL_HEAD_FILE"] = str(var / "journal.head")
    portal(env, "restoreportal", str(Path(tiers.primary) / taken["key"]))
