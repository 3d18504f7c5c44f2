"""A base backup hears what the server skipped whatever language the server speaks (lc_messages).

The portal recognises a skipped database directory by the server's words ("skipping special
file"), and pg_basebackup's stderr by "WARNING:". A server set to another lc_messages said
"WARNUNG:  überspringe besondere Datei »./base/16384«": pg_basebackup's backup said "succeeded"
without the database. The backup's connection now asks for lc_messages C; a role that may not
set it gets the server's language, and any warning then heard fails the backup; the server
sends the backup's connections its warnings, and nothing less, whatever its client_min_messages."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from backups import basestream, walspool
from backups.models import BackupRun, Server
from tests.helpers import database_moved_away, enable_push, run_command, wait_for

pytest_plugins = ["tests.walfixtures"]

GERMAN = "de_DE.UTF-8"

needs_german = pytest.mark.skipif(
    "de_DE.utf8" not in subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout,
    reason="no de_DE.UTF-8 locale on this host (localedef -i de_DE -f UTF-8 de_DE.UTF-8 makes one)",
)


def speak_german(cluster):
    cluster.execute(f"ALTER SYSTEM SET lc_messages = '{GERMAN}'")
    cluster.execute("SELECT pg_reload_conf()")
    assert cluster.execute("SHOW lc_messages")[0][0] == GERMAN


@needs_german
@pytest.mark.parametrize("compression", ["server", "client"])  # BASE_BACKUP read here; pg_basebackup
def test_a_server_speaking_german_still_fails_the_base_backup_naming_the_skipped_directory_in_english(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    settings.BASE_COMPRESSION = compression
    enable_push(sample_cluster)
    speak_german(sample_cluster)
    with database_moved_away(sample_cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed", result
    assert f'skipping special file "./base/{oid}": what it skipped would be missing' in result["error"]


@needs_german
@pytest.mark.parametrize("compression", ["server", "client"])
def test_a_replication_role_that_may_not_set_lc_messages_backs_up_and_a_german_warning_still_fails_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    """lc_messages is a superuser's setting: the server refuses a connection of another role that
    sets it. Such a role's backups go on in the server's language, and a warning they cannot read
    fails the backup rather than pass it."""
    settings.BASE_COMPRESSION = compression
    enable_push(sample_cluster)
    sample_cluster.execute("CREATE ROLE backup_only LOGIN REPLICATION PASSWORD 'not-a-superuser'")
    sample_cluster.execute("GRANT pg_read_all_settings, pg_read_all_stats, pg_monitor TO backup_only")
    server = Server.objects.get(pk=server.pk)
    server.dsn = sample_cluster.dsn("reliabilitymaldives", user="backup_only")
    server.password = "not-a-superuser"
    server.save()
    speak_german(sample_cluster)
    assert not basestream.speaks_english(server)  # "keine Berechtigung, um Parameter lc_messages zu setzen"
    assert basestream.word_for_warning(server) == "WARNUNG"
    plain = run_command("backup", "maldives", "--kind", "base")
    assert plain["status"] == "succeeded", plain["error"]  # the refused lc_messages did not stop it
    with database_moved_away(sample_cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed", result
    assert f"./base/{oid}" in result["error"] and "what it skipped would be missing" in result["error"]
    assert f"überspringe besondere Datei »./base/{oid}«" in result["error"]  # not "��berspringe"
    assert not BackupRun.objects.get(pk=result["id"]).copies.exists()


def replication_only(sample_cluster, server, role="replicates_only"):
    """The portal's server row as a role that is no superuser and that pg_hba.conf lets in for
    replication only: an ordinary connection of it is refused."""
    walspool.segment_size(server)  # learnt as a superuser's checkserver (or the WAL ingest) does
    sample_cluster.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'not-a-superuser'")
    hba = sample_cluster.datadir / "pg_hba.conf"
    hba.write_text(
        f"host replication {role} 127.0.0.1/32 scram-sha-256\nhost all {role} 127.0.0.1/32 reject\n" + hba.read_text()
    )
    sample_cluster.reload()
    server = Server.objects.get(pk=server.pk)
    server.dsn = sample_cluster.dsn("reliabilitymaldives", user=role)
    server.password = "not-a-superuser"
    server.save()
    return server


@needs_german
@pytest.mark.parametrize("german", [True, False])
def test_a_role_allowed_only_replication_backs_up_through_pg_basebackup(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, german
):
    """Such a role can neither ask for English nor learn the server's word for WARNING on an
    ordinary connection: every message of the server counted as a warning, the NOTICE that the
    backup's WAL is archived too ("alle benötigten WAL-Segmente wurden archiviert"), and every
    backup failed (on an English server too: "all required WAL segments have been archived")."""
    settings.BASE_COMPRESSION = "client"
    enable_push(sample_cluster)
    if german:
        speak_german(sample_cluster)
    server = replication_only(sample_cluster, server)
    # No ordinary connection to learn it on; an English lc_messages is seen on its replication one.
    assert basestream.word_for_warning(server) == (None if german else "WARNING")
    plain = run_command("backup", "maldives", "--kind", "base")
    assert plain["status"] == "succeeded", plain["error"]
    with database_moved_away(sample_cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed", result
    assert f"./base/{oid}" in result["error"] and "what it skipped would be missing" in result["error"]
    assert not BackupRun.objects.get(pk=result["id"]).copies.exists()


@pytest.mark.parametrize("compression", ["server", "client"])
def test_a_server_that_sends_its_clients_no_warnings_still_fails_the_backup_naming_the_skipped_directory(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    """client_min_messages = error in postgresql.conf: the server sent the backup's connection
    no WARNING, and the backup said "succeeded" without the database moved away."""
    settings.BASE_COMPRESSION = compression
    enable_push(sample_cluster)
    sample_cluster.execute("ALTER SYSTEM SET client_min_messages = 'error'")
    sample_cluster.execute("SELECT pg_reload_conf()")
    with database_moved_away(sample_cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed", result
    assert f'skipping special file "./base/{oid}": what it skipped would be missing' in result["error"]


@needs_german
@pytest.mark.parametrize("where", ["ROLE backup_only", "DATABASE reliabilitymaldives"])
def test_a_role_that_speaks_english_only_outside_replication_still_fails_a_german_warning(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, where
):
    """ALTER ROLE (or DATABASE) ... SET lc_messages = 'C', as a DBA would for a backup role that may
    not ask for English itself: its ordinary connections speak English, its replication
    connections do not (a physical walsender applies no role or database settings). The word
    learnt there was "WARNING", pg_basebackup's line said "WARNUNG", and the backup without the
    database moved away said "succeeded"."""
    settings.BASE_COMPRESSION = "client"
    enable_push(sample_cluster)
    sample_cluster.execute("CREATE ROLE backup_only LOGIN REPLICATION PASSWORD 'not-a-superuser'")
    sample_cluster.execute("GRANT pg_read_all_settings, pg_read_all_stats, pg_monitor TO backup_only")
    sample_cluster.execute(f"ALTER {where} SET lc_messages = 'C'")
    server = Server.objects.get(pk=server.pk)
    server.dsn = sample_cluster.dsn("reliabilitymaldives", user="backup_only")
    server.password = "not-a-superuser"
    server.save()
    speak_german(sample_cluster)
    assert not basestream.speaks_english(server)
    assert basestream.word_for_warning(server) is None  # not the "WARNING" of its English connections
    plain = run_command("backup", "maldives", "--kind", "base")
    assert plain["status"] == "succeeded", plain["error"]
    with database_moved_away(sample_cluster) as oid:
        result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "failed", result
    assert f"./base/{oid}" in result["error"] and "what it skipped would be missing" in result["error"]


@needs_german
@pytest.mark.parametrize("compression", ["server", "client"])
def test_a_log_directory_linked_from_elsewhere_is_left_out_in_german_too_and_the_backup_succeeds(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings, compression
):
    """The server quotes the path it skipped in its language's quotes ("überspringe besondere Datei
    »./pg_log«"): read for ASCII quotes only, a linked log directory failed every backup of a role
    that may not ask for English."""
    settings.BASE_COMPRESSION = compression
    enable_push(sample_cluster)
    sample_cluster.execute("CREATE ROLE backup_only LOGIN REPLICATION PASSWORD 'not-a-superuser'")
    sample_cluster.execute("GRANT pg_read_all_settings, pg_read_all_stats, pg_monitor TO backup_only")
    server = Server.objects.get(pk=server.pk)
    server.dsn = sample_cluster.dsn("reliabilitymaldives", user="backup_only")
    server.password = "not-a-superuser"
    server.save()
    speak_german(sample_cluster)
    logs = Path(tempfile.mkdtemp(prefix="bp-logs-"))
    link = sample_cluster.datadir / "pg_log"
    link.symlink_to(logs)
    try:
        result = run_command("backup", "maldives", "--kind", "base")
        assert result["status"] == "succeeded", result["error"]
        notes = BackupRun.objects.get(pk=result["id"]).notes
        assert "the server left out of the backup (symbolic links; no restore needs them): " in notes
        assert "»./pg_log«" in notes
    finally:
        link.unlink()
        logs.rmdir()


def test_a_role_allowed_only_replication_on_an_english_server_is_not_failed_by_the_wait_for_the_archiver(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """pg_basebackup's server warns each minute it waits for the backup's WAL to be archived, with a
    HINT: a role that could not learn the server's word for WARNING counted the HINT as a warning
    too ("Check that your archive_command is executing properly"), and the backup failed."""
    settings.BASE_COMPRESSION = "client"
    enable_push(sample_cluster)
    archiving = walspool.archive_command(server).replace("'", "''")
    server = replication_only(sample_cluster, server)
    assert basestream.word_for_warning(server) == "WARNING"  # lc_messages C, said on its replication connection
    sample_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: not sample_cluster.execute("SELECT 1 FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"))
    # A minute behind, once: the backup's start switches to a new segment, whose archiving sleeps
    # past pg_backup_stop's first warning (60 s of waiting); later segments, and the cluster's
    # shutdown, do not wait again.
    slowed = Path(tempfile.mkdtemp(prefix="bp-slowed-"))
    slowed.chmod(0o777)
    once = f"test -e {slowed}/done || {{ touch {slowed}/done; sleep 66; }}"
    sample_cluster.execute(f"ALTER SYSTEM SET archive_command = '{once}; {archiving}'")
    sample_cluster.execute("SELECT pg_reload_conf()")
    try:
        result = run_command("backup", "maldives", "--kind", "base")
        assert result["status"] == "succeeded", result["error"]
        run = BackupRun.objects.get(pk=result["id"])
        assert (run.finished_at - run.started_at).total_seconds() > 60  # the server did wait and warn
    finally:
        shutil.rmtree(slowed, ignore_errors=True)
